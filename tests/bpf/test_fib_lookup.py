"""The fast path's route lookups: the main table directly (default), or through the ip rules
(daemon.fastpath_fib = "rules", DP_F_FIB_RULES in dp_config).

A policy rule in the test namespace sends the DR real server's address to table 100, whose route
leaves by lan2 (a neighbour there): with the rules, tc and XDP forward out of lan2; by default they
ignore the rule and use the main table's lan0 route, as before the rule existed.
"""

from __future__ import annotations

import pytest

from bpf_world import TC_ACT_REDIRECT, TOPO, XDP_REDIRECT, _ip
from director.dataplane import bpf_structs as S
from fastpath_cases import esp_dr, eth, setup_maps

REDIRECT = {"tc": TC_ACT_REDIRECT, "xdp": XDP_REDIRECT}
OTHER_MAC = bytes.fromhex("020000000399")  # the DR real server's next hop in table 100, on lan2
GW = "10.2.0.99"


@pytest.fixture
def policy_rule(world):
    ns = world.netns
    ns._ip("neigh", "replace", GW, "lladdr", "02:00:00:00:03:99", "dev", "lan2", "nud", "permanent")
    ns._ip("route", "add", f"{_ip(TOPO.rip_dr)}/32", "via", GW, "dev", "lan2", "table", "100")
    ns._ip("rule", "add", "to", f"{_ip(TOPO.rip_dr)}/32", "lookup", "100", "pref", "1000")
    try:
        yield
    finally:
        ns._ip("rule", "del", "pref", "1000")
        ns._ip("route", "flush", "table", "100")


@pytest.mark.parametrize("prog", ["tc", "xdp"])
@pytest.mark.parametrize("flags, mac", [(0, TOPO.rip_dr_mac), (S.DP_F_FIB_RULES, OTHER_MAC)], ids=["main", "rules"])
def test_route_lookup_follows_the_rules_only_when_asked(world, policy_rule, prog, flags, mac):
    setup_maps(world, flags=flags)
    r = world.run(prog, eth(esp_dr))
    assert r.retval == REDIRECT[prog]
    assert r.data_out[:6] == mac, r.data_out[:12].hex()
