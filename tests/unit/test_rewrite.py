"""Unit tests for director.forwarding.rewrite: NAT, IP-in-IP, ICMP unreachable on crafted packets.

Every rewrite is checked twice: against a full recompute of the checksums by the small reference
below (no director code), and against the same packet built by scapy.
"""

import ast
import pathlib
import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP, fragment
from scapy.packet import Raw

from director.drop_reasons import DropReason
from director.forwarding import rewrite
from director.forwarding.rewrite import icmp_unreachable, ipip_decap, ipip_encap, nat_dnat, nat_snat
from director.packet import PacketError, build_ipv4, build_ipv4_udp, int_to_ip, ip_to_int

CLIENT = ip_to_int("192.0.2.10")
VIP = ip_to_int("198.51.100.1")
RIP = ip_to_int("10.1.2.3")
DIRECTOR = ip_to_int("10.1.0.1")
SPI = 0xC0FFEE01
ROUTER_ALERT = b"\x94\x04\x00\x00"  # RFC 2113: one 4-byte option, so IHL 6
SUPPRESSED = DropReason.ICMP_SUPPRESSED


# -- the reference: RFC 1071 from scratch, one 16-bit word at a time -------------------------------


def ones_sum(data: bytes) -> int:
    """Ones' complement sum of the 16-bit words of ``data``, end-around carry folded."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_csum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def ref_recompute(pkt: bytes, rest_of_datagram: bytes = b"") -> bytes:
    """``pkt`` with its checksums computed from scratch: the IP header's, and the UDP one when the
    UDP header is present and its checksum non-zero. For a first fragment, ``rest_of_datagram`` is
    the UDP data carried by the later fragments (the UDP checksum covers the whole datagram)."""
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    total = struct.unpack_from("!H", buf, 2)[0]
    frag = struct.unpack_from("!H", buf, 6)[0]
    if buf[9] == 17 and not frag & 0x1FFF and struct.unpack_from("!H", buf, ihl + 6)[0]:
        udp = bytearray(buf[ihl:total] + rest_of_datagram)
        udp[6:8] = b"\x00\x00"
        ulen = struct.unpack_from("!H", udp, 4)[0]
        assert ulen == len(udp), "reference needs the whole datagram"
        pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, 17, ulen)
        struct.pack_into("!H", buf, ihl + 6, ref_csum(pseudo + bytes(udp)) or 0xFFFF)
    buf[10:12] = b"\x00\x00"
    struct.pack_into("!H", buf, 10, ref_csum(bytes(buf[:ihl])))
    return bytes(buf)


def with_fields(pkt: bytes, *, dst=None, src=None, dport=None, sport=None) -> bytes:
    """``pkt`` with fields overwritten and checksums left stale (the reference recomputes them)."""
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    if src is not None:
        struct.pack_into("!I", buf, 12, src)
    if dst is not None:
        struct.pack_into("!I", buf, 16, dst)
    if sport is not None:
        struct.pack_into("!H", buf, ihl, sport)
    if dport is not None:
        struct.pack_into("!H", buf, ihl + 2, dport)
    return bytes(buf)


def udp_csum_field(pkt: bytes) -> int:
    ihl = (pkt[0] & 0x0F) * 4
    return struct.unpack_from("!H", pkt, ihl + 6)[0]


def ip_header_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    return ones_sum(pkt[:ihl]) == 0xFFFF


def reason(fn, *args, **kw) -> DropReason:
    with pytest.raises(PacketError) as info:
        fn(*args, **kw)
    return info.value.reason


# -- packets ---------------------------------------------------------------------------------------


def ike_udp(payload_len: int = 72, sport: int = 500, dport: int = 500, src=CLIENT, dst=VIP) -> bytes:
    return build_ipv4_udp(src, dst, sport, dport, bytes((7 * i) & 0xFF for i in range(payload_len)))


def esp(size: int, src=CLIENT, dst=VIP, flags_frag: int = 0x4000, tos: int = 0) -> bytes:
    body = struct.pack("!II", SPI, 42) + bytes((i * 13) & 0xFF for i in range(size - 28))
    return build_ipv4(src, dst, 50, body, flags_frag=flags_frag, tos=tos, ident=0x1D)


def zero_udp_csum(pkt: bytes) -> bytes:
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    buf[ihl + 6 : ihl + 8] = b"\x00\x00"
    return bytes(buf)


UDP_100 = ike_udp()
ESP_1400 = esp(1400)


def test_fixtures_are_what_they_claim():
    assert len(UDP_100) == 100 and len(ESP_1400) == 1400
    for pkt in (UDP_100, ESP_1400):
        assert ref_recompute(pkt) == pkt  # checksums correct before any rewrite
    assert udp_csum_field(UDP_100) != 0


# -- scapy's view of the same rewrites --------------------------------------------------------------


def scapy_nat(pkt: bytes, *, dst=None, src=None, dport=None, sport=None) -> bytes:
    """The rewrite done by scapy (unfragmented packets and non-first fragments only)."""
    s = IP(pkt)
    if dst is not None:
        s.dst = int_to_ip(dst)
    if src is not None:
        s.src = int_to_ip(src)
    del s.chksum
    if UDP in s:
        assert s.frag == 0 and not s.flags.MF, "scapy checksums one fragment, not the datagram"
        if dport is not None:
            s[UDP].dport = dport
        if sport is not None:
            s[UDP].sport = sport
        if s[UDP].chksum:  # zero stays zero; otherwise scapy recomputes it
            del s[UDP].chksum
    return bytes(s)


# -- NAT -------------------------------------------------------------------------------------------

NAT_CASES = {
    "udp": UDP_100,
    "udp-zero-csum": zero_udp_csum(UDP_100),
    "udp-natt-4500": ike_udp(120, 4500, 4500),
    "esp": ESP_1400,
    "esp-small": esp(60),
    "ah": build_ipv4(CLIENT, VIP, 51, struct.pack("!BBHII", 50, 4, 0, SPI, 1) + bytes(12) + b"payload!"),
    # IHL 6. The UDP checksum does not cover IP options: the UDP part of UDP_100 is still right.
    "udp-ihl6": build_ipv4(CLIENT, VIP, 17, UDP_100[20:], options=ROUTER_ALERT),
    "esp-ihl6": build_ipv4(CLIENT, VIP, 50, ESP_1400[20:], options=ROUTER_ALERT),
    # Non-first fragments: the last one (offset 185 * 8) and a middle one (MF, offset 7 * 8).
    "non-first-fragment-udp": build_ipv4(CLIENT, VIP, 17, bytes(range(200)), flags_frag=185),
    "non-first-fragment-esp": build_ipv4(CLIENT, VIP, 50, bytes(range(64)), flags_frag=0x2000 | 7),
}


@pytest.mark.parametrize("name", sorted(NAT_CASES))
@pytest.mark.parametrize("port", [None, 14500])
def test_dnat_matches_full_recompute_and_scapy(name, port):
    pkt = NAT_CASES[name]
    assert ref_recompute(pkt) == pkt
    is_udp_header = name.startswith("udp")
    got = nat_dnat(pkt, RIP, port)
    want = ref_recompute(with_fields(pkt, dst=RIP, dport=port if is_udp_header else None))
    assert got == want
    assert got == scapy_nat(pkt, dst=RIP, dport=port if is_udp_header else None)
    assert type(got) is bytes and len(got) == len(pkt)
    assert got != pkt and got[16:20] == struct.pack("!I", RIP)


@pytest.mark.parametrize("name", sorted(NAT_CASES))
@pytest.mark.parametrize("port", [None, 1024])
def test_snat_matches_full_recompute_and_scapy(name, port):
    # The reply direction: swap addresses so the packet comes from the real server to the client.
    pkt = NAT_CASES[name]
    reply = ref_recompute(with_fields(pkt, src=RIP, dst=CLIENT))
    is_udp_header = name.startswith("udp")
    got = nat_snat(reply, VIP, port)
    want = ref_recompute(with_fields(reply, src=VIP, sport=port if is_udp_header else None))
    assert got == want
    assert got == scapy_nat(reply, src=VIP, sport=port if is_udp_header else None)


def test_dnat_changes_exactly_the_expected_bytes():
    got = nat_dnat(UDP_100, RIP, 4500)
    changed = {i for i in range(100) if got[i] != UDP_100[i]}
    allowed = set(range(10, 12)) | set(range(16, 20)) | {22, 23, 26, 27}  # IP csum, dst, dport, UDP csum
    assert changed and changed <= allowed
    assert got[16:20] == struct.pack("!I", RIP) and got[22:24] == struct.pack("!H", 4500)


def test_zero_udp_checksum_stays_zero():
    pkt = zero_udp_csum(UDP_100)
    for got in (nat_dnat(pkt, RIP), nat_dnat(pkt, RIP, 4500), nat_snat(pkt, RIP, 4500)):
        assert udp_csum_field(got) == 0
        assert ip_header_ok(got)


def test_esp_payload_untouched():
    got = nat_dnat(ESP_1400, RIP, 4500)  # the port is ignored: ESP has none
    assert got[20:] == ESP_1400[20:]
    assert got[:10] == ESP_1400[:10] and got[12:16] == ESP_1400[12:16]
    assert ip_header_ok(got)


def test_first_fragment_udp_checksum_covers_the_datagram():
    data = bytes((3 * i) & 0xFF for i in range(400))
    whole = build_ipv4_udp(CLIENT, VIP, 500, 500, data, ident=0x77, flags_frag=0)
    udp = whole[20:]
    first = build_ipv4(CLIENT, VIP, 17, udp[:208], ident=0x77, flags_frag=0x2000)  # MF, offset 0
    got = nat_dnat(first, RIP, 4500)
    want = ref_recompute(with_fields(first, dst=RIP, dport=4500), rest_of_datagram=udp[208:])
    assert got == want
    # scapy: build the rewritten datagram whole, let scapy fragment it, compare the first piece.
    s = IP(src=int_to_ip(CLIENT), dst=int_to_ip(RIP), id=0x77, flags=0, ttl=64) / UDP(
        sport=500, dport=4500
    ) / Raw(data)
    assert got == bytes(fragment(s, fragsize=208)[0])
    assert udp_csum_field(got) != udp_csum_field(first)


def test_first_fragment_too_short_for_udp_header():
    tiny = build_ipv4(CLIENT, VIP, 17, b"\x01\xf4\x01\xf4", flags_frag=0x2000)  # RFC 1858 tiny fragment
    assert reason(nat_dnat, tiny, RIP) == DropReason.UDP_TRUNCATED
    assert reason(nat_snat, tiny, RIP) == DropReason.UDP_TRUNCATED


def test_non_first_fragment_changes_ip_header_only():
    pkt = NAT_CASES["non-first-fragment-udp"]
    got = nat_dnat(pkt, RIP, 4500)  # the "port" bytes here are data: they must not move
    assert got[20:] == pkt[20:]
    assert got == ref_recompute(with_fields(pkt, dst=RIP))


def _udp_whose_checksum_becomes_zero_at(dst: int) -> bytes:
    """A UDP packet to VIP built so that, readdressed to ``dst``, its checksum computes to 0."""
    data = bytearray(b"\x00\x00" + bytes(range(30)))
    probe = build_ipv4_udp(CLIENT, dst, 500, 500, bytes(data))
    udp = bytearray(probe[20:])
    udp[6:8] = b"\x00\x00"
    pseudo = struct.pack("!IIBBH", CLIENT, dst, 0, 17, len(udp))
    s = ones_sum(pseudo + bytes(udp))
    struct.pack_into("!H", data, 0, (-s) % 0xFFFF)  # now the folded sum is 0xFFFF: checksum 0
    assert ref_csum(pseudo + bytes(udp[:8]) + bytes(data)) == 0
    return build_ipv4_udp(CLIENT, VIP, 500, 500, bytes(data))


def test_udp_checksum_zero_result_is_sent_as_ffff():
    pkt = _udp_whose_checksum_becomes_zero_at(RIP)
    got = nat_dnat(pkt, RIP)
    assert udp_csum_field(got) == 0xFFFF
    assert got == ref_recompute(with_fields(pkt, dst=RIP))
    assert got == scapy_nat(pkt, dst=RIP)
    # ... and from 0xFFFF (~0xFFFF is 0) back again: the original bytes.
    assert nat_dnat(got, VIP) == pkt


def _address_zeroing_ip_checksum(pkt: bytes, offset: int) -> int:
    """An address 10.1.x.y that, written at ``offset``, makes the full-recompute IP checksum 0x0000."""
    header = bytearray(pkt[:20])
    header[10:12] = b"\x00\x00"
    header[offset : offset + 4] = b"\x00\x00\x00\x00"
    low = (-(ones_sum(bytes(header)) + 0x0A01)) % 0xFFFF  # then the header folds to 0xFFFF
    return 0x0A010000 | low


@pytest.mark.parametrize("name", ["esp", "udp"])
def test_ip_checksum_zero_result_matches_full_recompute(name):
    # A folded sum of 0xFFFF gives checksum 0x0000 on a full recompute. 0xFFFF would verify too,
    # but the bytes must be the recompute's, and the way back must give the original again.
    pkt = NAT_CASES[name]
    new_dst = _address_zeroing_ip_checksum(pkt, 16)
    got = nat_dnat(pkt, new_dst)
    assert got[10:12] == b"\x00\x00"
    assert got == ref_recompute(with_fields(pkt, dst=new_dst)) == scapy_nat(pkt, dst=new_dst)
    assert nat_dnat(got, VIP) == pkt
    new_src = _address_zeroing_ip_checksum(pkt, 12)
    got = nat_snat(pkt, new_src)
    assert got[10:12] == b"\x00\x00"
    assert got == ref_recompute(with_fields(pkt, src=new_src)) == scapy_nat(pkt, src=new_src)
    assert nat_snat(got, CLIENT) == pkt


def test_incremental_update_keeps_a_wrong_checksum_exactly_as_wrong():
    bad = bytearray(UDP_100)
    struct.pack_into("!H", bad, 10, struct.unpack_from("!H", bad, 10)[0] ^ 0x0101)
    struct.pack_into("!H", bad, 26, struct.unpack_from("!H", bad, 26)[0] ^ 0x0404)
    got = nat_dnat(bytes(bad), RIP, 4500)
    assert ones_sum(got[:20]) == ones_sum(bytes(bad[:20])) != 0xFFFF  # not silently repaired
    pseudo_old = bytes(bad[12:20]) + struct.pack("!BBH", 0, 17, 80)
    pseudo_new = bytes(got[12:20]) + struct.pack("!BBH", 0, 17, 80)
    assert ones_sum(pseudo_new + got[20:]) == ones_sum(pseudo_old + bytes(bad[20:])) != 0xFFFF


@pytest.mark.parametrize("name", sorted(NAT_CASES))
def test_nat_round_trip_restores_the_bytes(name):
    pkt = NAT_CASES[name]
    ihl = (pkt[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", pkt, ihl)  # data bytes unless a UDP header is there
    there = nat_dnat(pkt, RIP, 4500)
    assert there != pkt
    assert nat_dnat(there, VIP, dport) == pkt
    back = nat_snat(pkt, RIP, 4500)
    assert back != pkt
    assert nat_snat(back, CLIENT, sport) == pkt


def test_nat_both_sides_round_trip():
    pkt = UDP_100
    there = nat_snat(nat_dnat(pkt, RIP, 4500), DIRECTOR, 1500)
    assert nat_snat(nat_dnat(there, VIP, 500), CLIENT, 500) == pkt


def test_truncated_copy_refused():
    for fn, addr in ((nat_dnat, RIP), (nat_snat, VIP)):
        for pkt in (UDP_100, ESP_1400):
            assert reason(fn, pkt[:-1], addr) == DropReason.IP_TRUNCATED
            assert reason(fn, pkt[:64], addr) == DropReason.IP_TRUNCATED
        assert reason(fn, UDP_100[:19], addr) == DropReason.IP_TRUNCATED


def test_nat_malformed_headers():
    v6 = b"\x55" + UDP_100[1:]
    assert reason(nat_dnat, v6, RIP) == DropReason.IP_BAD_VERSION
    ihl4 = b"\x44" + UDP_100[1:]
    assert reason(nat_dnat, ihl4, RIP) == DropReason.IP_BAD_IHL
    short_total = UDP_100[:2] + struct.pack("!H", 19) + UDP_100[4:]
    assert reason(nat_snat, short_total, RIP) == DropReason.IP_BAD_TOTAL_LENGTH


def test_padding_past_total_length_is_dropped():
    got = nat_dnat(UDP_100 + b"\x00" * 6, RIP)
    assert got == nat_dnat(UDP_100, RIP)


def test_buffer_types():
    want = nat_dnat(UDP_100, RIP, 4500)
    assert nat_dnat(bytearray(UDP_100), RIP, 4500) == want
    assert nat_dnat(memoryview(UDP_100), RIP, 4500) == want
    assert type(nat_dnat(bytearray(UDP_100), RIP)) is bytes
    assert ipip_encap(memoryview(UDP_100).cast("H"), DIRECTOR, RIP, ident=1) == ipip_encap(
        UDP_100, DIRECTOR, RIP, ident=1
    )


def test_input_not_modified():
    buf = bytearray(UDP_100)
    nat_dnat(buf, RIP, 4500)
    nat_snat(buf, RIP, 4500)
    assert bytes(buf) == UDP_100


# -- IP-in-IP --------------------------------------------------------------------------------------


def test_encap_1500_byte_df_packet():
    inner = esp(1500, flags_frag=0x4000, tos=0xB9)  # DF; DSCP EF (46), ECN ECT(1)
    assert len(inner) == 1500
    got = ipip_encap(inner, DIRECTOR, RIP, ident=0x1234)
    assert len(got) == 1520
    assert got[20:] == inner  # untouched, DF and all
    assert struct.unpack_from("!H", got, 26)[0] & 0x4000  # the inner DF is still set
    vihl, tos, total, ident, flags_frag, ttl, proto, csum, src, dst = struct.unpack_from(
        "!BBHHHBBHII", got
    )
    assert (vihl, tos, total, ident, flags_frag, ttl, proto) == (0x45, 0xB9, 1520, 0x1234, 0, 64, 4)
    assert flags_frag & 0x4000 == 0  # DF clear on the envelope: it may be fragmented, the inner not
    assert (src, dst) == (DIRECTOR, RIP)
    assert csum == ref_csum(got[:10] + b"\x00\x00" + got[12:20])
    want = IP(src=int_to_ip(DIRECTOR), dst=int_to_ip(RIP), tos=0xB9, id=0x1234, flags=0, ttl=64, proto=4)
    assert got == bytes(want / Raw(inner))


@pytest.mark.parametrize("tos", [0x00, 0x01, 0x02, 0x03, 0xB8, 0xBB, 0xFF])
def test_encap_copies_tos_and_ecn(tos):
    # RFC 6040 normal mode: the ECN field is copied, Congestion Experienced (3) included.
    inner = esp(100, tos=tos)
    got = ipip_encap(inner, DIRECTOR, RIP, ident=9)
    assert got[1] == tos
    assert ip_header_ok(got)


def test_encap_ident_and_checksum_edges():
    inner = UDP_100
    assert struct.unpack_from("!H", ipip_encap(inner, DIRECTOR, RIP, ident=0x12345), 4)[0] == 0x2345
    for ident in (0, 1, 0xFFFF):
        for src, dst in ((0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (DIRECTOR, RIP)):
            got = ipip_encap(inner, src, dst, ident=ident)
            assert got[10:12] == struct.pack("!H", ref_csum(got[:10] + b"\x00\x00" + got[12:20]))
            want = IP(src=int_to_ip(src), dst=int_to_ip(dst), id=ident, flags=0, ttl=64, proto=4)
            assert got == bytes(want / Raw(inner))


def test_encap_refuses_truncated_and_malformed():
    assert reason(ipip_encap, UDP_100[:99], DIRECTOR, RIP, ident=1) == DropReason.IP_TRUNCATED
    assert reason(ipip_encap, UDP_100[:10], DIRECTOR, RIP, ident=1) == DropReason.IP_TRUNCATED
    assert reason(ipip_encap, b"\x65" + UDP_100[1:], DIRECTOR, RIP, ident=1) == DropReason.IP_BAD_VERSION
    assert reason(ipip_encap, b"\x43" + UDP_100[1:], DIRECTOR, RIP, ident=1) == DropReason.IP_BAD_IHL
    huge = build_ipv4(CLIENT, VIP, 50, bytes(65535 - 20))
    assert reason(ipip_encap, huge, DIRECTOR, RIP, ident=1) == DropReason.IP_BAD_TOTAL_LENGTH
    just_fits = build_ipv4(CLIENT, VIP, 50, bytes(65515 - 20))
    assert len(ipip_encap(just_fits, DIRECTOR, RIP, ident=1)) == 65535


def test_encap_drops_padding():
    assert ipip_encap(UDP_100 + b"\x00\x00", DIRECTOR, RIP, ident=3) == ipip_encap(
        UDP_100, DIRECTOR, RIP, ident=3
    )


def test_encap_decap_round_trip():
    for pkt in (UDP_100, ESP_1400, NAT_CASES["udp-ihl6"], NAT_CASES["non-first-fragment-esp"]):
        assert ipip_decap(ipip_encap(pkt, DIRECTOR, RIP, ident=77)) == pkt


def test_decap_refusals():
    wrapped = ipip_encap(UDP_100, DIRECTOR, RIP, ident=5)
    assert reason(ipip_decap, UDP_100) == DropReason.IP_BAD_VERSION  # protocol 17, not 4
    assert reason(ipip_decap, wrapped[:-1]) == DropReason.IP_TRUNCATED
    for flags_frag in (0x2000, 0x0003, 0x4001):  # MF; a later fragment; DF with an offset
        # Even when the bytes happen to hold a whole inner packet, a fragment is not decapsulated.
        outer_fragment = build_ipv4(DIRECTOR, RIP, 4, UDP_100, flags_frag=flags_frag)
        assert reason(ipip_decap, outer_fragment) == DropReason.IP_TRUNCATED
    not_ipv4_inside = build_ipv4(DIRECTOR, RIP, 4, b"\x60" + UDP_100[1:])
    assert reason(ipip_decap, not_ipv4_inside) == DropReason.IP_BAD_VERSION
    inner_says_longer = build_ipv4(DIRECTOR, RIP, 4, UDP_100[:60])
    assert reason(ipip_decap, inner_says_longer) == DropReason.IP_TRUNCATED
    inner_says_shorter = build_ipv4(DIRECTOR, RIP, 4, UDP_100 + b"\x00\x00\x00\x00")
    assert reason(ipip_decap, inner_says_shorter) == DropReason.IP_BAD_TOTAL_LENGTH
    too_small_inside = build_ipv4(DIRECTOR, RIP, 4, UDP_100[:12])
    assert reason(ipip_decap, too_small_inside) == DropReason.IP_TRUNCATED


# -- ICMP protocol unreachable ---------------------------------------------------------------------


def scapy_unreachable(orig: bytes, quote_len: int, code: int = 2, ttl: int = 64) -> bytes:
    o = IP(orig)
    s = IP(src=int_to_ip(VIP), dst=o.src, tos=0xC0, id=0, flags="DF", ttl=ttl, proto=1)
    return bytes(s / ICMP(type=3, code=code) / Raw(orig[:quote_len]))


ICMP_CASES = {
    "udp": (UDP_100, 28),
    "esp": (ESP_1400, 28),
    "ihl6": (NAT_CASES["esp-ihl6"], 32),
    "short-payload-odd": (build_ipv4(CLIENT, VIP, 47, b"\x01\x02\x03"), 23),  # quote of odd length
    "no-payload": (build_ipv4(CLIENT, VIP, 50, b""), 20),
    "first-fragment": (build_ipv4(CLIENT, VIP, 50, ESP_1400[20:120], flags_frag=0x2000), 28),
    "icmp-echo": (build_ipv4(CLIENT, VIP, 1, b"\x08\x00\xf7\xff\x00\x00\x00\x00extra"), 28),
    "padded": (esp(40) + b"\xaa" * 10, 28),
    "truncated-copy": (ESP_1400[:200], 28),  # the header and 8 bytes are here: enough to quote
}


@pytest.mark.parametrize("name", sorted(ICMP_CASES))
def test_icmp_unreachable_matches_reference_and_scapy(name):
    orig, quote_len = ICMP_CASES[name]
    got = icmp_unreachable(orig, VIP)
    assert len(got) == 28 + quote_len
    assert got[28:] == orig[:quote_len]
    assert ip_header_ok(got)
    assert ones_sum(got[20:]) == 0xFFFF  # ICMP checksum over the whole ICMP message
    assert got[20:22] == b"\x03\x02" and got[24:28] == b"\x00" * 4  # type, code; unused
    assert struct.unpack_from("!II", got, 12) == (VIP, struct.unpack_from("!I", orig, 12)[0])
    assert got == scapy_unreachable(orig, quote_len)


def test_icmp_unreachable_code_and_ttl():
    got = icmp_unreachable(UDP_100, VIP, code=3, ttl=255)  # port unreachable
    assert got[8] == 255 and got[20:22] == b"\x03\x03"
    assert got == scapy_unreachable(UDP_100, 28, code=3, ttl=255)


def _from(src: str, dst: str = "198.51.100.1", proto: int = 50, payload: bytes = b"\x00" * 16, **kw):
    return build_ipv4(ip_to_int(src), ip_to_int(dst), proto, payload, **kw)


@pytest.mark.parametrize(
    "orig",
    [
        pytest.param(icmp_unreachable(UDP_100, VIP), id="icmp-dest-unreachable"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b"\x0b\x00" + bytes(34)), id="icmp-time-exceeded"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b"\x04\x00" + bytes(34)), id="icmp-source-quench"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b"\x05\x01" + bytes(34)), id="icmp-redirect"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b"\x0c\x00" + bytes(34)), id="icmp-param-problem"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b"\x28\x00" + bytes(34)), id="icmp-type-40"),
        pytest.param(_from("192.0.2.10", proto=1, payload=b""), id="icmp-without-type"),
        pytest.param(_from("192.0.2.10", flags_frag=0x0001), id="non-first-fragment"),
        pytest.param(_from("192.0.2.10", flags_frag=0x2000 | 100), id="middle-fragment"),
        pytest.param(_from("192.0.2.10", dst="224.0.0.5"), id="dst-multicast"),
        pytest.param(_from("192.0.2.10", dst="239.255.255.250"), id="dst-multicast-high"),
        pytest.param(_from("192.0.2.10", dst="255.255.255.255"), id="dst-limited-broadcast"),
        pytest.param(_from("0.0.0.0"), id="src-zero"),
        pytest.param(_from("127.0.0.1"), id="src-loopback"),
        pytest.param(_from("224.0.0.1"), id="src-multicast"),
        pytest.param(_from("240.0.0.1"), id="src-class-e"),
        pytest.param(_from("255.255.255.255"), id="src-broadcast"),
    ],
)
def test_icmp_refused(orig):
    assert reason(icmp_unreachable, orig, VIP) == SUPPRESSED


def test_icmp_allowed_neighbours_of_the_refusals():
    # Just inside each boundary: these must be answered.
    for orig in (
        _from("1.0.0.1"),
        _from("126.255.255.255"),
        _from("128.0.0.1"),
        _from("223.255.255.255"),
        _from("192.0.2.10", dst="223.255.255.255"),
        _from("192.0.2.10", proto=1, payload=b"\x08\x00" + bytes(6)),  # echo request
        _from("192.0.2.10", proto=1, payload=b"\x12\x00" + bytes(6)),  # type 18, a query
        _from("192.0.2.10", flags_frag=0x2000),  # first fragment
    ):
        got = icmp_unreachable(orig, VIP)
        assert ip_header_ok(got) and ones_sum(got[20:]) == 0xFFFF


def test_icmp_malformed_originals():
    assert reason(icmp_unreachable, UDP_100[:19], VIP) == DropReason.IP_TRUNCATED
    assert reason(icmp_unreachable, UDP_100[:27], VIP) == DropReason.IP_TRUNCATED  # 7 of 8 bytes
    assert reason(icmp_unreachable, b"\x65" + UDP_100[1:], VIP) == DropReason.IP_BAD_VERSION
    assert reason(icmp_unreachable, b"\x44" + UDP_100[1:], VIP) == DropReason.IP_BAD_IHL
    bad_total = UDP_100[:2] + struct.pack("!H", 16) + UDP_100[4:]
    assert reason(icmp_unreachable, bad_total, VIP) == DropReason.IP_BAD_TOTAL_LENGTH
    ihl15 = b"\x4f" + UDP_100[1:40]
    assert reason(icmp_unreachable, ihl15, VIP) == DropReason.IP_TRUNCATED


# -- purity ----------------------------------------------------------------------------------------


def test_rewrite_imports_nothing_but_struct_and_director():
    for path, extra in ((pathlib.Path(rewrite.__file__), {"director.forwarding.rewrite6"}),
                        (pathlib.Path(rewrite.__file__).with_name("rewrite6.py"), set())):  # fmt: skip
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        assert imported == {"struct", "director.drop_reasons", "director.packet"} | extra, path
