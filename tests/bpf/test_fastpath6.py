"""The eBPF fast path for IPv6 (include/fastpath6.h, parsing6.h) against director.packet and the
slow path's rewrites, with BPF_PROG_TEST_RUN at tc and XDP.

Classification: one table of IPv6 packets to a VIP (valid ones of every kind, behind extension
header chains; every malformed case; 300 seeded mutations) goes through both classifiers with no
client in the maps. Python raises PacketError(reason): the program drops and counts drops[reason];
Python gives a kind: the program passes the frame unchanged and counts pass_packets[kind], plus
``miss`` for ESP/AH/ESP-in-UDP, ``fragments`` for a fragment, ``not_ours`` for NOT_OURS. Every
frame is under V6_WALK_MAX bytes, so none is CLASSIFY_DEEP; that case has its own test.

Forwarding: an ESTABLISHED client's ESP, ESP-in-UDP and AH go out DR (hop limit - 1, the real
server's MAC) or NAT66 (the destination, and the UDP checksum exactly as rewrite6.nat6 computes
it), with the next hop cached or looked up per packet; hop limit 1, a too-small MTU and a server
with no IPv6 address pass instead.
"""

from __future__ import annotations

import random

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TOPO as T, XDP_DROP, XDP_PASS, XDP_REDIRECT, delta
from director.dataplane import bpf_structs as S
from director.drop_reasons import DropReason as R
from director.forwarding.rewrite import nat_dnat
from director.lab import craft
from director.packet import (
    EspHeader,
    Kind as K,
    PacketError,
    build_ipv6,
    build_ipv6_udp,
    classify,
    ike_header,
    ip_to_int,
)

VIP = ip_to_int("2001:db8:f::1")
CLIENT = ip_to_int("2001:db8:77::5")
SEED = 20261205
N_MUTATIONS = 300
HBH = (0, b"\x01\x04\x00\x00\x00\x00")
DST = (60, b"\x01\x04\x00\x00\x00\x00")
RH0 = (43, b"\x00\x00\x00\x00\x00\x00")
ESP = EspHeader(0x1000, 1).to_bytes() + bytes(32)
AH = bytes([59, 4, 0, 0]) + (0x2000).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(12)
HOOKS = {"tc": (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT), "xdp": (XDP_PASS, XDP_DROP, XDP_REDIRECT)}


def frag(offset: int, more: bool) -> tuple[int, bytes]:
    return 44, (offset << 3 | more).to_bytes(2, "big") + b"\0\0\0\7"


def _udp(sport, dport, payload, ext=(), ulen=None) -> bytes:
    hdr = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload) if ulen is None else ulen).to_bytes(2, "big") + b"\0\0"
    return build_ipv6(CLIENT, VIP, 17, hdr + payload, ext=ext)


VALID = {
    "IKEv2 SA_INIT": craft.ike(CLIENT, VIP, 0x1111),
    "IKEv2 AUTH behind hop-by-hop": build_ipv6_udp(CLIENT, VIP, 500, 500, ike_header(1, 2, 35, body=bytes(40)), ext=(HBH,)),
    "IKEv1 main mode": craft.ike(CLIENT, VIP, 0x3333, v1=True, body=bytes(20)),
    "IKE on 4500": craft.ike(CLIENT, VIP, 0x5555, 0x6666, natt=True, sport=40000, body=bytes(8)),
    "NAT-keepalive": craft.keepalive(CLIENT, VIP, 40000),
    "ESP": build_ipv6(CLIENT, VIP, 50, ESP),
    "ESP behind four headers": build_ipv6(CLIENT, VIP, 50, ESP, ext=(HBH, DST, RH0, DST)),
    "ESP behind an atomic fragment": build_ipv6(CLIENT, VIP, 50, ESP, ext=(frag(0, False),)),
    "ESP, padded frame": build_ipv6(CLIENT, VIP, 50, ESP) + bytes(20),
    "AH": build_ipv6(CLIENT, VIP, 51, AH, ext=(DST,)),
    "ESP-in-UDP": craft.esp_in_udp(CLIENT, VIP, 0x3000, sport=40000),
    "ESP-in-UDP behind destination options": build_ipv6_udp(CLIENT, VIP, 4500, 4500, ESP, ext=(DST,)),
    "first fragment": build_ipv6(CLIENT, VIP, 17, bytes(24), ext=(frag(0, True),)),
    "later fragment": build_ipv6(CLIENT, VIP, 50, bytes(24), ext=(DST, frag(9, False))),
    "routing header with segments left": build_ipv6(CLIENT, VIP, 50, ESP, ext=((43, b"\x00\x02\0\0\0\0"),)),
    "TCP": build_ipv6(CLIENT, VIP, 6, bytes(20)),
    "no next header": build_ipv6(CLIENT, VIP, 59, b""),
    "ICMPv6 packet too big": craft.icmp6_error(ip_to_int("2001:db8:99::1"), VIP, craft.esp(VIP, CLIENT, 5)),
    "UDP to another port": _udp(500, 53, bytes(12)),
}

