"""Property tests for director.forwarding.rewrite: incremental checksums equal a full recompute, NAT
undoes itself, decap(encap(p)) == p, ICMP answers are well formed or refused for the RFC reasons."""

import struct

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from director.drop_reasons import DropReason
from director.forwarding.rewrite import icmp_unreachable, ipip_decap, ipip_encap, nat_dnat, nat_snat
from director.packet import PacketError, build_ipv4, build_ipv4_udp

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
# Plain random addresses, plus the ones RFC 1122 singles out: zero, loopback, multicast, class E.
special = st.sampled_from([0, 0xFFFFFFFF, 0x0A000001, 0xC6336401, 0xDFFFFFFF, 0xE0000000, 0xF0000000])
addr = st.integers(0, 0xFFFFFFFF) | special | st.integers(0x7F000000, 0x7FFFFFFF)
port = u16 | st.sampled_from([0, 500, 4500, 0xFFFF])
options = st.integers(0, 10).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words))
not_first = st.integers(1, 0x1FFF).flatmap(lambda off: st.sampled_from([off, off | 0x2000]))


# -- the reference: RFC 1071 from scratch -----------------------------------------------------------


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_recompute(pkt: bytes) -> bytes:
    """Both checksums from scratch (UDP only when its header is here and its checksum non-zero)."""
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    total, frag = struct.unpack_from("!H", buf, 2)[0], struct.unpack_from("!H", buf, 6)[0]
    if buf[9] == 17 and not frag & 0x1FFF and struct.unpack_from("!H", buf, ihl + 6)[0]:
        udp = bytearray(buf[ihl:total])
        udp[6:8] = b"\x00\x00"
        pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, 17, len(udp))
        struct.pack_into("!H", buf, ihl + 6, (~ones_sum(pseudo + bytes(udp)) & 0xFFFF) or 0xFFFF)
    buf[10:12] = b"\x00\x00"
    struct.pack_into("!H", buf, 10, ~ones_sum(bytes(buf[:ihl])) & 0xFFFF)
    return bytes(buf)


def with_fields(pkt: bytes, *, dst=None, src=None, dport=None, sport=None) -> bytes:
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    for value, fmt, off in ((src, "!I", 12), (dst, "!I", 16), (sport, "!H", ihl), (dport, "!H", ihl + 2)):
        if value is not None:
            struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


def has_udp_header(pkt: bytes) -> bool:
    return pkt[9] == 17 and not struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF


# -- packets ---------------------------------------------------------------------------------------


@st.composite
def udp_packets(draw):
    """A valid IPv4/UDP packet: random addresses, ports, payload, TTL, ID, DF, options; checksum kept
    (or zero, "none")."""
    src, dst, sport, dport = draw(addr), draw(addr), draw(port), draw(port)
    payload = draw(st.binary(max_size=300))
    df = draw(st.sampled_from([0, 0x4000]))
    pkt = build_ipv4_udp(src, dst, sport, dport, payload, ttl=draw(u8), ident=draw(u16), flags_frag=df)
    opts = draw(options)
    if opts:  # same UDP datagram (the UDP checksum does not cover IP options), longer IP header
        pkt = build_ipv4(src, dst, 17, pkt[20:], ttl=pkt[8], ident=draw(u16), options=opts, tos=draw(u8))
    if draw(st.booleans()):
        ihl = (pkt[0] & 0x0F) * 4
        pkt = pkt[: ihl + 6] + b"\x00\x00" + pkt[ihl + 8 :]
    return pkt


@st.composite
def esp_packets(draw):
    body = struct.pack("!II", draw(st.integers(1, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFFFFFF)))
    body += draw(st.binary(max_size=1400))
    return build_ipv4(
        draw(addr), draw(addr), 50, body, ttl=draw(u8), ident=draw(u16), tos=draw(u8),
        flags_frag=draw(st.sampled_from([0, 0x4000])), options=draw(options),
    )  # fmt: skip


