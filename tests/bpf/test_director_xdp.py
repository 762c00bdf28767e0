"""director_xdp through BPF_PROG_TEST_RUN: the same case table as director_tc (fastpath_cases.py).

Every case must give the XDP verdict that corresponds to tc's (XDP_PASS for TC_ACT_OK, XDP_DROP
for TC_ACT_SHOT, XDP_REDIRECT for TC_ACT_REDIRECT), the same output bytes, the same counters, the
same last_seen and rs_stats. BPF_PROG_TEST_RUN of an XDP program does not transmit: a redirect
returns XDP_REDIRECT with the rewritten frame. Then what only the XDP hook has: its redirect goes
only to the interfaces of xdp_tx_ports.
"""

from __future__ import annotations

import struct

import pytest

from bpf_world import XDP_PASS, XDP_REDIRECT, delta
from director.packet import Kind as K
from fastpath_cases import (
    CASES,
    C_DR,
    C_NAT,
    C_TUN,
    NATT_SPORT,
    Case,
    check_counters_accumulate,
    check_frame_without_a_whole_header,
    esp_dr,
    esp_tun,
    eth,
    key,
    last_seen_all,
    natt,
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


def partial_csum(ip: bytes) -> bytes:
    """``ip`` (IPv4/UDP, no options) as a local socket hands it to a checksum-offloading veth
    (CHECKSUM_PARTIAL): the UDP checksum field holds the folded pseudo-header sum only."""
    words = struct.unpack("!4H", ip[12:20]) + (17, struct.unpack_from("!H", ip, 24)[0])
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ip[:26] + s.to_bytes(2, "big") + ip[28:]


@pytest.mark.parametrize("client", [C_DR, C_NAT, C_TUN], ids=["DR", "NAT", "TUN"])
def test_partial_udp_checksum_passes_to_the_stack(world, client):
    """XDP cannot finish a partial checksum and a redirected frame would die at the real server's
    checksum check: such ESP-in-UDP goes to the stack untouched (tc forwards it, its skb knows)."""
    setup_maps(world)
    frame = eth(partial_csum(natt[client]))
    before = world.stats()
    r = world.run("xdp", frame)
    assert (r.retval, r.data_out) == (XDP_PASS, frame)
    assert delta(before, world.stats()) == passed(K.ESP_IN_UDP)
    assert [k for k, v in last_seen_all(world).items() if v] == [key(client, NATT_SPORT)]
    assert world.rs_stats() == {}
    assert world.run("xdp", eth(natt[client])).retval == XDP_REDIRECT  # the complete checksum: forwarded
