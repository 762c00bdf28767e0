"""Unit tests for director.packet: classify() outcomes, every parser drop reason, headers, builders."""

import ast
import pathlib
import struct

import pytest

from director import packet
from director.drop_reasons import DropReason
from director.packet import (
    AGGRESSIVE,
    CREATE_CHILD_SA,
    FLAG_INITIATOR,
    FLAG_RESPONSE,
    IKE_AUTH,
    IKE_SA_INIT,
    INFORMATIONAL,
    MAIN,
    QUICK,
    AhHeader,
    Classified,
    EspHeader,
    IkeHeader,
    Ipv4Header,
    Kind,
    PacketError,
    UdpHeader,
    build_ipv4,
    build_ipv4_udp,
    classify,
    ike_header,
    int_to_ip,
    ip_to_int,
    ipv4_checksum,
)

CLIENT = ip_to_int("192.0.2.10")
VIP = ip_to_int("198.51.100.1")
SPI_I = 0x0102030405060708
SPI_R = 0xA1B2C3D4E5F60718
BIG_SPI_I = 0xFEDCBA9876543210  # top bit set: must come back unsigned


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def expect(**fields) -> Classified:
    """A Classified with every field 0/False except those given."""
    base = dict.fromkeys(Classified._fields, 0)
    base["natt"] = False
    base.update(fields)
    return Classified(**base)


def reason_of(data, reply: bool = False) -> DropReason:
    with pytest.raises(PacketError) as info:
        classify(data, reply)
    return info.value.reason


def udp(payload: bytes, sport: int = 500, dport: int = 500, **kw) -> bytes:
    return build_ipv4_udp(CLIENT, VIP, sport, dport, payload, **kw)


def set_word(buf: bytes, offset: int, value: int, fmt: str = "!H") -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# -- literal packets, written field by field from the RFC layouts ------------------------------
# IP header checksums and the UDP checksum below were computed by scapy, not by director.packet.

LITERAL_IKEV1_MAIN = hexbytes("""
    45 00 0038  0001 4000  40 11 4e75  c000020a  c6336401
    01f4 01f4 0024 fc3e
    0102030405060708  0000000000000000  01 10 02 00  00000000  0000001c
""")  # IPv4 (DF, ttl 64, id 1) / UDP 500->500 / ISAKMP main mode, next payload SA, length 28

LITERAL_ESP = hexbytes("""
    45 00 0024  0002 4000  40 32 4e67  c000020a  c6336401
    0000c0de 00000007  aaaaaaaaaaaaaaaa
""")  # IPv4 / ESP SPI 0xc0de seq 7 / 8 bytes of "ciphertext"

LITERAL_AH = hexbytes("""
    45 00 0030  0003 4000  40 33 4e59  c000020a  c6336401
    04 04 0000  00001234  00000001  bbbbbbbbbbbbbbbbbbbbbbbb
    cccccccc
""")  # IPv4 / AH next header 4, payload len 4 (24 bytes), SPI 0x1234, seq 1, 96-bit ICV / 4 bytes

LITERAL_KEEPALIVE = hexbytes("""
    45 00 001d  0004 4000  40 11 4e8d  c000020a  c6336401
    1194 1194 0009 f173
    ff
""")  # IPv4 / UDP 4500->4500 / NAT-keepalive


def test_literal_ikev1_main_mode():
    assert classify(LITERAL_IKEV1_MAIN) == expect(
        kind=Kind.IKE_INITIAL, src=CLIENT, dst=VIP, proto=17, sport=500, dport=500,
        spi_i=SPI_I, ike_version=1, exchange=MAIN, l4_offset=20, wire_len=56,
    )  # fmt: skip


def test_literal_esp():
    assert classify(LITERAL_ESP) == expect(
        kind=Kind.ESP, src=CLIENT, dst=VIP, proto=50, spi=0xC0DE, l4_offset=20, wire_len=36
    )


def test_literal_ah():
    assert classify(LITERAL_AH) == expect(
        kind=Kind.AH, src=CLIENT, dst=VIP, proto=51, spi=0x1234, l4_offset=20, wire_len=48
    )


def test_literal_keepalive():
    assert classify(LITERAL_KEEPALIVE) == expect(
        kind=Kind.NATT_KEEPALIVE, src=CLIENT, dst=VIP, proto=17, sport=4500, dport=4500,
        l4_offset=20, wire_len=29,
    )  # fmt: skip