@st.composite
def fragments(draw):
    """Non-first fragments (no L4 header) of UDP or ESP: the payload is just bytes."""
    proto, data = draw(st.sampled_from([17, 50, 51])), draw(st.binary(min_size=8, max_size=200))
    src, dst, ident, flags_frag = draw(addr), draw(addr), draw(u16), draw(not_first)
    return build_ipv4(src, dst, proto, data, ident=ident, flags_frag=flags_frag, options=draw(options))


packets = udp_packets() | esp_packets() | fragments()

# Any other protocol, payload shorter than the 8 bytes ICMP quotes (odd lengths included).
short_packets = st.builds(
    lambda src, dst, proto, data: build_ipv4(src, dst, proto, data),
    addr, addr, st.integers(2, 255), st.binary(max_size=10),
)  # fmt: skip


# -- NAT -------------------------------------------------------------------------------------------


@given(packets, addr, port | st.none())
def test_dnat_equals_full_recompute(pkt, new_dst, new_dport):
    assert ref_recompute(pkt) == pkt
    got = nat_dnat(pkt, new_dst, new_dport)
    udp = has_udp_header(pkt)
    assert got == ref_recompute(with_fields(pkt, dst=new_dst, dport=new_dport if udp else None))


@given(packets, addr, port | st.none())
def test_snat_equals_full_recompute(pkt, new_src, new_sport):
    got = nat_snat(pkt, new_src, new_sport)
    udp = has_udp_header(pkt)
    assert got == ref_recompute(with_fields(pkt, src=new_src, sport=new_sport if udp else None))


def low_half_zeroing(residue_without_addr: int, high: int) -> int:
    """The low 16 bits that, with ``high``, bring a folded sum to 0xFFFF (checksum 0x0000)."""
    return (-(residue_without_addr + high)) % 0xFFFF


@given(packets, st.integers(0, 0xFFFF), st.sampled_from([12, 16]))
def test_ip_checksum_landing_on_zero(pkt, high, offset):
    # Pick the new address so that the full recompute gives IP checksum 0x0000 (folded sum 0xFFFF).
    ihl = (pkt[0] & 0x0F) * 4
    header = bytearray(pkt[:ihl])
    header[offset : offset + 4] = b"\x00\x00\x00\x00"
    header[10:12] = b"\x00\x00"
    new = (high << 16) | low_half_zeroing(ones_sum(bytes(header)), high)
    got = (nat_dnat if offset == 16 else nat_snat)(pkt, new)
    assert got[10:12] == b"\x00\x00"
    assert got == ref_recompute(with_fields(pkt, **{"dst" if offset == 16 else "src": new}))


@given(udp_packets(), st.integers(0, 0xFFFF))
def test_udp_checksum_landing_on_zero_is_sent_as_ffff(pkt, high):
    ihl = (pkt[0] & 0x0F) * 4
    assume(pkt[ihl + 6 : ihl + 8] != b"\x00\x00")
    udp = bytearray(pkt[ihl:])
    udp[6:8] = b"\x00\x00"
    rest = ones_sum(pkt[12:16] + struct.pack("!BBH", 0, 17, len(udp)) + bytes(udp))  # dst left out
    new_dst = (high << 16) | low_half_zeroing(rest, high)
    got = nat_dnat(pkt, new_dst)
    assert got[ihl + 6 : ihl + 8] == b"\xff\xff"
    assert got == ref_recompute(with_fields(pkt, dst=new_dst))
    assert nat_dnat(got, struct.unpack_from("!I", pkt, 16)[0]) == pkt


@given(udp_packets(), addr, port)
def test_zero_udp_checksum_stays_zero_and_nonzero_stays_nonzero(pkt, new_addr, new_port):
    ihl = (pkt[0] & 0x0F) * 4
    before = struct.unpack_from("!H", pkt, ihl + 6)[0]
    for got in (nat_dnat(pkt, new_addr, new_port), nat_snat(pkt, new_addr, new_port)):
        after = struct.unpack_from("!H", got, ihl + 6)[0]
        assert (after == 0) == (before == 0)


