"""ICMP errors about a client's conversation reach its real server: parse, match, rewrite.

A router on the client's path sends a "fragmentation needed" (or host unreachable, time exceeded)
to the VIP, quoting the packet the VIP sent: inner source VIP, inner destination the client. The
core finds the conversation from the quote and relays the error to its real server; NAT mode also
rewrites the quoted source. Checksums are checked against a from-scratch reference and scapy.
"""

import struct

import pytest
from scapy.layers.inet import ICMP, IP

from director.core import Action, Director
from director.drop_reasons import DropReason
from director.forwarding.rewrite import icmp_error_dnat
from director.isakmp_state import Timeouts
from director.lab import craft
from director.packet import (
    ICMP_ERROR_TYPES,
    Kind,
    PacketError,
    build_ipv4,
    build_ipv4_udp,
    ike_header,
    ip_to_int,
    parse_icmp_error,
)
from director.schedulers import RealServer
from director.service import Method, Service

VIP = ip_to_int("192.0.2.10")
RIPS = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3)]
ROUTER = ip_to_int("203.0.113.254")
CLIENTS = [ip_to_int(f"203.0.113.{i}") for i in range(1, 61)]
STRANGER = ip_to_int("203.0.113.200")


def ref_csum(data: bytes) -> int:
    """RFC 1071 from scratch, one 16-bit word at a time (no director code)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def director(method=Method.DR, n=3):
    d = Director(capacity=4096)
    servers = {i: RealServer(id=i, addr=RIPS[i], weight=1, method=method) for i in range(n)}
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", method=method, ah=method != Method.NAT,
                          timeouts=Timeouts(init=10.0, established=100.0), servers=servers))
    return d


def establish(d, client, spi, sport=500, natt=False):
    v = d.decide(craft.ike(client, VIP, spi, sport=sport, natt=natt), 0.0)
    assert v.action == Action.FORWARD
    if d._rs_method[v.rs] == Method.NAT:  # the real server's answer names the responder SPI
        d.decide_reply(craft.ike(RIPS[v.rs], client, spi, 0x77, sport=sport, natt=natt), 0.01)
    v2 = d.decide(craft.ike(client, VIP, spi, 0x77, sport=sport, natt=natt), 0.02)
    assert v2.action == Action.FORWARD and v2.rs == v.rs
    return v.rs


def server_ike(src, client, cport=500, size=1600):
    """What a real server (or the VIP, after reply NAT) sends: a big IKE answer, DF set."""
    return build_ipv4_udp(src, client, 500, cport, ike_header(5, 0x77, 34, flags=0x20, body=bytes(size)))


def server_esp(src, client, spi=0xABCD0001):
    return build_ipv4(src, client, 50, struct.pack(">II", spi, 9) + bytes(1400))


# -- parsing ------------------------------------------------------------------------------------------


def test_frag_needed_quoting_ike_is_parsed():
    e = parse_icmp_error(craft.icmp_error(ROUTER, VIP, server_ike(VIP, CLIENTS[0], 4501), mtu=1400))
    assert (e.type, e.code, e.src, e.dst, e.quote_offset) == (3, 4, ROUTER, VIP, 28)
    assert (e.qproto, e.qsrc, e.qdst, e.qsport, e.qdport, e.qspi, e.qfirst) == (17, VIP, CLIENTS[0], 500, 4501, 0, True)


def test_esp_and_ah_quotes_give_the_spi():
    assert parse_icmp_error(craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0]))).qspi == 0xABCD0001
    ah = craft.ah(VIP, CLIENTS[0], 0x1234)
    assert parse_icmp_error(craft.icmp_error(ROUTER, VIP, ah, itype=11, code=0)).qspi == 0x1234


@pytest.mark.parametrize("itype", [0, 4, 5, 8, 13, 255])
def test_other_icmp_types_are_not_errors_to_relay(itype):
    assert itype not in ICMP_ERROR_TYPES
    assert parse_icmp_error(craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0]), itype=itype)) is None


def test_not_icmp_or_a_fragment_is_none():
    assert parse_icmp_error(server_esp(VIP, CLIENTS[0])) is None
    frag = bytearray(craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0])))
    frag[6] = 0x20  # More Fragments
    assert parse_icmp_error(bytes(frag)) is None


def _quote_variant(quoted: bytes, quote: int, total_length=None) -> bytes:
    pkt = craft.icmp_error(ROUTER, VIP, quoted, quote=quote)
    if total_length is not None:
        pkt = build_ipv4(ROUTER, VIP, 1, pkt[20:], total_length=total_length, flags_frag=0)
    return pkt


def _with_quoted_byte0(b0: int) -> bytes:
    q = bytearray(server_esp(VIP, CLIENTS[0])[:28])
    q[0] = b0
    return bytes(q)


@pytest.mark.parametrize("pkt, reason", [
    (build_ipv4(ROUTER, VIP, 1, bytes([3, 4, 0, 0])), DropReason.ICMP_TRUNCATED),
    (_quote_variant(server_esp(VIP, CLIENTS[0]), 0), DropReason.ICMP_QUOTE_TRUNCATED),
    (_quote_variant(server_esp(VIP, CLIENTS[0]), 19), DropReason.ICMP_QUOTE_TRUNCATED),
    (_quote_variant(server_esp(VIP, CLIENTS[0]), 27), DropReason.ICMP_QUOTE_TRUNCATED),
    (_quote_variant(_with_quoted_byte0(0x65), 28), DropReason.ICMP_QUOTE_MALFORMED),  # version 6
    (_quote_variant(_with_quoted_byte0(0x44), 28), DropReason.ICMP_QUOTE_MALFORMED),  # IHL 4
    (_quote_variant(_with_quoted_byte0(0x46), 28), DropReason.ICMP_QUOTE_TRUNCATED),  # IHL 6: 4 more bytes
    # the total length cuts the quote short though the buffer holds it (link-layer padding)
    (_quote_variant(server_esp(VIP, CLIENTS[0]), 28, total_length=50), DropReason.ICMP_QUOTE_TRUNCATED),
    (_quote_variant(server_esp(VIP, CLIENTS[0]), 28)[:40], DropReason.ICMP_QUOTE_TRUNCATED),  # truncated copy
])
def test_every_malformed_form_has_its_reason(pkt, reason):
    with pytest.raises(PacketError) as e:
        parse_icmp_error(pkt)
    assert e.value.reason == reason
    d = director()
    v = d.decide(pkt, 1.0)
    assert (v.action, v.reason) == (Action.DROP, reason) and d.drops[reason] == 1


def test_a_quote_of_a_short_packet_needs_only_its_bytes():
    tiny = build_ipv4(VIP, CLIENTS[0], 50, struct.pack(">I", 0xAB))  # 4 bytes of payload in all
    e = parse_icmp_error(craft.icmp_error(ROUTER, VIP, tiny, quote=24))
    assert (e.qproto, e.qspi) == (50, 0)


# -- matching -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Method.DR, Method.TUN, Method.NAT])
def test_each_clients_error_goes_to_its_own_real_server(method):
    """60 clients over 3 servers by rr: a relay to any server but the client's would be caught
    for about 2/3 of them, so a chance pass is (1/3)**40 at best."""
    d = director(method)
    rs_of = {c: establish(d, c, 1000 + i, sport=4500, natt=True) for i, c in enumerate(CLIENTS)}
    assert len(set(rs_of.values())) == 3
    before = len(d.table)
    for c, rs in rs_of.items():
        for quoted in (server_ike(VIP, c, 4500), server_esp(VIP, c)):
            v = d.decide(craft.icmp_error(ROUTER, VIP, quoted), 2.0)
            assert (v.action, v.rs, v.addr, v.method) == (Action.RELAY_ICMP, rs, RIPS[rs], method)
    assert d.stats["icmp_relayed"] == 2 * len(CLIENTS)
    assert len(d.table) == before  # nothing created


def test_udp_quote_matches_by_port_and_an_init_conversation_counts():
    d = director()
    establish(d, CLIENTS[0], 7, sport=500)
    init = d.decide(craft.ike(CLIENTS[1], VIP, 8, sport=4501), 0.5)  # a conversation still INIT
    v = d.decide(craft.icmp_error(ROUTER, VIP, server_ike(VIP, CLIENTS[1], 4501)), 1.0)
    assert (v.action, v.rs) == (Action.RELAY_ICMP, init.rs)
    for client, port in ((CLIENTS[0], 4501), (CLIENTS[1], 500)):  # the right client, not its port
        v = d.decide(craft.icmp_error(ROUTER, VIP, server_ike(VIP, client, port)), 1.0)
        assert (v.action, v.reason) == (Action.DROP, DropReason.ICMP_NO_ENTRY)


def test_no_conversation_is_dropped_and_counted_and_a_flood_creates_nothing():
    d = director()
    establish(d, CLIENTS[0], 7)
    n = len(d.table)
    for i in range(2000):
        client = ip_to_int("10.0.0.0") + i
        quoted = server_ike(VIP, client, 500 + i % 3000) if i % 2 else server_esp(VIP, client)
        v = d.decide(craft.icmp_error(ROUTER, VIP, quoted), 1.0)
        assert (v.action, v.reason, v.kind) == (Action.DROP, DropReason.ICMP_NO_ENTRY, Kind.NOT_OURS)
    assert d.drops[DropReason.ICMP_NO_ENTRY] == 2000 and d.stats["icmp_relayed"] == 0
    assert len(d.table) == n


def test_errors_the_director_does_not_own_go_to_the_kernel():
    d = director()
    establish(d, CLIENTS[0], 7)
    other = ip_to_int("192.0.2.99")
    cases = [
        craft.icmp_error(ROUTER, VIP, server_esp(other, CLIENTS[0])),  # quoted source is not the VIP
        craft.icmp_error(ROUTER, VIP, build_ipv4_udp(VIP, CLIENTS[0], 22, 40000, b"ssh")),  # not IKE
        craft.icmp_error(ROUTER, VIP, build_ipv4(VIP, CLIENTS[0], 6, bytes(20))),  # TCP
        craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0]), itype=8, code=0),  # echo request
    ]
    for pkt in cases:
        assert d.decide(pkt, 1.0).action == Action.PASS
    assert d.stats["icmp_relayed"] == 0 and not any(d.drops)


# -- the NAT rewrite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ike", "esp", "ike-no-udp-checksum"])
def test_nat_rewrite_matches_what_the_real_server_sent(kind):
    """The relayed error must quote exactly the packet the real server sent: build that packet
    from the RIP (its UDP checksum computed over the whole datagram by build_ipv4_udp), quote it,
    and compare with our rewrite of the error that quoted the VIP's version. scapy builds the
    expected outer packet and ICMP checksum independently."""
    client = CLIENTS[3]
    if kind == "esp":
        from_vip, from_rip = server_esp(VIP, client), server_esp(RIPS[1], client)
    else:
        from_vip, from_rip = server_ike(VIP, client, 4500), server_ike(RIPS[1], client, 4500)
        if kind == "ike-no-udp-checksum":
            from_vip = from_vip[:26] + b"\0\0" + from_vip[28:]
            from_rip = from_rip[:26] + b"\0\0" + from_rip[28:]
    got = icmp_error_dnat(craft.icmp_error(ROUTER, VIP, from_vip, mtu=1280), RIPS[1])
    want = bytes(IP(src="203.0.113.254", dst="198.51.100.2", flags=0, id=0, ttl=64)
                 / ICMP(type=3, code=4, nexthopmtu=1280) / from_rip[:28])
    assert got == want
    assert ref_csum(got[:20]) == 0 and ref_csum(got[20:]) == 0 and ref_csum(got[28:48]) == 0
    if kind == "ike-no-udp-checksum":
        assert got[54:56] == b"\0\0"  # none stays none


def test_nat_rewrite_keeps_a_wrong_icmp_checksum_exactly_as_wrong():
    good = craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0]))
    bad = bytearray(good)
    bad[22] ^= 0x01
    out_good, out_bad = icmp_error_dnat(good, RIPS[0]), icmp_error_dnat(bytes(bad), RIPS[0])
    assert ref_csum(out_good[20:]) == 0 and ref_csum(out_bad[20:]) != 0
    assert out_good[:22] == out_bad[:22] and out_good[24:] == out_bad[24:]


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p[:40], DropReason.IP_TRUNCATED),
    (lambda p: p[:16] + struct.pack(">I", RIPS[0]) + p[20:], DropReason.ICMP_QUOTE_MALFORMED),  # outer dst is not the quoted src
    (lambda p: build_ipv4(ROUTER, VIP, 1, bytes([3, 4, 0, 0])), DropReason.ICMP_TRUNCATED),
])
def test_nat_rewrite_refuses_what_it_cannot_rewrite(mutate, reason):
    with pytest.raises(PacketError) as e:
        icmp_error_dnat(mutate(craft.icmp_error(ROUTER, VIP, server_esp(VIP, CLIENTS[0]))), RIPS[0])
    assert e.value.reason == reason
