"""director_xdp through BPF_PROG_TEST_RUN: the same case table as director_tc (fastpath_cases.py).

Every case must give the XDP verdict that corresponds to tc's (XDP_PASS for TC_ACT_OK, XDP_DROP
for TC_ACT_SHOT, XDP_REDIRECT for TC_ACT_REDIRECT), the same output bytes, the same counters, the
same last_seen and rs_stats. BPF_PROG_TEST_RUN of an XDP program does not transmit: a redirect
returns XDP_REDIRECT with the rewritten frame. Then what only the XDP hook has: its redirect goes
only to the interfaces of xdp_tx_ports.
"""

from __future__ import annotations

import pytest

from bpf_world import XDP_PASS, XDP_REDIRECT, delta
from director.packet import Kind as K
from fastpath_cases import (
    CASES,
    C_DR,
    C_TUN,
    Case,
    check_counters_accumulate,
    check_frame_without_a_whole_header,
    esp_dr,
    esp_tun,
    eth,
    key,
    last_seen_all,
    passed,
    run_case,
    setup_maps,
)


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_director_xdp(world, case: Case):
    run_case(world, "xdp", case)


def test_xdp_ipv4_frame_without_a_whole_header(world):
    check_frame_without_a_whole_header(world, "xdp")


def test_xdp_counters_accumulate_and_last_seen_moves(world):
    check_counters_accumulate(world, "xdp")


@pytest.mark.parametrize("ip", [esp_dr, esp_tun], ids=["DR", "TUN"])
def test_route_to_an_interface_not_in_tx_ports_passes(world, ip):
    """lan0 cannot take XDP frames (not in xdp_tx_ports): the packet goes to the stack untouched,
    counted as a fib_miss, never redirected into a silent drop."""
    setup_maps(world)
    world.set_tx_ports(["cli0", "lan2"])
    try:
        before = world.stats()
        frame = eth(ip)
        r = world.run("xdp", frame)
        assert (r.retval, r.data_out) == (XDP_PASS, frame)
        assert delta(before, world.stats()) == passed(K.ESP, fib_miss=1)
        assert list(k for k, v in last_seen_all(world).items() if v) == [key(C_DR if ip is esp_dr else C_TUN)]
        assert world.rs_stats() == {}
    finally:
        world.set_tx_ports(["cli0", "lan0", "lan2"])
    assert world.run("xdp", frame).retval == XDP_REDIRECT


def test_tun_outer_ident_is_random(world):
    """The outer IP ident is random per packet (RFC 6864 section 4.1), as at tc."""
    setup_maps(world)
    idents = {world.run("xdp", eth(esp_tun)).data_out[18:20] for _ in range(16)}
    assert len(idents) > 1