def test_builders_reproduce_the_literals():
    ike = ike_header(SPI_I, 0, MAIN, version=0x10, next_payload=1)
    assert build_ipv4_udp(CLIENT, VIP, 500, 500, ike, ident=1) == LITERAL_IKEV1_MAIN
    esp = EspHeader(0xC0DE, 7).to_bytes() + b"\xaa" * 8
    assert build_ipv4(CLIENT, VIP, 50, esp, ident=2) == LITERAL_ESP
    ah = AhHeader(4, 4, 0x1234, 1).to_bytes() + b"\xbb" * 12 + b"\xcc" * 4
    assert build_ipv4(CLIENT, VIP, 51, ah, ident=3) == LITERAL_AH
    assert build_ipv4_udp(CLIENT, VIP, 4500, 4500, b"\xff", ident=4) == LITERAL_KEEPALIVE


def test_header_dataclasses_parse_the_literals():
    ip = Ipv4Header.from_bytes(LITERAL_IKEV1_MAIN)
    assert ip == Ipv4Header(0x45, 0, 56, 1, 0x4000, 64, 17, 0x4E75, CLIENT, VIP)
    assert UdpHeader.from_bytes(LITERAL_IKEV1_MAIN, 20) == UdpHeader(500, 500, 36, 0xFC3E)
    assert IkeHeader.from_bytes(LITERAL_IKEV1_MAIN, 28) == IkeHeader(SPI_I, 0, 1, 0x10, MAIN, 0, 0, 28)
    assert EspHeader.from_bytes(LITERAL_ESP, 20) == EspHeader(0xC0DE, 7)
    assert AhHeader.from_bytes(LITERAL_AH, 20) == AhHeader(4, 4, 0x1234, 1)


# -- one case per kind ----------------------------------------------------------------------------


def test_ikev2_sa_init_initial_on_500():
    body = b"\x22" * 300  # SA, KE, Ni... opaque to the classifier
    pkt = udp(ike_header(BIG_SPI_I, 0, IKE_SA_INIT, FLAG_INITIATOR, body=body))
    assert classify(pkt) == expect(
        kind=Kind.IKE_INITIAL, src=CLIENT, dst=VIP, proto=17, sport=500, dport=500,
        spi_i=BIG_SPI_I, ike_version=2, exchange=IKE_SA_INIT, flags=FLAG_INITIATOR,
        l4_offset=20, wire_len=20 + 8 + 28 + 300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("exchange", "flags", "version", "msg_id"),
    [
        (IKE_AUTH, FLAG_INITIATOR, 0x20, 1),
        (CREATE_CHILD_SA, FLAG_INITIATOR | FLAG_RESPONSE, 0x20, 7),
        (INFORMATIONAL, FLAG_RESPONSE, 0x20, 0xFFFFFFFF),  # client answers a server request
        (QUICK, 0x01, 0x10, 0xDEADBEEF),  # IKEv1 quick mode, encrypted
        (AGGRESSIVE, 0, 0x10, 0),
    ],
)
def test_non_initial_ike(exchange, flags, version, msg_id):
    pkt = udp(ike_header(SPI_I, SPI_R, exchange, flags, version, msg_id, body=b"\x01" * 64))
    got = classify(pkt)
    assert got.kind is Kind.IKE
    assert (got.spi_i, got.spi_r, got.exchange, got.flags, got.msg_id) == (
        SPI_I, SPI_R, exchange, flags, msg_id,
    )  # fmt: skip
    assert got.ike_version == version >> 4
    assert got.natt is False


def test_ike_on_4500_behind_marker():
    ike = ike_header(SPI_I, SPI_R, IKE_AUTH, FLAG_INITIATOR, msg_id=1, body=b"\x2e" * 200)
    pkt = udp(b"\x00\x00\x00\x00" + ike, sport=40000, dport=4500)
    assert classify(pkt) == expect(
        kind=Kind.IKE, src=CLIENT, dst=VIP, proto=17, sport=40000, dport=4500,
        spi_i=SPI_I, spi_r=SPI_R, ike_version=2, exchange=IKE_AUTH, flags=FLAG_INITIATOR,
        msg_id=1, natt=True, l4_offset=20, wire_len=20 + 8 + 4 + 28 + 200,
    )  # fmt: skip


def test_initial_ike_may_arrive_on_4500():
    pkt = udp(b"\0\0\0\0" + ike_header(SPI_I, 0, IKE_SA_INIT, FLAG_INITIATOR), 4500, 4500)
    got = classify(pkt)
    assert (got.kind, got.natt, got.spi_r) == (Kind.IKE_INITIAL, True, 0)


def test_esp_in_udp():
    pkt = udp(EspHeader(0xC0FFEE01, 42).to_bytes() + b"\x99" * 64, sport=4500, dport=4500)
    assert classify(pkt) == expect(
        kind=Kind.ESP_IN_UDP, src=CLIENT, dst=VIP, proto=17, sport=4500, dport=4500,
        spi=0xC0FFEE01, l4_offset=20, wire_len=20 + 8 + 8 + 64,
    )  # fmt: skip


