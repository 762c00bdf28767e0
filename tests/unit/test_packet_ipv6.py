"""Unit tests for the IPv6 half of director.packet: the extension-header walk, every IPv6 drop
reason, fragments, ICMPv6 errors and the builders (checked against scapy's bytes)."""

import pytest
import scapy.all as S

from director.drop_reasons import DropReason
from director.packet import (
    MAX_EXT_HEADERS,
    EspHeader,
    Kind,
    PacketError,
    build_ipv4_udp,
    build_ipv6,
    build_ipv6_udp,
    classify,
    ike_header,
    int_to_ip,
    ip_to_int,
    is_ipv6,
    parse_icmp_error,
    upper_checksum6,
)

CLIENT = ip_to_int("2001:db8:c::10")
VIP = ip_to_int("2001:db8:f::1")
SPI_I = 0x0102030405060708
ESP = EspHeader(0x11223344, 7).to_bytes() + b"\x99" * 24
HBH = (0, b"\x01\x04\x00\x00\x00\x00")  # PadN option: 8 bytes in all
DST = (60, b"\x01\x04\x00\x00\x00\x00")
RH_DONE = (43, b"\x00\x00\x00\x00\x00\x00")  # routing type 0, segments left 0
RH_LEFT = (43, b"\x00\x01\x00\x00\x00\x00")  # segments left 1


def frag(offset: int, more: bool, ident: int = 0x1234) -> tuple[int, bytes]:
    return 44, (offset << 3 | more).to_bytes(2, "big") + ident.to_bytes(4, "big")


def reason_of(data) -> DropReason:
    with pytest.raises(PacketError) as info:
        classify(data)
    return info.value.reason


def test_addresses_say_their_family():
    assert is_ipv6(CLIENT) and not is_ipv6(ip_to_int("255.255.255.255"))
    assert int_to_ip(ip_to_int("2001:0db8:0000:0000:0000:0000:0000:0001")) == "2001:db8::1"  # RFC 5952
    assert int_to_ip(ip_to_int("::ffff:192.0.2.1")) == "::ffff:c000:201"
    for bad in ("::", "::1", "::192.0.2.1"):
        with pytest.raises(ValueError, match="::/96"):
            ip_to_int(bad)


def test_builders_match_scapy():
    ike = ike_header(SPI_I, 0, 34)
    want = S.IPv6(src=int_to_ip(CLIENT), dst=int_to_ip(VIP)) / S.UDP(sport=500, dport=500) / ike
    assert build_ipv6_udp(CLIENT, VIP, 500, 500, ike) == bytes(want)
    chained = build_ipv6(CLIENT, VIP, 50, ESP, ext=(HBH, DST))
    want = (S.IPv6(src=int_to_ip(CLIENT), dst=int_to_ip(VIP)) / S.IPv6ExtHdrHopByHop(options=[S.PadN(optdata=b"\0" * 4)])
            / S.IPv6ExtHdrDestOpt(options=[S.PadN(optdata=b"\0" * 4)]) / S.Raw(ESP))  # fmt: skip
    want[S.IPv6ExtHdrDestOpt].nh = 50
    assert chained == bytes(want)


@pytest.mark.parametrize("ext", [(), (HBH,), (DST,), (RH_DONE,), (HBH, DST, RH_DONE, DST), (frag(0, False),),
                                 (HBH, frag(0, False), DST)])  # fmt: skip
def test_esp_behind_any_walked_chain(ext):
    pkt = build_ipv6(CLIENT, VIP, 50, ESP, ext=ext)
    c = classify(pkt)
    assert (c.kind, c.src, c.dst, c.proto, c.spi) == (Kind.ESP, CLIENT, VIP, 50, 0x11223344)
    assert c.l4_offset == 40 + 8 * len(ext) and c.wire_len == len(pkt)