MALFORMED = {
    "header, 39 bytes": VALID["ESP"][:39],
    "source in ::/96": VALID["ESP"][:8] + bytes(12) + b"\x0a\0\0\x01" + VALID["ESP"][24:],
    "nine headers": build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,) * 9),
    "hop-by-hop second": build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST, HBH)),
    "header cut by the frame": build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,))[:44],
    "header beyond the payload length": build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,), payload_length=6),
    "header length beyond the packet": (lambda b: b[:41] + b"\x1f" + b[42:])(build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,))),
    "ESP, 4 bytes": build_ipv6(CLIENT, VIP, 50, b"\0\0\0\x05"),
    "ESP zero SPI": build_ipv6(CLIENT, VIP, 50, bytes(16)),
    "AH payload length 0": build_ipv6(CLIENT, VIP, 51, AH[:1] + b"\0" + AH[2:]),
    "AH zero SPI": build_ipv6(CLIENT, VIP, 51, AH[:4] + bytes(4) + AH[8:]),
    "UDP length 7": _udp(500, 500, bytes(40), ulen=7),
    "UDP, 4 bytes": build_ipv6(CLIENT, VIP, 17, b"\x01\xf4\x01\xf4"),
    "IKE version 0x30": _udp(500, 500, ike_header(1, 0, 34, version=0x30)),
    "IKE zero SPI_i behind a header": _udp(500, 500, ike_header(0, 5, 35), ext=(DST,)),
    "IKE length + 4": _udp(500, 500, ike_header(1, 0, 34) + bytes(4)),
    "4500, 1 byte not 0xFF": _udp(4500, 4500, b"\x00"),
    "ESP-in-UDP, 6 bytes": _udp(4500, 4500, b"\0\0\0\x05\0\0"),
}


def _mutations() -> dict[str, bytes]:
    rng = random.Random(SEED)
    seeds = list(VALID.values())
    out = {}
    for i in range(N_MUTATIONS):
        b = bytearray(rng.choice(seeds))
        op = i % 3
        if op == 0:
            cut = rng.randrange(40, len(b) + 1)
            b = b[:cut]
            name = f"truncated to {cut}"
        elif op == 1:  # flips outside the addresses (8..40): the packet stays "to the VIP"
            positions = []
            for _ in range(rng.randint(1, 3)):
                pos = rng.choice([rng.randrange(0, 8), rng.randrange(40, min(len(b), 120))]) if len(b) > 40 else rng.randrange(0, 8)
                b[pos] = rng.randrange(256)
                positions.append(pos)
            name = f"flipped {positions}"
        else:
            field = rng.choice(["plen", "nexthdr", "ext_nh", "ext_len", "l4_word"])
            if field == "plen":
                b[4:6] = rng.randrange(0, len(b)).to_bytes(2, "big")
            elif field == "nexthdr":
                b[6] = rng.choice([0, 43, 44, 60, 50, 51, 17, 58, 59, 6])
            elif field == "ext_nh" and len(b) > 40:
                b[40] = rng.choice([0, 43, 44, 60, 50, 51, 17, 59])
            elif field == "ext_len" and len(b) > 41:
                b[41] = rng.randrange(256)
            elif field == "l4_word" and len(b) >= 52:
                off = rng.choice([40, 44, 48])
                b[off:off + 4] = rng.choice([0, 1, 0xFFFFFFFF]).to_bytes(4, "big")
            name = f"{field} set"
        out[f"mutation {i:03d}: {name}"] = bytes(b)
    return out


TABLE = {**{f"valid: {k}": v for k, v in VALID.items()}, **{f"malformed: {k}": v for k, v in MALFORMED.items()},
         **_mutations()}  # fmt: skip


