"""director_tc and director_reply through BPF_PROG_TEST_RUN, table-driven (as Katran's fixtures).

The client-side cases are fastpath_cases.py's, shared with the XDP program (test_director_xdp.py);
the reply program's are here.
"""

from __future__ import annotations

import struct

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, TOPO as T, delta
from director.forwarding.rewrite import nat_snat
from director.lab import craft
from director.packet import build_ipv4_udp, ike_header
from fastpath_cases import (
    C_DR,
    C_NAT,
    C_ONLINK,
    CASES,
    NATT_SPORT,
    VIP,
    Case,
    check_counters_accumulate,
    check_frame_without_a_whole_header,
    check_output,
    eth,
    no_udp_csum,
    patch,
    run_case,
    setup_maps,
    ttl_dec,
)


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_director_tc(world, case: Case):
    run_case(world, "tc", case)


def test_ipv4_frame_without_a_whole_header(world):
    check_frame_without_a_whole_header(world, "tc")


def test_counters_accumulate_and_last_seen_moves(world):
    check_counters_accumulate(world, "tc")


# -- the reply program ---------------------------------------------------------------------------------

esp_reply = craft.esp(T.rip_nat, C_NAT, 0x9000)
natt_reply = build_ipv4_udp(T.rip_nat, C_NAT, 4500, NATT_SPORT, struct.pack("!II", 0x9001, 1) + bytes(40))


def reply_out(ip: bytes) -> bytes:
    return eth(ttl_dec(nat_snat(ip, VIP)), T.gw_mac, T.cli0_mac)


REPLY_CASES = [
    Case("ESP reply from a NAT real server", eth(esp_reply, T.lan0_mac, T.rip_nat_mac), TC_ACT_REDIRECT,
         reply_out(esp_reply), {"replies": 1}),  # fmt: skip
    Case("ESP-in-UDP reply (UDP checksum updated)", eth(natt_reply, T.lan0_mac, T.rip_nat_mac), TC_ACT_REDIRECT,
         reply_out(natt_reply), {"replies": 1}),  # fmt: skip
    Case("ESP-in-UDP reply, zero UDP checksum stays zero", eth(no_udp_csum(natt_reply), T.lan0_mac), TC_ACT_REDIRECT,
         reply_out(no_udp_csum(natt_reply)), {"replies": 1}),  # fmt: skip
    Case("IKE reply (500): the daemon reads it", eth(craft.ike(T.rip_nat, C_NAT, 1, 2)), TC_ACT_OK, None, {}),
    Case("IKE reply on 4500 behind the marker", eth(build_ipv4_udp(T.rip_nat, C_NAT, 4500, NATT_SPORT,
         bytes(4) + ike_header(1, 2, 35))), TC_ACT_OK, None, {}),  # fmt: skip
    Case("NAT-keepalive from a real server", eth(build_ipv4_udp(T.rip_nat, C_NAT, 4500, NATT_SPORT, b"\xff")),
         TC_ACT_OK, None, {}),  # fmt: skip
    Case("ESP from a real server not in nat_replies (DR)", eth(craft.esp(T.rip_dr, C_DR, 5)), TC_ACT_OK, None, {}),
    Case("malformed ESP reply: the slow path drops it", eth(craft.esp(T.rip_nat, C_NAT, 0)), TC_ACT_OK, None, {}),
    Case("AH reply: not rewritten (NAT breaks AH)", eth(craft.ah(T.rip_nat, C_NAT, 5)), TC_ACT_OK, None, {}),
    Case("ARP on the LAN", eth(bytes(28), ethertype=b"\x08\x06"), TC_ACT_OK, None, {}),
    Case("ESP reply with TTL 1", eth(patch(esp_reply, 8, b"\x01")), TC_ACT_OK, None, {"ttl_pass": 1}),
    Case("ESP reply to a client with no neighbour", eth(craft.esp(T.rip_nat, C_ONLINK, 5)), TC_ACT_OK, None,
         {"fib_miss": 1}),  # fmt: skip
]


@pytest.mark.parametrize("case", REPLY_CASES, ids=[c.desc for c in REPLY_CASES])
def test_director_reply(world, case: Case):
    setup_maps(world)
    before = world.stats()
    r = world.run("reply", case.frame)
    assert r.retval == case.ret
    check_output(case.out, case.frame, r.data_out)
    assert delta(before, world.stats()) == case.stats
    assert world.rs_stats() == {}