def test_esp_in_udp_with_exactly_eight_bytes():
    assert classify(udp(b"\0\0\0\x01\0\0\0\x01", 4500, 4500)).kind is Kind.ESP_IN_UDP


def test_raw_esp_spi_is_unsigned():
    pkt = build_ipv4(CLIENT, VIP, 50, EspHeader(0xFFFFFFFF, 1).to_bytes())
    assert classify(pkt).spi == 0xFFFFFFFF


def test_ah_minimal_without_icv():
    pkt = build_ipv4(CLIENT, VIP, 51, AhHeader(50, 1, 77, 1).to_bytes())
    assert classify(pkt) == expect(
        kind=Kind.AH, src=CLIENT, dst=VIP, proto=51, spi=77, l4_offset=20, wire_len=32
    )


def test_first_fragment_with_more_fragments():
    pkt = udp(ike_header(SPI_I, 0, IKE_SA_INIT, body=b"\x01" * 64), flags_frag=0x2000)
    assert classify(pkt) == expect(kind=Kind.FRAGMENT, src=CLIENT, dst=VIP, proto=17)


@pytest.mark.parametrize("proto", [17, 50, 51, 6])
def test_non_first_fragment_has_no_l4_header(proto):
    # offset 185 * 8 = 1480; the 3-byte payload is a tail of something, not a header
    pkt = build_ipv4(CLIENT, VIP, proto, b"\x00\x00\x00", flags_frag=185)
    assert classify(pkt) == expect(kind=Kind.FRAGMENT, src=CLIENT, dst=VIP, proto=proto)


def test_last_fragment_with_df_bit_still_a_fragment():
    pkt = build_ipv4(CLIENT, VIP, 50, b"\x00" * 8, flags_frag=0x4000 | 1)  # zero SPI would be an error
    assert classify(pkt).kind is Kind.FRAGMENT


@pytest.mark.parametrize("option_words", [1, 3, 10])
def test_ip_options_move_the_l4_header(option_words):
    options = (b"\x01" * 4) * option_words  # NOPs
    esp = build_ipv4(CLIENT, VIP, 50, EspHeader(9, 1).to_bytes(), options=options)
    got = classify(esp)
    assert (got.kind, got.spi, got.l4_offset) == (Kind.ESP, 9, 20 + 4 * option_words)
    ike = build_ipv4(
        CLIENT, VIP, 17,
        UdpHeader(500, 500, 8 + 28, 0).to_bytes() + ike_header(SPI_I, SPI_R, IKE_AUTH),
        options=options,
    )  # fmt: skip
    got = classify(ike)
    assert (got.kind, got.spi_r, got.l4_offset) == (Kind.IKE, SPI_R, 20 + 4 * option_words)


@pytest.mark.parametrize(
    "pkt",
    [
        udp(ike_header(SPI_I, 0, IKE_SA_INIT)),  # 56 bytes: an Ethernet frame pads it to 60+
        udp(b"\0\0\0\0" + ike_header(SPI_I, SPI_R, IKE_AUTH), 4500, 4500),
        udp(b"\xff", 4500, 4500),
        udp(EspHeader(5, 1).to_bytes(), 4500, 4500),
        build_ipv4(CLIENT, VIP, 50, EspHeader(5, 1).to_bytes()),
        build_ipv4(CLIENT, VIP, 51, AhHeader(4, 1, 5, 1).to_bytes()),
    ],
)
def test_link_layer_padding_is_ignored(pkt):
    plain = classify(pkt)
    assert plain.kind is not Kind.NOT_OURS
    for pad in (b"\x00" * 18, b"\xff" * 46):
        assert classify(pkt + pad) == plain


def test_truncated_copy_still_classifies_from_headers():
    # NFQUEUE copied the first 4016 bytes of a 6000-byte IKE_AUTH message.
    body = b"\x5a" * (6000 - 20 - 8 - 4 - 28)
    ike = ike_header(SPI_I, SPI_R, IKE_AUTH, FLAG_INITIATOR, msg_id=1, body=body)
    full = udp(b"\0\0\0\0" + ike, 4500, 4500)
    assert len(full) == 6000
    got = classify(full[:4016])
    assert got == classify(full)
    assert (got.kind, got.wire_len, got.natt) == (Kind.IKE, 6000, True)
    esp = build_ipv4(CLIENT, VIP, 50, EspHeader(3, 1).to_bytes() + b"\0" * 5972)
    assert classify(esp[:4016]) == classify(esp)
    assert classify(esp[:28]).wire_len == 6000