def test_table_covers_every_kind_and_ipv6_reason():
    kinds, reasons = set(), set()
    for ip in TABLE.values():
        assert len(ip) < 512  # none deeper than V6_WALK_MAX
        try:
            kinds.add(classify(ip).kind)
        except PacketError as e:
            reasons.add(e.reason)
    assert kinds == set(K)
    assert {R.IP6_EXT_TRUNCATED, R.IP6_EXT_CHAIN_TOO_LONG, R.IP6_BAD_HOP_BY_HOP, R.IP6_BAD_ADDRESS,
            R.IP_TRUNCATED} <= reasons  # fmt: skip
    assert len(reasons) >= 15


def expected(ip: bytes, hook: str) -> tuple[int, dict[str, int]]:
    ok, shot, _ = HOOKS[hook]
    if len(ip) < 40:  # no whole header: whether it is to a VIP cannot be told, so not ours to judge (as IPv4)
        return ok, {"not_ours": 1}
    if ip[0] >> 4 != 6:  # behind the IPv6 ethertype any other version is bad (Python would read a 4 as IPv4;
        return shot, {f"drops[{int(R.IP_BAD_VERSION)}]": 1}  # the kernel's ipv6_rcv drops those, no queue sees one)
    try:
        kind = classify(ip).kind
    except PacketError as e:
        return shot, {f"drops[{int(e.reason)}]": 1}
    extra = {K.ESP: "miss", K.AH: "miss", K.ESP_IN_UDP: "miss", K.FRAGMENT: "fragments", K.NOT_OURS: "not_ours"}
    counters = {f"pass_packets[{kind}]": 1}
    if kind in extra:
        counters[extra[kind]] = 1
    return ok, counters


@pytest.fixture(scope="module")
def vip6_world(world):
    world.clear()
    world.put("vips6", S.addr6(VIP), S.vip_val(1, S.VIP_F_AH))
    world.put("config", S.u32(0), S.dp_config(T.lan_addr, world.netns.ifindex["lan0"], T.lan_mtu,
                                              world.netns.ifindex["cli0"]))  # fmt: skip
    return world


def frame6(ip: bytes, dst_mac: bytes = T.cli0_mac) -> bytes:
    return dst_mac + T.gw_mac + b"\x86\xdd" + ip


# BPF_PROG_TEST_RUN refuses an skb with the IPv6 ethertype and less than an IPv6 header (EINVAL):
# such frames run at XDP only (at a real tc hook they would come through, and the same code judges them)
AGREEMENT = [pytest.param(ip, hook, id=f"{name}-{hook}") for name, ip in TABLE.items() for hook in HOOKS
             if hook == "xdp" or len(ip) >= 40]  # fmt: skip


@pytest.mark.parametrize("ip,hook", AGREEMENT)
def test_ipv6_classifier_agrees_with_python(vip6_world, ip: bytes, hook: str):
    ret, counters = expected(ip, hook)
    before = vip6_world.stats()
    r = vip6_world.run(hook, frame6(ip))
    assert (r.retval, delta(before, vip6_world.stats())) == (ret, counters)
    assert r.data_out == frame6(ip)


@pytest.mark.parametrize("hook", list(HOOKS))
def test_headers_deeper_than_the_walk_go_to_the_slow_path(vip6_world, hook):
    pad256 = (60, b"\x01\xfc" + bytes(252))  # destination options, one PadN: 256 bytes
    deep = build_ipv6(CLIENT, VIP, 50, ESP, ext=(pad256, pad256))
    assert classify(deep).l4_offset > 512  # Python classifies it whole; the program leaves it to Python
    before = vip6_world.stats()
    r = vip6_world.run(hook, frame6(deep))
    assert (r.retval, delta(before, vip6_world.stats())) == (HOOKS[hook][0], {"pass_packets[0]": 1, "not_ours": 1})


# -- forwarding --------------------------------------------------------------------------------------

RS_DR, RS_NAT, RS_SMALL, RS_V4ONLY = 61, 62, 63, 64