@pytest.mark.parametrize("port,body,kind", [
    (500, ike_header(SPI_I, 0, 34), Kind.IKE_INITIAL),
    (500, ike_header(SPI_I, 5, 35), Kind.IKE),
    (4500, b"\0\0\0\0" + ike_header(SPI_I, 5, 35), Kind.IKE),
    (4500, ESP, Kind.ESP_IN_UDP),
    (4500, b"\xff", Kind.NATT_KEEPALIVE),
])  # fmt: skip
def test_udp_kinds_agree_with_ipv4(port, body, kind):
    six = classify(build_ipv6_udp(CLIENT, VIP, 4500, port, body))
    four = classify(build_ipv4_udp(7, 8, 4500, port, body))
    assert six.kind == four.kind == kind
    assert six._replace(src=0, dst=0, l4_offset=0, wire_len=0) == four._replace(src=0, dst=0, l4_offset=0, wire_len=0)


def test_ah_ends_the_walk_and_gives_its_spi():
    ah = bytes([50, 4, 0, 0]) + (0xABCDEF01).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\0" * 12
    c = classify(build_ipv6(CLIENT, VIP, 51, ah + ESP, ext=(DST,)))
    assert (c.kind, c.spi, c.l4_offset) == (Kind.AH, 0xABCDEF01, 48)


@pytest.mark.parametrize("offset,more", [(0, True), (1, False), (100, True)])
def test_real_fragments_are_left_to_the_stack(offset, more):
    c = classify(build_ipv6(CLIENT, VIP, 17, b"\0" * 16, ext=(DST, frag(offset, more))))
    assert (c.kind, c.proto, c.src) == (Kind.FRAGMENT, 17, CLIENT)


def test_routing_header_with_segments_left_is_not_ours():
    c = classify(build_ipv6(CLIENT, VIP, 50, ESP, ext=(RH_LEFT,)))
    assert (c.kind, c.proto) == (Kind.NOT_OURS, 43)


def test_no_next_header_and_tcp_are_not_ours():
    assert classify(build_ipv6(CLIENT, VIP, 59, b"")).kind == Kind.NOT_OURS
    assert classify(build_ipv6(CLIENT, VIP, 6, b"\0" * 20)).kind == Kind.NOT_OURS


def test_chain_bound():
    ok = build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,) * MAX_EXT_HEADERS)
    assert classify(ok).kind == Kind.ESP
    assert reason_of(build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,) * (MAX_EXT_HEADERS + 1))) \
        is DropReason.IP6_EXT_CHAIN_TOO_LONG


def test_hop_by_hop_only_first():
    assert reason_of(build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST, HBH))) is DropReason.IP6_BAD_HOP_BY_HOP


@pytest.mark.parametrize("cut", [41, 47, 55])
def test_extension_header_truncated_in_the_buffer(cut):
    pkt = build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST, (60, b"\x01\x0c" + b"\0" * 12)))
    assert reason_of(pkt[:cut]) is DropReason.IP6_EXT_TRUNCATED


def test_extension_header_beyond_the_payload_length():
    pkt = build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,), payload_length=4)
    assert reason_of(pkt) is DropReason.IP6_EXT_TRUNCATED
    big = bytearray(build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,)))
    big[41] = 31  # the destination options header now says 256 bytes; the packet has 40
    assert reason_of(bytes(big)) is DropReason.IP6_EXT_TRUNCATED


def test_upper_layer_lengths_are_checked_against_the_payload_length():
    pkt = build_ipv6(CLIENT, VIP, 50, ESP, ext=(DST,), payload_length=8 + 4)
    assert reason_of(pkt) is DropReason.ESP_TRUNCATED
    udp = build_ipv6_udp(CLIENT, VIP, 500, 500, ike_header(SPI_I, 0, 34))
    assert reason_of(udp[:4] + (20).to_bytes(2, "big") + udp[6:]) is DropReason.UDP_BAD_LENGTH