def test_reply_direction_uses_the_source_port():
    # Real server (VIP:4500) answers a NATed client port.
    ike = ike_header(SPI_I, SPI_R, IKE_AUTH, FLAG_RESPONSE, msg_id=1)
    pkt = build_ipv4_udp(VIP, CLIENT, 4500, 31337, b"\0\0\0\0" + ike)
    got = classify(pkt, reply=True)
    assert (got.kind, got.natt, got.sport, got.dport, got.src) == (Kind.IKE, True, 4500, 31337, VIP)
    assert classify(pkt).kind is Kind.NOT_OURS  # forward direction looks at dport 31337
    reply_esp = build_ipv4_udp(VIP, CLIENT, 4500, 31337, EspHeader(11, 1).to_bytes())
    assert classify(reply_esp, reply=True).spi == 11
    # and a client's packet to 500 from a high port is not ours in the reply direction
    assert classify(udp(ike_header(SPI_I, 0, IKE_SA_INIT), sport=1234), reply=True).kind is Kind.NOT_OURS


@pytest.mark.parametrize("port", [53, 499, 501, 4499, 4501, 0, 65535])
def test_not_ours_udp_ports(port):
    pkt = udp(ike_header(SPI_I, 0, IKE_SA_INIT), sport=500, dport=port)
    assert classify(pkt) == expect(
        kind=Kind.NOT_OURS, src=CLIENT, dst=VIP, proto=17, sport=500, dport=port, l4_offset=20, wire_len=56
    )


@pytest.mark.parametrize("proto", [0, 1, 4, 6, 47, 255])
def test_not_ours_protocols(proto):
    pkt = build_ipv4(CLIENT, VIP, proto, b"")  # nothing after the IP header is needed
    assert classify(pkt) == expect(
        kind=Kind.NOT_OURS, src=CLIENT, dst=VIP, proto=proto, l4_offset=20, wire_len=20
    )


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview])
def test_buffer_types(make):
    pkt = udp(b"\0\0\0\0" + ike_header(SPI_I, SPI_R, IKE_AUTH), 4500, 4500)
    assert classify(make(pkt)) == classify(pkt)


def test_memoryview_of_other_formats_and_strides():
    pkt = build_ipv4(CLIENT, VIP, 50, EspHeader(0x01020304, 1).to_bytes())  # 28 bytes
    assert classify(memoryview(pkt).cast("I")).spi == 0x01020304
    assert classify(memoryview(pkt).cast("c")).spi == 0x01020304
    doubled = bytes(b for byte in pkt for b in (byte, 0xEE))
    assert classify(memoryview(doubled)[::2]).spi == 0x01020304
    with pytest.raises(PacketError):
        classify(memoryview(bytearray(4)).cast("I"))


def test_classified_is_a_tuple_with_kind_enum():
    got = classify(LITERAL_ESP)
    assert type(got) is Classified and isinstance(got, tuple)
    assert type(got.kind) is Kind


# -- every parser drop reason ---------------------------------------------------------------------

GOOD_IKE = udp(ike_header(SPI_I, 0, IKE_SA_INIT, body=b"\x01" * 40))


@pytest.mark.parametrize("size", [0, 1, 19])
def test_ip_truncated_short_buffer(size):
    assert reason_of(GOOD_IKE[:size]) is DropReason.IP_TRUNCATED


def test_ip_truncated_options_not_in_buffer():
    pkt = build_ipv4(CLIENT, VIP, 50, EspHeader(1, 1).to_bytes(), options=b"\x01" * 8)
    assert reason_of(pkt[:27]) is DropReason.IP_TRUNCATED
    assert classify(pkt[:36]).kind is Kind.ESP


@pytest.mark.parametrize("version", [0, 5, 7, 15])
def test_ip_bad_version(version):
    pkt = bytes([version << 4 | 5]) + GOOD_IKE[1:]
    assert reason_of(pkt) is DropReason.IP_BAD_VERSION


@pytest.mark.parametrize("ihl", [0, 4])
def test_ip_bad_ihl(ihl):
    assert reason_of(bytes([0x40 | ihl]) + GOOD_IKE[1:]) is DropReason.IP_BAD_IHL


@pytest.mark.parametrize(("options", "total"), [(b"", 0), (b"", 19), (b"\x01" * 4, 23)])
def test_ip_bad_total_length(options, total):
    pkt = build_ipv4(CLIENT, VIP, 50, EspHeader(1, 1).to_bytes(), options=options, total_length=total)
    assert reason_of(pkt) is DropReason.IP_BAD_TOTAL_LENGTH


