"""Property tests for the IPv6 parser: only PacketError escapes, whatever the bytes or the
extension-header chain; a valid packet's every prefix fails or gives the whole packet's result."""

from hypothesis import given, settings
from hypothesis import strategies as st

from director.packet import (
    Classified,
    EspHeader,
    Kind,
    PacketError,
    build_ipv6,
    build_ipv6_udp,
    classify,
    ike_header,
    parse_icmp_error,
)

CLIENT = 0x20010DB8000C << 80 | 0x10
VIP = 0x20010DB8000F << 80 | 1
u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
nonzero_u32 = st.integers(1, 0xFFFFFFFF)
nonzero_u64 = st.integers(1, 0xFFFFFFFFFFFFFFFF)
payload = st.binary(max_size=120)

# one extension header: hop-by-hop, routing (segments left 0), destination options, atomic fragment
options = st.integers(0, 3).map(lambda w: b"\x01" + bytes([8 * w + 4]) + b"\0" * (8 * w + 4))
ext_header = st.one_of(
    st.tuples(st.just(60), options),
    st.tuples(st.just(43), st.integers(0, 2).map(lambda w: b"\x00\x00" + b"\0" * (8 * w + 4))),
    st.tuples(st.just(44), u32.map(lambda ident: b"\0\0" + ident.to_bytes(4, "big"))),
)
chains = st.builds(lambda hbh, rest: ((0, b"\x01\x04\0\0\0\0"),) * hbh + tuple(rest),
                   st.integers(0, 1), st.lists(ext_header, max_size=5))  # fmt: skip


def outcome(data, reply=False):
    try:
        got = classify(data, reply)
    except PacketError as err:
        assert type(err.reason).__name__ == "DropReason"
        return err.reason
    assert type(got) is Classified and type(got.kind) is Kind
    return got


@given(st.binary(max_size=160).map(lambda b: b"\x60" + b[1:] if b else b), st.booleans())
def test_arbitrary_bytes_that_look_like_ipv6(data, reply):
    outcome(data, reply)
    outcome(memoryview(data), reply)


@given(st.sampled_from([0, 43, 44, 60, 50, 51, 17, 58, 59]), st.binary(max_size=160))
def test_arbitrary_chain_bytes_after_a_valid_header(nh, rest):
    pkt = build_ipv6(CLIENT, VIP, nh, rest)
    outcome(pkt)
    try:
        parse_icmp_error(pkt)
    except PacketError:
        pass


@given(st.integers(1, 4), st.binary(max_size=200))
def test_icmp6_error_with_any_quote(itype, quote):
    body = bytes([itype, 0, 0, 0, 0, 0, 5, 0]) + quote
    try:
        parse_icmp_error(build_ipv6(0x20010DB8 << 96 | 9, VIP, 58, body))
    except PacketError:
        pass


def valid_packets():
    ike = st.builds(lambda spi_i, body: ike_header(spi_i, 0, 34, body=body), nonzero_u64, payload)
    esp = st.builds(lambda spi, body: EspHeader(spi, 1).to_bytes() + body, nonzero_u32, payload)
    return st.one_of(
        st.builds(lambda body, ext: build_ipv6_udp(CLIENT, VIP, 500, 500, body, ext=ext), ike, chains),
        st.builds(lambda body, ext: build_ipv6_udp(CLIENT, VIP, 4500, 4500, b"\0\0\0\0" + body, ext=ext), ike, chains),
        st.builds(lambda body, ext: build_ipv6_udp(CLIENT, VIP, 4500, 4500, body, ext=ext), esp, chains),
        st.builds(lambda body, ext: build_ipv6(CLIENT, VIP, 50, body, ext=ext), esp, chains),
    )


@given(valid_packets())
@settings(max_examples=60)
def test_truncation_at_every_length(pkt):
    full = classify(pkt)
    assert full.kind != Kind.NOT_OURS and full.src == CLIENT
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
    mutated = bytearray(pkt)
    mutated[data.draw(st.integers(0, len(pkt) - 1))] = data.draw(u8)
    for reply in (False, True):
        outcome(bytes(mutated), reply)
