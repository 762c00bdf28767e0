"""The reply program's return path (ebpf/include/return_path.h) through BPF_PROG_TEST_RUN, table-driven.

DR/TUN replies with the VIP as source arrive on lan0 from a real server's MAC. The program forwards
ESP, AH and ESP-in-UDP of a client whose ``clients`` entry names the real server that sent the
frame (``return_macs``), drops a frame of another MAC and anything from the VIP that is no IPsec
(counted in ``return_stats``), and passes the rest to the stack (the reply queue and the core).
The program runs at tc only (the server-side hook); the client-side hooks do not see replies.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TOPO as T, delta
from director.dataplane.ebpf import mac_key
from director.drop_reasons import DropReason
from director.lab import craft
from director.packet import build_ipv4, build_ipv4_udp
from fastpath_cases import C_DR, C_TUN, C_UNKNOWN, NATT_SPORT, VIP, VIP_NOAH, eth, patch, setup_maps, ttl_dec

S_FORWARDED = 15
NOT_IPSEC = DropReason.RETURN_NOT_IPSEC - 80
WRONG = DropReason.RETURN_WRONG_SERVER - 80


def ret_maps(world) -> dict[str, int]:
    return {m: world.objs[1].map_fd(m) for m in ("return_vips", "return_macs", "return_stats")}


def ret_stats(world) -> list[int]:
    fd, size = ret_maps(world)["return_stats"], 8 * world.ncpus
    out = []
    for i in range(16):
        v = world.L.map_lookup(fd, world.S.u32(i), size)
        out.append(sum(int.from_bytes(v[j:j + 8], "little") for j in range(0, len(v), 8)))
    return out


@pytest.fixture
def ret(world):
    """setup_maps' world plus VIP as a return-path service, rs 1 (C_DR's) and rs 3 (C_TUN's) by MAC."""
    setup_maps(world)
    fds = ret_maps(world)
    S, L = world.S, world.L
    L.map_update(fds["return_vips"], S.addr(VIP), S.u32(1))
    L.map_update(fds["return_macs"], mac_key(T.rip_dr_mac), S.u32(1))
    L.map_update(fds["return_macs"], mac_key(T.rip_tun_mac), S.u32(3))
    yield world
    for name, size in (("return_vips", 4), ("return_macs", 8)):
        for k in list(L.map_keys(fds[name], size)):
            L.map_delete(fds[name], k)


class R(NamedTuple):
    desc: str
    ip: bytes
    src_mac: bytes
    ret: int
    forwarded: bool = False
    counted: dict = {}  # return_stats index -> change
    stats: dict = {}  # dp_stats changes


esp = craft.esp(VIP, C_DR, 0x5000)
natt = build_ipv4_udp(VIP, C_DR, 4500, NATT_SPORT, struct.pack("!II", 0x5001, 1) + bytes(40))
CASES = [
    R("ESP from the client's real server: to the client", esp, T.rip_dr_mac, TC_ACT_REDIRECT, True, {S_FORWARDED: 1}),
    R("ESP-in-UDP from the client's real server (its NAT-T port)", natt, T.rip_dr_mac, TC_ACT_REDIRECT, True,
      {S_FORWARDED: 1}),  # fmt: skip
    R("AH from the client's real server", craft.ah(VIP, C_DR, 0x5002), T.rip_dr_mac, TC_ACT_REDIRECT, True,
      {S_FORWARDED: 1}),  # fmt: skip
    R("a TUN server's plain reply to its client", craft.esp(VIP, C_TUN, 0x5003), T.rip_tun_mac, TC_ACT_REDIRECT, True,
      {S_FORWARDED: 1}),  # fmt: skip
    R("ESP of C_DR's conversation from another real server: dropped", esp, T.rip_tun_mac, TC_ACT_SHOT, False,
      {WRONG: 1}),  # fmt: skip
    R("ESP from a MAC of no real server: dropped", esp, T.gw_mac, TC_ACT_SHOT, False, {WRONG: 1}),
    R("ESP-in-UDP to another port of the client: the core decides", build_ipv4_udp(VIP, C_DR, 4500, 4501,
      struct.pack("!II", 0x5001, 1) + bytes(40)), T.rip_dr_mac, TC_ACT_OK),  # fmt: skip
    R("ESP to a client not in the map: the core decides", craft.esp(VIP, C_UNKNOWN, 0x5004), T.rip_dr_mac, TC_ACT_OK),
    R("IKE from the VIP: the core records the responder SPI", craft.ike(VIP, C_DR, 1, 2), T.rip_dr_mac, TC_ACT_OK),
    R("NAT-keepalive from the VIP: the core", build_ipv4_udp(VIP, C_DR, 4500, NATT_SPORT, b"\xff"), T.rip_dr_mac,
      TC_ACT_OK),  # fmt: skip
    R("ICMP echo from the VIP: not IPsec, dropped", build_ipv4(VIP, C_DR, 1, b"\x08\x00\xf7\xff" + bytes(4)),
      T.rip_dr_mac, TC_ACT_SHOT, False, {NOT_IPSEC: 1}),  # fmt: skip
    R("UDP from the VIP's port 53: not IPsec, dropped", build_ipv4_udp(VIP, C_DR, 53, 53, bytes(12)), T.gw_mac,
      TC_ACT_SHOT, False, {NOT_IPSEC: 1}),  # fmt: skip
    R("a fragment from the VIP: the stack reassembles, then the core", build_ipv4(VIP, C_DR, 50, bytes(64),
      flags_frag=0x2000), T.rip_dr_mac, TC_ACT_OK),  # fmt: skip
    R("malformed ESP (SPI 0): the core drops it with its reason", craft.esp(VIP, C_DR, 0), T.rip_dr_mac, TC_ACT_OK),
    R("ESP with TTL 1: the stack answers", patch(esp, 8, b"\x01"), T.rip_dr_mac, TC_ACT_OK, False, {},
      {"ttl_pass": 1}),  # fmt: skip
    R("ESP from a VIP without the return path: untouched", craft.esp(VIP_NOAH, C_DR, 0x5005), T.gw_mac, TC_ACT_OK),
]


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_return_path(ret, case: R):
    world = ret
    frame = eth(case.ip, T.lan0_mac, case.src_mac)
    before, rbefore = world.stats(), ret_stats(world)
    r = world.run("reply", frame)
    assert r.retval == case.ret
    if case.forwarded:  # the source stays the VIP: only the TTL and the Ethernet header change
        assert r.data_out == eth(ttl_dec(case.ip), T.gw_mac, T.cli0_mac)
    else:
        assert r.data_out == frame, "the frame must leave unchanged"
    after = ret_stats(world)
    assert {i: after[i] - rbefore[i] for i in range(16) if after[i] != rbefore[i]} == case.counted
    assert delta(before, world.stats()) == case.stats


def test_without_return_vips_a_vip_source_is_not_judged(world):
    """No return-path service: ESP from the VIP passes untouched and uncounted (the NAT program's
    behaviour for everything not from a NAT real server)."""
    setup_maps(world)
    frame = eth(esp, T.lan0_mac, T.gw_mac)
    before = ret_stats(world)
    r = world.run("reply", frame)
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert ret_stats(world) == before