def test_udp_truncated_by_total_length():
    pkt = build_ipv4(CLIENT, VIP, 17, UdpHeader(500, 500, 8, 0).to_bytes(), total_length=27)
    assert reason_of(pkt) is DropReason.UDP_TRUNCATED


def test_udp_truncated_by_buffer():
    assert reason_of(GOOD_IKE[:27]) is DropReason.UDP_TRUNCATED


@pytest.mark.parametrize("length", [0, 7, len(GOOD_IKE) - 20 + 1, 0xFFFF])
def test_udp_bad_length(length):
    assert reason_of(set_word(GOOD_IKE, 24, length)) is DropReason.UDP_BAD_LENGTH


def test_udp_length_shorter_than_ip_payload_is_fine_but_ike_must_match_it():
    # UDP length 8+28 inside an IP payload with 40 more bytes: UDP governs.
    segment = UdpHeader(500, 500, 36, 0).to_bytes() + ike_header(SPI_I, 0, IKE_SA_INIT)
    pkt = build_ipv4(CLIENT, VIP, 17, segment + b"\0" * 40)
    assert classify(pkt).kind is Kind.IKE_INITIAL


@pytest.mark.parametrize("port", [500, 4500])
def test_ike_truncated_by_udp_length(port):
    marker = b"\0\0\0\0" if port == 4500 else b""
    short = ike_header(SPI_I, 0, IKE_SA_INIT)[:27]
    assert reason_of(udp(marker + short, port, port)) is DropReason.IKE_TRUNCATED


def test_ike_truncated_marker_alone():
    assert reason_of(udp(b"\0\0\0\0", 4500, 4500)) is DropReason.IKE_TRUNCATED
    assert reason_of(udp(b"\0" * 8, 4500, 4500)) is DropReason.IKE_TRUNCATED


@pytest.mark.parametrize("port", [500, 4500])
def test_ike_truncated_by_buffer(port):
    marker = b"\0\0\0\0" if port == 4500 else b""
    pkt = udp(marker + ike_header(SPI_I, 0, IKE_SA_INIT, body=b"\0" * 100), port, port)
    header_end = 28 + len(marker) + 28
    assert reason_of(pkt[: header_end - 1]) is DropReason.IKE_TRUNCATED
    assert classify(pkt[:header_end]).kind is Kind.IKE_INITIAL


@pytest.mark.parametrize("version", [0x00, 0x0F, 0x30, 0xF2])
def test_ike_bad_version(version):
    assert reason_of(udp(ike_header(SPI_I, 0, IKE_SA_INIT, version=version))) is DropReason.IKE_BAD_VERSION


def test_ike_minor_version_is_ignored():
    assert classify(udp(ike_header(SPI_I, 0, MAIN, version=0x1F))).ike_version == 1


@pytest.mark.parametrize("port", [500, 4500])
def test_ike_zero_initiator_spi(port):
    marker = b"\0\0\0\0" if port == 4500 else b""
    pkt = udp(marker + ike_header(0, SPI_R, IKE_AUTH), port, port)
    assert reason_of(pkt) is DropReason.IKE_ZERO_SPI_I


@pytest.mark.parametrize("delta", [-1, +1, -28, +1000])
def test_ike_bad_length_on_500(delta):
    ike = bytearray(ike_header(SPI_I, 0, IKE_SA_INIT, body=b"\0" * 40))
    struct.pack_into("!I", ike, 24, 68 + delta)
    assert reason_of(udp(bytes(ike))) is DropReason.IKE_BAD_LENGTH


def test_ike_bad_length_below_header():
    ike = bytearray(ike_header(SPI_I, 0, IKE_SA_INIT))
    struct.pack_into("!I", ike, 24, 27)
    assert reason_of(udp(bytes(ike))) is DropReason.IKE_BAD_LENGTH


def test_ike_length_after_marker_excludes_marker():
    ike = bytearray(ike_header(SPI_I, SPI_R, IKE_AUTH, body=b"\0" * 20))
    struct.pack_into("!I", ike, 24, 48 + 4)  # counted the marker: wrong
    assert reason_of(udp(b"\0\0\0\0" + bytes(ike), 4500, 4500)) is DropReason.IKE_BAD_LENGTH


@pytest.mark.parametrize(
    "payload", [b"", b"\x00", b"\xfe", b"\xff\xff", b"\xff\x00\x00", b"\x01\x02\x03\x04", b"\xff" * 7]
)
def test_natt_truncated(payload):
    assert reason_of(udp(payload, 4500, 4500)) is DropReason.NATT_TRUNCATED