@pytest.fixture
def fwd_world(world):
    world.clear()
    world.put("vips6", S.addr6(VIP), S.vip_val(1, S.VIP_F_AH))
    world.put("config", S.u32(0), S.dp_config(T.lan_addr, world.netns.ifindex["lan0"], T.lan_mtu,
                                              world.netns.ifindex["cli0"]))  # fmt: skip
    lan0, lan2 = world.netns.ifindex["lan0"], world.netns.ifindex["lan2"]
    for rs, rip, method, slot in ((RS_DR, T.rip6_dr, S.METHOD_DR, 1), (RS_NAT, T.rip6_nat, S.METHOD_NAT, 2),
                                  (RS_SMALL, T.rip6_smallmtu, S.METHOD_DR, 3)):  # fmt: skip
        world.put("servers", S.u32(rs), S.server_val(0, method, None, slot))
        world.put("servers6", S.u32(rs), S.addr6(rip))
    world.put("servers", S.u32(RS_V4ONLY), S.server_val(T.rip_dr, S.METHOD_DR, None, 4))  # no servers6 entry
    world.lan = {RS_DR: (lan0, T.rip_dr_mac), RS_NAT: (lan0, T.rip_nat_mac), RS_SMALL: (lan2, T.rip_smallmtu_mac)}
    return world


def cache_next_hops(w, mtu: int = 1500) -> None:
    """servers' next hops as the daemon's resolver writes them (daemon.fastpath_fib = "cached")."""
    for rs, (ifindex, mac), method, slot in ((RS_DR, w.lan[RS_DR], S.METHOD_DR, 1), (RS_NAT, w.lan[RS_NAT], S.METHOD_NAT, 2)):
        w.put("servers", S.u32(rs), S.server_val(0, method, S.NextHop(ifindex, mtu, mac, T.lan0_mac), slot))


PACKETS = {
    "ESP": (build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,)), 0, K.ESP),
    "ESP-in-UDP": (build_ipv6_udp(CLIENT, VIP, 4500, 4500, ESP), 4500, K.ESP_IN_UDP),
    "AH": (build_ipv6(CLIENT, VIP, 51, AH), 0, K.AH),
}


@pytest.mark.parametrize("cached", [False, True], ids=["fib lookup", "cached next hop"])
@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("rs", [RS_DR, RS_NAT], ids=["DR", "NAT66"])
@pytest.mark.parametrize("name", list(PACKETS))
def test_an_established_client_is_forwarded(fwd_world, name, rs, hook, cached):
    ip, port, kind = PACKETS[name]
    if cached:
        cache_next_hops(fwd_world)
    fwd_world.put("clients6", S.client6_key(VIP, CLIENT, port), S.client_val(rs))
    before = fwd_world.stats()
    r = fwd_world.run(hook, frame6(ip))
    ifindex, mac = fwd_world.lan[rs]
    want = bytearray(nat_dnat(ip, T.rip6_nat) if rs == RS_NAT else ip)  # the slow path's NAT66, checksum included
    want[7] -= 1  # hop limit
    assert r.retval == HOOKS[hook][2]
    assert r.data_out == mac + T.lan0_mac + b"\x86\xdd" + bytes(want)
    assert delta(before, fwd_world.stats()) == {f"fwd_packets[{kind}]": 1, f"fwd_bytes[{kind}]": len(ip)}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_what_the_fast_path_passes_instead(fwd_world, hook):
    ok = HOOKS[hook][0]
    esp = build_ipv6(CLIENT, VIP, 50, ESP)
    cases = [
        ("hop limit 1", build_ipv6(CLIENT, VIP, 50, ESP, hop_limit=1), RS_DR, {"ttl_pass": 1}),
        ("the route's MTU is 1280", build_ipv6(CLIENT, VIP, 50, ESP + bytes(1300)), RS_SMALL, {"mtu_pass": 1}),
        ("a server without an IPv6 address", esp, RS_V4ONLY, {"miss": 1}),
    ]
    for what, ip, rs, why in cases:
        fwd_world.put("clients6", S.client6_key(VIP, CLIENT, 0), S.client_val(rs))
        before = fwd_world.stats()
        r = fwd_world.run(hook, frame6(ip))
        assert (r.retval, r.data_out) == (ok, frame6(ip)), what
        assert delta(before, fwd_world.stats()) == {"pass_packets[4]": 1, **why}, what
    fwd_world.put("vips6", S.addr6(VIP), S.vip_val(1, 0))  # a service without AH: the slow path answers
    before = fwd_world.stats()
    assert fwd_world.run(hook, frame6(PACKETS["AH"][0])).retval == ok
    assert delta(before, fwd_world.stats()) == {"pass_packets[5]": 1}
