"""Property tests for director.packet: only PacketError escapes, headers round-trip, fields survive."""

import dataclasses

from hypothesis import example, given, settings
from hypothesis import strategies as st

from director.packet import (
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
    ipv4_checksum,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
nonzero_u32 = st.integers(1, 0xFFFFFFFF)
nonzero_u64 = st.integers(1, 0xFFFFFFFFFFFFFFFF)
addr = u32
ports = st.sampled_from([500, 4500]) | u16
ike_version = st.sampled_from([0x10, 0x20]) | st.integers(0x10, 0x2F)
options = st.integers(0, 10).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words))
payload = st.binary(max_size=200)
padding = st.binary(max_size=46)


def outcome(data, reply=False):
    """classify's result, or the PacketError's reason; any other exception fails the test."""
    try:
        got = classify(data, reply)
    except PacketError as err:
        assert type(err.reason).__name__ == "DropReason"
        return err.reason
    assert type(got) is Classified and type(got.kind) is Kind
    return got


# -- (a) nothing but PacketError escapes ----------------------------------------------------------


@given(st.binary(max_size=120), st.booleans())
@example(b"", False)
@example(b"\x45" + b"\x00" * 19, False)
def test_arbitrary_bytes(data, reply):
    outcome(data, reply)
    outcome(bytearray(data), reply)
    outcome(memoryview(data), reply)


@given(st.binary(max_size=120).map(lambda b: b"\x45" + b[1:] if b else b), st.booleans())
def test_arbitrary_bytes_that_look_like_ipv4(data, reply):
    outcome(data, reply)


@given(
    st.sampled_from([500, 4500]), st.sampled_from([500, 4500]) | u16, payload, st.booleans(),
    st.integers(0, 260), st.sampled_from([0x4000, 0, 0x2000, 1]),
)  # fmt: skip
def test_arbitrary_payload_behind_valid_udp(dport, sport, data, reply, cut, flags_frag):
    pkt = build_ipv4_udp(1, 2, sport, dport, data, flags_frag=flags_frag)
    outcome(pkt, reply)
    outcome(pkt[:cut], reply)


@given(st.sampled_from([50, 51, 17, 6]), st.binary(max_size=40), options)
def test_arbitrary_payload_behind_valid_ip(proto, data, opts):
    outcome(build_ipv4(1, 2, proto, data, options=opts))


def valid_packets():
    """Valid packets of every kind, with options, reply direction and padding drawn."""
    ike = st.builds(
        lambda spi_i, spi_r, exch, flags, ver, msg_id, body: ike_header(
            spi_i, spi_r, exch, flags, ver, msg_id, body=body
        ),
        nonzero_u64, u64, u8, u8, ike_version, u32, payload,
    )  # fmt: skip
    on_500 = st.builds(lambda ike, sp: build_ipv4_udp(7, 8, sp, 500, ike), ike, u16)
    on_4500 = st.builds(lambda ike, sp: build_ipv4_udp(7, 8, sp, 4500, b"\0\0\0\0" + ike), ike, u16)
    esp_udp = st.builds(
        lambda spi, seq, body: build_ipv4_udp(7, 8, 4500, 4500, EspHeader(spi, seq).to_bytes() + body),
        nonzero_u32, u32, payload,
    )  # fmt: skip
    keepalive = st.just(build_ipv4_udp(7, 8, 4500, 4500, b"\xff"))
    esp = st.builds(
        lambda spi, seq, body, opts: build_ipv4(
            7, 8, 50, EspHeader(spi, seq).to_bytes() + body, options=opts
        ),
        nonzero_u32, u32, payload, options,
    )  # fmt: skip
    ah = st.builds(
        lambda nh, words, spi, seq, tail, opts: build_ipv4(
            7, 8, 51,
            AhHeader(nh, words, spi, seq).to_bytes() + b"\xaa" * (words * 4 - 4) + tail,
            options=opts,
        ),
        u8, st.integers(1, 20), nonzero_u32, u32, payload, options,
    )  # fmt: skip
    return st.one_of(on_500, on_4500, esp_udp, keepalive, esp, ah)


@given(valid_packets())
@settings(max_examples=60)
def test_truncation_at_every_length(pkt):
    """Each prefix raises PacketError or gives exactly the full packet's result; once enough
    header bytes are present every longer prefix succeeds too."""
    full = classify(pkt)
    succeeded = False
    for cut in range(len(pkt) + 1):
        got = outcome(pkt[:cut])
        if isinstance(got, Classified):
            assert got == full
            succeeded = True
        else:
            assert not succeeded, f"prefix {cut} failed after a shorter prefix succeeded"
    assert succeeded


@given(valid_packets(), st.data())
def test_byte_flips(pkt, data):
    index = data.draw(st.integers(0, len(pkt) - 1))
    value = data.draw(u8)
    mutated = bytearray(pkt)
    mutated[index] = value
    for reply in (False, True):
        outcome(bytes(mutated), reply)
        outcome(memoryview(mutated), reply)


@given(valid_packets(), st.data())
def test_bytes_beyond_the_headers_are_never_read(pkt, data):
    full = classify(pkt)
    end = headers_end(full)
    if end >= len(pkt):
        return
    index = data.draw(st.integers(end, len(pkt) - 1))
    mutated = bytearray(pkt)
    mutated[index] ^= data.draw(st.integers(1, 255))
    assert classify(bytes(mutated)) == full


def headers_end(got: Classified) -> int:
    """Where the last byte classify needs for this kind ends."""
    offset = got.l4_offset
    return {
        Kind.ESP: offset + 8,
        Kind.AH: offset + 12,
        Kind.NATT_KEEPALIVE: offset + 8 + 1,
        Kind.ESP_IN_UDP: offset + 8 + 8,
        Kind.IKE: offset + 8 + 4 * got.natt + 28,
        Kind.IKE_INITIAL: offset + 8 + 4 * got.natt + 28,
    }[got.kind]