def test_natt_truncated_by_buffer():
    keepalive = udp(b"\xff", 4500, 4500)
    assert reason_of(keepalive[:28]) is DropReason.NATT_TRUNCATED
    esp = udp(EspHeader(5, 1).to_bytes() + b"\0" * 30, 4500, 4500)
    assert reason_of(esp[:31]) is DropReason.NATT_TRUNCATED
    assert reason_of(esp[:35]) is DropReason.NATT_TRUNCATED
    assert classify(esp[:36]).kind is Kind.ESP_IN_UDP


def test_esp_truncated_by_total_length():
    assert reason_of(build_ipv4(CLIENT, VIP, 50, b"\0\0\0\x01\0\0\0")) is DropReason.ESP_TRUNCATED


def test_esp_truncated_by_total_length_despite_padding():
    pkt = build_ipv4(CLIENT, VIP, 50, b"\0\0\0\x01\0\0\0") + b"\0" * 20  # buffer has the bytes
    assert reason_of(pkt) is DropReason.ESP_TRUNCATED


def test_esp_truncated_by_buffer():
    pkt = build_ipv4(CLIENT, VIP, 50, EspHeader(1, 1).to_bytes() + b"\0" * 100)
    assert reason_of(pkt[:27]) is DropReason.ESP_TRUNCATED


def test_esp_zero_spi():
    assert reason_of(build_ipv4(CLIENT, VIP, 50, EspHeader(0, 1).to_bytes())) is DropReason.ESP_ZERO_SPI


def test_ah_truncated_by_total_length():
    pkt = build_ipv4(CLIENT, VIP, 51, AhHeader(4, 1, 1, 1).to_bytes()[:11])
    assert reason_of(pkt) is DropReason.AH_TRUNCATED


def test_ah_truncated_by_total_length_despite_padding():
    pkt = build_ipv4(CLIENT, VIP, 51, AhHeader(4, 1, 1, 1).to_bytes()[:11]) + b"\x01" * 20
    assert reason_of(pkt) is DropReason.AH_TRUNCATED


def test_ah_truncated_by_buffer():
    pkt = build_ipv4(CLIENT, VIP, 51, AhHeader(4, 4, 1, 1).to_bytes() + b"\0" * 12)
    assert reason_of(pkt[:31]) is DropReason.AH_TRUNCATED
    assert classify(pkt[:32]).kind is Kind.AH  # the ICV itself need not be in the copy


@pytest.mark.parametrize(("payload_len", "extra"), [(0, 0), (4, 11), (255, 100)])
def test_ah_bad_length(payload_len, extra):
    pkt = build_ipv4(CLIENT, VIP, 51, AhHeader(4, payload_len, 1, 1).to_bytes() + b"\0" * extra)
    assert reason_of(pkt) is DropReason.AH_BAD_LENGTH


def test_ah_zero_spi():
    assert reason_of(build_ipv4(CLIENT, VIP, 51, AhHeader(4, 1, 0, 1).to_bytes())) is DropReason.AH_ZERO_SPI


def test_packet_error_shape():
    err = PacketError(DropReason.ESP_ZERO_SPI)
    assert isinstance(err, ValueError)
    assert err.reason is DropReason.ESP_ZERO_SPI
    assert str(err) == "ESP_ZERO_SPI"


# -- headers, checksums, builders -----------------------------------------------------------------


def test_ipv4_checksum_rfc1071_and_known_header():
    # RFC 1071 section 3 example: the sum of these words is 0xddf2.
    assert ipv4_checksum(hexbytes("0001 f203 f4f5 f6f7")) == 0xFFFF - 0xDDF2
    header = hexbytes("4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7")
    assert ipv4_checksum(header) == 0xB861
    assert ipv4_checksum(header[:10] + b"\xb8\x61" + header[12:]) == 0
    assert ipv4_checksum(b"\x01") == 0xFEFF  # odd length: padded with a zero byte
    # ffff + ffff = 1fffe -> fffe + 1 = ffff; + 0001 = 10000 -> 0001: the carry folds twice
    assert ipv4_checksum(hexbytes("ffff ffff 0001")) == 0xFFFE


def test_ipv4_header_to_bytes_writes_correct_checksum():
    h = Ipv4Header(0x45, 0, 0x73, 0, 0x4000, 64, 17, 0x1234, 0xC0A80001, 0xC0A800C7)
    raw = h.to_bytes()
    assert raw == hexbytes("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")
    assert Ipv4Header.from_bytes(raw).checksum == 0xB861