@given(packets, addr, port, addr, port)
@example(build_ipv4_udp(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFF, 0xFFFF, b""), 0, 0, 0, 0)
@example(build_ipv4_udp(0, 0, 0, 0, b""), 0xFFFFFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFF)
def test_nat_undone_by_the_symmetric_rewrite(pkt, x, px, y, py):
    ihl = (pkt[0] & 0x0F) * 4
    src, dst = struct.unpack_from("!II", pkt, 12)
    sport, dport = struct.unpack_from("!HH", pkt, ihl)  # meaningful only when a UDP header is here
    assert nat_dnat(nat_dnat(pkt, x, px), dst, dport) == pkt
    assert nat_snat(nat_snat(pkt, y, py), src, sport) == pkt
    # Both sides, undone in the other order.
    both = nat_snat(nat_dnat(pkt, x, px), y, py)
    assert nat_dnat(nat_snat(both, src, sport), dst, dport) == pkt


@given(packets, addr, port, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_wrong_checksums_stay_exactly_as_wrong(pkt, new_dst, new_dport, ip_csum, udp_csum):
    # Incremental updates carry an error through unchanged: the folded sums (the verification
    # residues) of the IP header and of the UDP pseudo-header + datagram are what they were.
    buf = bytearray(pkt)
    ihl = (buf[0] & 0x0F) * 4
    struct.pack_into("!H", buf, 10, ip_csum)
    udp = has_udp_header(pkt) and struct.unpack_from("!H", buf, ihl + 6)[0] != 0
    if udp:
        struct.pack_into("!H", buf, ihl + 6, udp_csum or 1)
    bad = bytes(buf)
    got = nat_dnat(bad, new_dst, new_dport)
    assert ones_sum(got[:ihl]) == ones_sum(bad[:ihl])
    if udp:

        def residue(p):
            return ones_sum(p[12:20] + struct.pack("!BBH", 0, 17, len(p) - ihl) + p[ihl:])

        assert residue(got) == residue(bad)


@given(packets, addr, port, st.binary(min_size=1, max_size=46))
def test_padding_past_total_length_ignored(pkt, new_addr, new_port, padding):
    assert nat_dnat(pkt + padding, new_addr, new_port) == nat_dnat(pkt, new_addr, new_port)
    assert nat_snat(pkt + padding, new_addr, new_port) == nat_snat(pkt, new_addr, new_port)
    assert ipip_encap(pkt + padding, new_addr, new_addr, ident=new_port) == ipip_encap(
        pkt, new_addr, new_addr, ident=new_port
    )


@given(packets, addr, port, st.integers(1, 60))
def test_truncated_copies_refused(pkt, new_addr, new_port, cut):
    assume(cut < len(pkt))
    for fn in (nat_dnat, nat_snat):
        try:
            fn(pkt[:-cut], new_addr, new_port)
        except PacketError as err:
            assert err.reason == DropReason.IP_TRUNCATED
        else:
            raise AssertionError("a truncated copy was rewritten")


# -- IP-in-IP --------------------------------------------------------------------------------------


@given(packets, addr, addr, st.integers(0, 0xFFFFFFFF))
def test_encap_decap_round_trip(pkt, outer_src, outer_dst, ident):
    wrapped = ipip_encap(pkt, outer_src, outer_dst, ident=ident)
    assert ipip_decap(wrapped) == pkt
    assert len(wrapped) == len(pkt) + 20 and wrapped[20:] == pkt
    assert ones_sum(wrapped[:20]) == 0xFFFF
    header = struct.unpack_from("!BBHHHBB", wrapped)  # vihl, TOS, total, ID, flags/frag, TTL, proto
    assert header == (0x45, pkt[1], len(wrapped), ident & 0xFFFF, 0, 64, 4)
    assert struct.unpack_from("!II", wrapped, 12) == (outer_src, outer_dst)


@given(
    st.sampled_from([4, 4, 4, 17, 41, 50]),
    st.sampled_from([0, 0x4000, 0x4000, 0x2000, 0x0001, 0x2005]),
    packets | st.binary(max_size=60),
    st.binary(max_size=8),
)
def test_decap_returns_only_a_whole_inner_packet(proto, flags_frag, inner, extra):
    # Model: decap succeeds exactly when the outer packet is protocol 4, not a fragment, and its
    # payload is one IPv4 packet whose total length is the payload length.
    payload = inner + extra
    outer = build_ipv4(0x0A000001, 0x0A000002, proto, payload, flags_frag=flags_frag)
    whole = (
        len(payload) >= 20 and payload[0] >> 4 == 4 and (payload[0] & 0x0F) >= 5
        and struct.unpack_from("!H", payload, 2)[0] == len(payload)
        and (payload[0] & 0x0F) * 4 <= len(payload)
    )  # fmt: skip
    ok = proto == 4 and not flags_frag & 0x3FFF and whole
    try:
        got = ipip_decap(outer)
    except PacketError:
        assert not ok
    else:
        assert ok and got == payload


# -- ICMP ------------------------------------------------------------------------------------------


def must_refuse(pkt: bytes) -> bool:
    """RFC 1122 section 3.2.2, modelled independently of the code under test."""
    ihl = (pkt[0] & 0x0F) * 4
    frag = struct.unpack_from("!H", pkt, 6)[0]
    src, dst = struct.unpack_from("!II", pkt, 12)
    return bool(frag & 0x1FFF) or src == 0 or src >> 24 == 127 or src >> 28 >= 0xE or dst >> 28 >= 0xE or (
        pkt[9] == 1 and (len(pkt) == ihl or pkt[ihl] in (3, 4, 5, 11, 12) or pkt[ihl] > 18)
    )


icmp_packets = st.builds(
    lambda src, dst, icmp_type, rest: build_ipv4(src, dst, 1, bytes([icmp_type]) + rest),
    addr, addr, u8 | st.integers(0, 42), st.binary(max_size=20),
)  # fmt: skip
icmp_originals = packets | short_packets | icmp_packets


@settings(max_examples=300)
@given(icmp_originals, addr, st.integers(0, 15), st.integers(1, 255))
@example(build_ipv4(0x0A000001, 0x0A000002, 47, b"\x01\x02\x03"), 1, 2, 64)  # odd-length quote
@example(build_ipv4(0xF0000001, 0x0A000002, 50, bytes(8)), 1, 2, 64)  # class E source
@example(build_ipv4(0x0A000001, 0xF0000001, 50, bytes(8)), 1, 2, 64)  # class E destination
@example(build_ipv4(0x0A000001, 0x0A000002, 1, b"\x13\x00" + bytes(6)), 1, 2, 64)  # ICMP type 19
@example(build_ipv4(0x0A000001, 0x0A000002, 1, b"\x12\x00" + bytes(6)), 1, 2, 64)  # ICMP type 18
def test_icmp_unreachable_well_formed_or_refused(orig, src, code, ttl):
    if must_refuse(orig):
        try:
            icmp_unreachable(orig, src, code, ttl)
        except PacketError as err:
            assert err.reason == DropReason.ICMP_SUPPRESSED
        else:
            raise AssertionError("answered a packet RFC 1122 says must not get an ICMP error")
        return
    got = icmp_unreachable(orig, src, code, ttl)
    ihl = (orig[0] & 0x0F) * 4
    quote = orig[: ihl + min(8, len(orig) - ihl)]
    assert got[28:] == quote
    assert ones_sum(got[:20]) == 0xFFFF and ones_sum(got[20:]) == 0xFFFF
    assert struct.unpack_from("!BBHHHBB", got) == (0x45, 0xC0, len(got), 0, 0x4000, ttl, 1)
    assert struct.unpack_from("!II", got, 12) == (src, struct.unpack_from("!I", orig, 12)[0])
    assert got[20:22] == bytes([3, code]) and got[24:28] == b"\x00" * 4
