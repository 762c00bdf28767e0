"""Property tests for director.forwarding.rewrite: incremental checksums equal a full recompute, NAT
undoes itself, decap(encap(p)) == p, ICMP answers are well formed or refused for the RFC reasons."""

import struct

from hypothesis import assume, example, given
from hypothesis import strategies as st

from director.drop_reasons import DropReason
from director.forwarding.rewrite import icmp_unreachable, ipip_decap, ipip_encap, nat_dnat, nat_snat
from director.packet import PacketError, build_ipv4, build_ipv4_udp

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
addr = st.integers(0, 0xFFFFFFFF) | st.sampled_from([0, 0xFFFFFFFF, 0x0A000001, 0xC6336401])
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
    return build_ipv4(
        draw(addr), draw(addr), proto, data, ident=draw(u16), flags_frag=draw(not_first), options=draw(options)
    )


packets = udp_packets() | esp_packets() | fragments()


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
    addr, addr, u8, st.binary(max_size=20),
)  # fmt: skip
icmp_originals = packets | icmp_packets


@given(icmp_originals, addr, st.integers(0, 15), st.integers(1, 255))
def test_icmp_unreachable_well_formed_or_refused(orig, src, code, ttl):
    if must_refuse(orig):
        try:
            icmp_unreachable(orig, src, code, ttl)
        except PacketError as err:
            assert err.reason == DropReason.NO_ENTRY  # stand-in for ICMP_SUPPRESSED
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