def test_ipv4_header_options_round_trip_and_checks():
    h = Ipv4Header(0x46, 0, 24, 1, 0, 1, 50, 0, 1, 2, b"\x94\x04\x00\x00")  # router alert
    raw = h.to_bytes()
    assert len(raw) == 24 and ipv4_checksum(raw) == 0
    assert Ipv4Header.from_bytes(b"\xee" + raw, 1).options == b"\x94\x04\x00\x00"
    assert h.header_len == 24 and h.version == 4 and not h.is_fragment
    with pytest.raises(ValueError):
        Ipv4Header(0x45, 0, 24, 1, 0, 1, 50, 0, 1, 2, b"\x01" * 4).to_bytes()


@pytest.mark.parametrize(
    ("cls", "raw", "reason"),
    [
        (Ipv4Header, b"\x45" + b"\0" * 18, DropReason.IP_TRUNCATED),
        (Ipv4Header, b"\x65" + b"\0" * 19, DropReason.IP_BAD_VERSION),
        (Ipv4Header, b"\x44" + b"\0" * 19, DropReason.IP_BAD_IHL),
        (Ipv4Header, b"\x46" + b"\0" * 19, DropReason.IP_TRUNCATED),
        (Ipv4Header, b"\x45\x00\x00\x13" + b"\0" * 16, DropReason.IP_BAD_TOTAL_LENGTH),
        (UdpHeader, b"\0" * 7, DropReason.UDP_TRUNCATED),
        (UdpHeader, b"\x01\xf4\x01\xf4\x00\x07\x00\x00", DropReason.UDP_BAD_LENGTH),
        (IkeHeader, ike_header(SPI_I, 0, 34)[:27], DropReason.IKE_TRUNCATED),
        (IkeHeader, ike_header(SPI_I, 0, 34, version=0x30), DropReason.IKE_BAD_VERSION),
        (IkeHeader, ike_header(0, 0, 34), DropReason.IKE_ZERO_SPI_I),
        (IkeHeader, ike_header(SPI_I, 0, 34)[:24] + b"\0\0\0\x1b", DropReason.IKE_BAD_LENGTH),
        (EspHeader, b"\0\0\0\x01\0\0\0", DropReason.ESP_TRUNCATED),
        (EspHeader, b"\0" * 8, DropReason.ESP_ZERO_SPI),
        (AhHeader, b"\x04\x01" + b"\0" * 9, DropReason.AH_TRUNCATED),
        (AhHeader, b"\x04\x00\x00\x00\x00\x00\x00\x01" + b"\0" * 4, DropReason.AH_BAD_LENGTH),
        (AhHeader, b"\x04\x01" + b"\0" * 10, DropReason.AH_ZERO_SPI),
    ],
)
def test_header_from_bytes_errors(cls, raw, reason):
    with pytest.raises(PacketError) as info:
        cls.from_bytes(raw)
    assert info.value.reason is reason


def test_header_from_bytes_offset_past_end():
    with pytest.raises(PacketError):
        EspHeader.from_bytes(b"\0\0\0\x01\0\0\0\x01", 1)
    with pytest.raises(PacketError):
        EspHeader.from_bytes(b"\0\0\0\x01\0\0\0\x01", -8)


def test_ike_header_builder_and_properties():
    raw = ike_header(SPI_I, SPI_R, IKE_AUTH, FLAG_INITIATOR, msg_id=5, body=b"abc")
    assert len(raw) == 31
    h = IkeHeader.from_bytes(raw)
    assert h == IkeHeader(SPI_I, SPI_R, 33, 0x20, IKE_AUTH, FLAG_INITIATOR, 5, 31)
    assert (h.major, h.minor) == (2, 0)
    assert raw[28:] == b"abc"


def test_ah_length_property():
    assert AhHeader(4, 4, 1, 1).length == 24
    assert AhHeader.from_bytes(AhHeader(6, 7, 9, 10).to_bytes() + b"\0" * 24) == AhHeader(6, 7, 9, 10)


def test_udp_checksum_verifies():
    pkt = udp(b"hello world", 500, 500)  # odd payload length
    ip = Ipv4Header.from_bytes(pkt)
    segment = pkt[20:]
    pseudo = struct.pack("!IIBBH", ip.src, ip.dst, 0, 17, len(segment))
    assert ipv4_checksum(pseudo + segment) == 0


def test_ip_int_conversions():
    assert ip_to_int("192.0.2.1") == 0xC0000201
    assert int_to_ip(0xC0000201) == "192.0.2.1"
    assert int_to_ip(ip_to_int("255.255.255.255")) == "255.255.255.255"


def test_build_ipv4_rejects_bad_options():
    with pytest.raises(ValueError):
        build_ipv4(CLIENT, VIP, 50, b"", options=b"\x01")