@given(st.binary(max_size=60), st.integers(-4, 70))
def test_header_from_bytes_raise_only_packet_error(data, offset):
    for cls in (Ipv4Header, UdpHeader, IkeHeader, EspHeader, AhHeader):
        try:
            cls.from_bytes(data, offset)
        except PacketError:
            pass


# -- (b) round trips ------------------------------------------------------------------------------


@given(
    st.integers(5, 15).flatmap(
        lambda ihl: st.builds(
            Ipv4Header,
            version_ihl=st.just(0x40 | ihl), tos=u8, total_length=st.integers(ihl * 4, 0xFFFF),
            ident=u16, flags_frag=u16, ttl=u8, proto=u8, checksum=u16, src=u32, dst=u32,
            options=st.binary(min_size=ihl * 4 - 20, max_size=ihl * 4 - 20),
        )
    )
)  # fmt: skip
def test_ipv4_header_round_trip(h):
    raw = h.to_bytes()
    assert ipv4_checksum(raw) == 0  # to_bytes wrote the correct checksum
    back = Ipv4Header.from_bytes(raw)
    assert back == dataclasses.replace(h, checksum=back.checksum)
    assert Ipv4Header.from_bytes(back.to_bytes()) == back


@given(st.builds(UdpHeader, sport=u16, dport=u16, length=st.integers(8, 0xFFFF), checksum=u16))
def test_udp_header_round_trip(h):
    assert UdpHeader.from_bytes(h.to_bytes()) == h


@given(
    st.builds(
        IkeHeader, spi_i=nonzero_u64, spi_r=u64, next_payload=u8, version=st.integers(0x10, 0x2F),
        exchange=u8, flags=u8, msg_id=u32, length=st.integers(28, 0xFFFFFFFF),
    )
)  # fmt: skip
def test_ike_header_round_trip(h):
    assert IkeHeader.from_bytes(h.to_bytes()) == h


@given(st.builds(EspHeader, spi=nonzero_u32, seq=u32))
def test_esp_header_round_trip(h):
    assert EspHeader.from_bytes(h.to_bytes()) == h


@given(st.builds(AhHeader, next_header=u8, payload_len=st.integers(1, 255), spi=nonzero_u32, seq=u32))
def test_ah_header_round_trip(h):
    assert AhHeader.from_bytes(h.to_bytes()) == h


# -- (c) what goes in comes out -------------------------------------------------------------------


@given(
    src=addr, dst=addr, client_port=u16, spi_i=nonzero_u64, spi_r=u64, exchange=u8, flags=u8,
    version=ike_version, msg_id=u32, body=payload, natt=st.booleans(), reply=st.booleans(), pad=padding,
)  # fmt: skip
def test_ike_fields(
    src, dst, client_port, spi_i, spi_r, exchange, flags, version, msg_id, body, natt, reply, pad
):
    port = 4500 if natt else 500
    sport, dport = (port, client_port) if reply else (client_port, port)
    ike = ike_header(spi_i, spi_r, exchange, flags, version, msg_id, body=body)
    pkt = build_ipv4_udp(src, dst, sport, dport, (b"\0\0\0\0" if natt else b"") + ike)
    assert classify(pkt + pad, reply) == Classified(
        Kind.IKE if spi_r else Kind.IKE_INITIAL, src, dst, 17, sport, dport, spi_i, spi_r, 0,
        version >> 4, exchange, flags, msg_id, natt, 20, len(pkt),
    )  # fmt: skip


@given(
    src=addr, dst=addr, spi=nonzero_u32, seq=u32, body=payload, opts=options, pad=padding,
    in_udp=st.booleans(),
)  # fmt: skip
def test_esp_fields(src, dst, spi, seq, body, opts, pad, in_udp):
    esp = EspHeader(spi, seq).to_bytes() + body
    if in_udp:
        pkt = build_ipv4_udp(src, dst, 4500, 4500, esp)
        want = Classified(
            Kind.ESP_IN_UDP, src, dst, 17, 4500, 4500, 0, 0, spi, 0, 0, 0, 0, False, 20, len(pkt)
        )
    else:
        pkt = build_ipv4(src, dst, 50, esp, options=opts)
        want = Classified(
            Kind.ESP, src, dst, 50, 0, 0, 0, 0, spi, 0, 0, 0, 0, False, 20 + len(opts), len(pkt)
        )
    assert classify(pkt + pad) == want


@given(
    src=addr, dst=addr, nh=u8, words=st.integers(1, 30), spi=nonzero_u32, seq=u32, opts=options,
    pad=padding,
)  # fmt: skip
def test_ah_fields(src, dst, nh, words, spi, seq, opts, pad):
    ah = AhHeader(nh, words, spi, seq).to_bytes() + b"\0" * (words * 4 - 4)
    pkt = build_ipv4(src, dst, 51, ah, options=opts)
    assert classify(pkt + pad) == Classified(
        Kind.AH, src, dst, 51, 0, 0, 0, 0, spi, 0, 0, 0, 0, False, 20 + len(opts), len(pkt)
    )


@given(
    src=addr, dst=addr, proto=u8, frag=st.integers(1, 0x3FFF),
    flags=st.sampled_from([0, 0x4000, 0x8000]), body=payload,
)  # fmt: skip
def test_fragment_fields(src, dst, proto, frag, flags, body):
    pkt = build_ipv4(src, dst, proto, body, flags_frag=flags | frag)
    assert classify(pkt) == Classified(Kind.FRAGMENT, src, dst, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 0)