@pytest.mark.parametrize("src,dst", [("::", "2001:db8:f::1"), ("2001:db8::1", "::1"), ("::10.0.0.1", "2001:db8::1")])
def test_addresses_in_the_ipv4_compatible_block_are_refused(src, dst):
    pkt = bytearray(build_ipv6(CLIENT, VIP, 50, ESP))
    import ipaddress
    pkt[8:24] = ipaddress.IPv6Address(src).packed
    pkt[24:40] = ipaddress.IPv6Address(dst).packed
    assert reason_of(bytes(pkt)) is DropReason.IP6_BAD_ADDRESS


@pytest.mark.parametrize("cut", range(0, 40))
def test_short_header(cut):
    if cut == 0:
        assert reason_of(b"") is DropReason.IP_TRUNCATED
    else:
        assert reason_of(build_ipv6(CLIENT, VIP, 50, ESP)[:cut]) is DropReason.IP_TRUNCATED


# -- ICMPv6 errors --------------------------------------------------------------------------------


def icmp6(itype: int, code: int, quote: bytes, word: int = 1280, src: int = ip_to_int("2001:db8:99::1")) -> bytes:
    body = bytes([itype, code, 0, 0]) + word.to_bytes(4, "big") + quote
    csum = upper_checksum6(src, VIP, 58, body)
    return build_ipv6(src, VIP, 58, body[:2] + csum.to_bytes(2, "big") + body[4:])


def test_packet_too_big_quoting_esp_through_extension_headers():
    quoted = build_ipv6(VIP, CLIENT, 50, ESP, ext=(DST,))
    e = parse_icmp_error(icmp6(2, 0, quoted))
    assert (e.type, e.qproto, e.qsrc, e.qdst, e.qspi, e.qfirst, e.dst) == (2, 50, VIP, CLIENT, 0x11223344, True, VIP)
    assert e.quote_offset == 48
    want = S.IPv6(src="2001:db8:99::1", dst=int_to_ip(VIP)) / S.ICMPv6PacketTooBig(mtu=1280) / S.Raw(quoted)
    assert icmp6(2, 0, quoted) == bytes(want)  # the checksum is right


def test_time_exceeded_quoting_nat_t_ports():
    quoted = build_ipv6_udp(VIP, CLIENT, 4500, 31000, ESP)
    e = parse_icmp_error(icmp6(3, 0, quoted))
    assert (e.qproto, e.qsport, e.qdport, e.qfirst) == (17, 4500, 31000, True)


def test_quote_of_a_non_first_fragment_has_no_ports():
    quoted = build_ipv6(VIP, CLIENT, 17, b"\0" * 24, ext=(frag(3, True),))
    e = parse_icmp_error(icmp6(1, 0, quoted))
    assert (e.qproto, e.qsport, e.qfirst) == (17, 0, False)


def test_icmp6_non_errors_and_faults():
    assert parse_icmp_error(icmp6(128, 0, b"\0" * 40)) is None  # echo request: the kernel's
    quoted = build_ipv6(VIP, CLIENT, 50, ESP)
    with pytest.raises(PacketError) as info:
        parse_icmp_error(icmp6(2, 0, quoted[:39]))
    assert info.value.reason is DropReason.ICMP_QUOTE_TRUNCATED
    with pytest.raises(PacketError) as info:
        parse_icmp_error(icmp6(2, 0, quoted[:44]))
    assert info.value.reason is DropReason.ICMP_QUOTE_TRUNCATED
    with pytest.raises(PacketError) as info:
        parse_icmp_error(icmp6(2, 0, b"\x45" + quoted[1:]))
    assert info.value.reason is DropReason.ICMP_QUOTE_MALFORMED
    with pytest.raises(PacketError) as info:
        parse_icmp_error(build_ipv6(CLIENT, VIP, 58, b"\x02\x00\x00"))
    assert info.value.reason is DropReason.ICMP_TRUNCATED