# -- cross-check with scapy -----------------------------------------------------------------------

def _scapy():
    """scapy's layers; a missing scapy fails the test with a message (never a silent skip)."""
    try:
        import scapy  # noqa: F401
    except ImportError:
        pytest.fail("scapy is a test dependency: pip install scapy (or the 'test' extra)")
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import AH, ESP, NAT_KEEPALIVE, NON_ESP
    from scapy.layers.isakmp import ISAKMP
    from scapy.packet import Raw

    return IP, UDP, ISAKMP, ESP, AH, NON_ESP, NAT_KEEPALIVE, Raw


def test_scapy_isakmp_classifies():
    IP, UDP, ISAKMP, *_ = _scapy()
    pkt = IP(src="192.0.2.10", dst="198.51.100.1") / UDP(sport=500, dport=500) / ISAKMP(
        init_cookie=SPI_I.to_bytes(8, "big"), next_payload=0, exch_type=MAIN
    )
    got = classify(bytes(pkt))
    assert (got.kind, got.spi_i, got.ike_version, got.exchange) == (Kind.IKE_INITIAL, SPI_I, 1, MAIN)


def test_scapy_natt_layers_classify():
    IP, UDP, ISAKMP, ESP, _AH, NON_ESP, NAT_KEEPALIVE, Raw = _scapy()
    base = IP(src="192.0.2.10", dst="198.51.100.1") / UDP(sport=4500, dport=4500)
    ike = base / NON_ESP() / ISAKMP(
        init_cookie=SPI_I.to_bytes(8, "big"),
        resp_cookie=SPI_R.to_bytes(8, "big"),
        version=0x20,
        exch_type=IKE_AUTH,
    )
    got = classify(bytes(ike))
    assert (got.kind, got.natt, got.spi_r, got.ike_version) == (Kind.IKE, True, SPI_R, 2)
    assert classify(bytes(base / NAT_KEEPALIVE())).kind is Kind.NATT_KEEPALIVE
    esp = base / ESP(spi=0x4242, seq=3, data=b"\x00" * 32)
    got = classify(bytes(esp))
    assert (got.kind, got.spi) == (Kind.ESP_IN_UDP, 0x4242)


def test_scapy_esp_and_ah_classify():
    IP, _UDP, _ISAKMP, ESP, AH, *_ = _scapy()
    ip = IP(src="192.0.2.10", dst="198.51.100.1")
    got = classify(bytes(ip / ESP(spi=0xABCDEF01, seq=9, data=b"\x11" * 16)))
    assert (got.kind, got.spi) == (Kind.ESP, 0xABCDEF01)
    got = classify(bytes(ip / AH(nh=4, payloadlen=4, spi=0x77, seq=1, icv=b"\0" * 12)))
    assert (got.kind, got.spi) == (Kind.AH, 0x77)


@pytest.mark.parametrize("payload", [b"", b"x", b"hello, ike", bytes(range(256)) * 3])
def test_udp_builder_checksums_equal_scapy(payload):
    IP, UDP, *_, Raw = _scapy()
    ours = build_ipv4_udp(CLIENT, VIP, 4500, 31337, payload, ttl=17, ident=0xBEEF)
    theirs = bytes(
        IP(src=int_to_ip(CLIENT), dst=int_to_ip(VIP), ttl=17, id=0xBEEF, flags="DF")
        / UDP(sport=4500, dport=31337)
        / Raw(payload)
    )
    assert ours[10:12] == theirs[10:12]  # IP header checksum
    assert ours[26:28] == theirs[26:28]  # UDP checksum
    assert ours == theirs


def test_udp_checksum_zero_is_sent_as_ffff():
    IP, UDP, *_, Raw = _scapy()
    trial = build_ipv4_udp(CLIENT, VIP, 500, 500, b"ab\0\0")
    computed = struct.unpack("!H", trial[26:28])[0]
    # Fill the last aligned word with the checksum: the new sum is 0xFFFF, so the checksum is 0.
    payload = b"ab" + computed.to_bytes(2, "big")
    ours = build_ipv4_udp(CLIENT, VIP, 500, 500, payload)
    ip = IP(src=int_to_ip(CLIENT), dst=int_to_ip(VIP), id=0, flags="DF")
    theirs = bytes(ip / UDP(sport=500, dport=500) / Raw(payload))
    assert ours[26:28] == b"\xff\xff"
    assert ours == theirs


# -- the module's shape ---------------------------------------------------------------------------


def test_packet_module_imports_only_pure_modules():
    tree = ast.parse(pathlib.Path(packet.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"ipaddress", "struct", "dataclasses", "enum", "typing", "director.drop_reasons"}
