"""The client-side fast path at both hooks (director_tc, director_xdp) and the NAT reply program
(director_reply) through BPF_PROG_TEST_RUN, table-driven (as Katran's fixtures).

The client-side cases are fastpath_cases.py's, run at each hook: every case must give the same
verdict at both (XDP_PASS for TC_ACT_OK, XDP_DROP for TC_ACT_SHOT, XDP_REDIRECT for
TC_ACT_REDIRECT), the same output bytes, the same counters, the same last_seen and rs_stats.
BPF_PROG_TEST_RUN of an XDP program does not transmit: a redirect returns XDP_REDIRECT with the
rewritten frame. Then what only one hook has: the reply program (tc), and XDP's redirects only to
the interfaces of xdp_tx_ports and its pass of partial UDP checksums.
"""

from __future__ import annotations

import struct

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, TOPO as T, XDP_PASS, XDP_REDIRECT, delta
from director.dataplane import bpf_structs as S
from director.forwarding.rewrite import nat_snat
from director.lab import craft
from director.packet import Kind as K, build_ipv4_udp, ike_header
from fastpath_cases import (
    C_DR,
    C_NAT,
    C_ONLINK,
    C_TUN,
    CASES,
    RS,
    NATT_SPORT,
    VIP,
    Case,
    check_counters_accumulate,
    check_frame_without_a_whole_header,
    check_output,
    esp_dr,
    esp_tun,
    eth,
    key,
    last_seen_all,
    natt,
    no_udp_csum,
    passed,
    patch,
    run_case,
    setup_maps,
    ttl_dec,
)

HOOKS = ("tc", "xdp")


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_director(world, hook, case: Case):
    run_case(world, hook, case)


# The one case of the table about the lookup itself: without an input interface the route lookup
# fails; a cached next hop needs none (test_cached_next_hop_needs_no_input_interface).
LOOKUP_ONLY = {"no input interface configured or known: no route, pass"}
CACHED_CASES = [c for c in CASES if c.desc not in LOOKUP_ONLY]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", CACHED_CASES, ids=[c.desc for c in CACHED_CASES])
def test_director_with_cached_next_hops(world, hook, case: Case):
    """The same table with every resolvable real server's next hop in ``servers``: the same
    verdicts, bytes and counters as with the route and neighbour lookup per packet."""
    run_case(world, hook, case, cached=True)


@pytest.mark.parametrize("hook", HOOKS)
def test_cached_next_hop_needs_no_input_interface(world, hook):
    assert len(LOOKUP_ONLY & {c.desc for c in CASES}) == len(LOOKUP_ONLY)  # the exclusion names real cases
    setup_maps(world, cached=True, client_ifindex=0)
    r = world.run(hook, eth(esp_dr))
    assert r.retval == (TC_ACT_REDIRECT if hook == "tc" else XDP_REDIRECT)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mode", ("dr", "nat", "tun"))
def test_cached_next_hop_is_what_is_used(world, hook, mode):
    """A next hop in ``servers`` replaces the lookup: the frame leaves with its MACs, not the
    neighbour table's; its MTU bounds what is forwarded (above it: passed, counted mtu_pass)."""
    rs_id, frame = {"dr": (1, eth(esp_dr)), "nat": (2, eth(natt[C_NAT])), "tun": (3, eth(esp_tun))}[mode]
    _client, rip, method = RS[rs_id]
    other_mac, other_src = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")
    setup_maps(world)
    nh = S.NextHop(world.netns.ifindex["lan0"], T.lan_mtu, other_mac, other_src)
    world.put("servers", S.u32(rs_id), S.server_val(rip, method, nh))
    r = world.run(hook, frame)
    assert r.retval == (TC_ACT_REDIRECT if hook == "tc" else XDP_REDIRECT)
    assert r.data_out[:12] == other_mac + other_src
    wire = len(frame) - 14 + (20 if mode == "tun" else 0)  # what leaves: the envelope in TUN
    world.put("servers", S.u32(rs_id), S.server_val(rip, method, nh._replace(mtu=wire - 1)))
    before = world.stats()
    r = world.run(hook, frame)
    assert (r.retval, r.data_out) == ((TC_ACT_OK if hook == "tc" else XDP_PASS), frame)
    kind = {"dr": K.ESP, "nat": K.ESP_IN_UDP, "tun": K.ESP}[mode]
    assert delta(before, world.stats()) == passed(kind, mtu_pass=1)
    world.put("servers", S.u32(rs_id), S.server_val(rip, method, nh._replace(mtu=wire)))
    assert world.run(hook, frame).retval == (TC_ACT_REDIRECT if hook == "tc" else XDP_REDIRECT)


@pytest.mark.parametrize("hook", HOOKS)
def test_ipv4_frame_without_a_whole_header(world, hook):
    check_frame_without_a_whole_header(world, hook)


@pytest.mark.parametrize("hook", HOOKS)
def test_counters_accumulate_and_last_seen_moves(world, hook):
    check_counters_accumulate(world, hook)


@pytest.mark.parametrize("hook", HOOKS)
def test_tun_outer_ident_is_random(world, hook):
    """The outer IP ident is random per packet (RFC 6864 section 4.1), at both hooks."""
    setup_maps(world)
    idents = {world.run(hook, eth(esp_tun)).data_out[18:20] for _ in range(16)}
    assert len(idents) > 1


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


# -- only the XDP hook ---------------------------------------------------------------------------------

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
