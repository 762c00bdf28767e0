"""The director's packet rewrites, pure: bytes in, bytes out (NAT, IP-in-IP, ICMP errors).

These run per packet from user space (NFQUEUE ``set_payload``), so each one parses only the fields it
needs with a precompiled :class:`struct.Struct`, makes one working copy, and returns ``bytes`` (what
``set_payload`` takes). Input may be ``bytes``, ``bytearray`` or a ``memoryview``. Malformed input
raises :class:`~director.packet.PacketError` carrying a :class:`DropReason`; a packet shorter than its
IP total length (a truncated NFQUEUE copy) is refused, never rewritten. Bytes past the total length
(link-layer padding) are not part of the packet and are not carried into the result.

Checksums. NAT changes 32-bit addresses and 16-bit ports, so it updates checksums incrementally,
RFC 1624 equation 3: ``HC' = ~(~HC + ~m + m')``. Ones' complement sums are sums modulo 0xFFFF (2**16
is 1 modulo 0xFFFF), so a 32-bit address enters the sum whole instead of as two 16-bit halves, and
the end-around-carry fold of a positive sum ``s`` is ``(s - 1) % 0xFFFF + 1``: the one value in
1..0xFFFF congruent to ``s``, exactly what a full recompute folds to, so the incremental result is
byte-identical to a full recompute (a correct checksum stays correct, a wrong one stays exactly as
wrong; neither is "fixed"). The headers this module builds itself get their checksums from the
same modular sum of their field values, and the ICMP checksum from ``int.from_bytes`` of the quoted
bytes modulo 0xFFFF: both are variants of :func:`director.packet.ipv4_checksum` kept here because
that function (right for tests and tooling) copies the bytes and builds a format string per call,
several times slower than one big-int remainder; none of the three is a copy of it.

References: RFC 791 (IPv4), RFC 768 (UDP), RFC 1071 and RFC 1624 (checksum and its incremental
update), RFC 2003 (IP-in-IP), RFC 6040 (ECN in tunnels), RFC 792, RFC 1122 section 3.2.2 and RFC 1812
section 4.3.2 (ICMP errors), RFC 6864 (the IPv4 ID field).
"""

import struct

from director.drop_reasons import DropReason
from director.forwarding.rewrite6 import icmp6_error_dnat, icmp6_param_problem, nat6
from director.packet import PacketError, ipv4_header

__all__ = ["icmp_error_dnat", "icmp_no_state", "icmp_unreachable", "ipip_decap", "ipip_encap", "nat_dnat", "nat_snat"]

_PROTO_ICMP = 1
_PROTO_IPIP = 4  # RFC 2003
_PROTO_UDP = 17
_OFFSET = 0x1FFF  # fragment offset bits of the flags/fragment word
_MF_OR_OFFSET = 0x3FFF  # More Fragments | offset: any fragment at all

# vihl, total length, flags/fragment, protocol, header checksum, source, destination ("x" skips TOS,
# ID and TTL without building ints for them)
_U16 = struct.Struct("!H")
_CSUM_ADDRS = struct.Struct("!HII")  # header checksum, source, destination: written at offset 10
_UDP = struct.Struct("!HHHH")  # sport, dport, length, checksum
_TOS_TOTAL = struct.Struct("!BBH")  # vihl, TOS, total length: what encapsulation reads
_IP_FULL = struct.Struct("!BBHHHBBHII")  # a whole 20-byte IPv4 header, for the one we prepend
_ICMP_ERROR = struct.Struct("!BBHHHBBHIIBBHI")  # 20-byte IPv4 header + 8-byte ICMP error header
_QUOTE = struct.Struct("!BxHxxHxBHI")  # a quoted IPv4 header: vihl, total, flags/frag, proto, checksum, src

_R_IP_TRUNCATED = DropReason.IP_TRUNCATED
_R_IP_BAD_VERSION = DropReason.IP_BAD_VERSION
_R_IP_BAD_IHL = DropReason.IP_BAD_IHL
_R_IP_BAD_TOTAL_LENGTH = DropReason.IP_BAD_TOTAL_LENGTH
_R_UDP_TRUNCATED = DropReason.UDP_TRUNCATED
_R_ICMP_TRUNCATED = DropReason.ICMP_TRUNCATED
_R_ICMP_QUOTE_TRUNCATED = DropReason.ICMP_QUOTE_TRUNCATED
_R_ICMP_QUOTE_MALFORMED = DropReason.ICMP_QUOTE_MALFORMED
# RFC 1122 section 3.2.2 forbids an ICMP error about this packet: the drop stands, the answer is withheld.
_R_ICMP_SUPPRESSED = DropReason.ICMP_SUPPRESSED

# ICMP types that are errors (RFC 792, RFC 1122 section 3.2.2: 3, 4, 5, 11, 12). A type above 18
# (the last one RFC 792 and RFC 950 define) is treated as an error too, as Linux's __icmp_send
# does: never answer what might be an error with an error.
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
_ICMP_LAST_KNOWN_TYPE = 18

_ICMP_ERROR_TOS = 0xC0  # RFC 1812 section 4.3.2.5: precedence 6 (internetwork control), ECN Not-ECT
_ICMP_QUOTE = 8  # RFC 792: the original IP header plus the first 64 bits of its data


def _nat(pkt: bytes | bytearray | memoryview, new_addr: int, new_port: int | None, dst: bool) -> bytes:
    """Rewrite the destination (``dst``) or source address and UDP port; see nat_dnat/nat_snat."""
    if len(pkt) and pkt[0] >> 4 == 6:
        return nat6(pkt, new_addr, new_port, dst)
    buf = bytearray(pkt)  # the one working copy
    n = len(buf)
    ihl, total, frag, proto, src_addr, dst_addr = ipv4_header(buf)
    hc = _U16.unpack_from(buf, 10)[0]
    if n < total:
        raise PacketError(_R_IP_TRUNCATED)  # a truncated copy: rewriting it would send a stub
    if n > total:
        del buf[total:]  # link-layer padding
    if proto == _PROTO_UDP and not frag & _OFFSET:
        # Unfragmented or first fragment: the UDP header is here. In a first fragment the UDP
        # checksum covers the whole reassembled datagram; an incremental update is still exact.
        if total - ihl < 8:
            raise PacketError(_R_UDP_TRUNCATED)
        sport, dport, ulen, uc = _UDP.unpack_from(buf, ihl)
        old_addr = dst_addr if dst else src_addr
        old_port = dport if dst else sport
        if new_port is None:
            new_port = old_port
        if uc:  # zero means "no checksum" (RFC 768) and stays zero
            # Pseudo-header address and port, one sum; a computed 0 goes on the wire as 0xFFFF.
            s = (uc ^ 0xFFFF) + (old_addr ^ 0xFFFFFFFF) + new_addr + (old_port ^ 0xFFFF) + new_port
            uc = 0xFFFE - (s - 1) % 0xFFFF or 0xFFFF
        if dst:
            _UDP.pack_into(buf, ihl, sport, new_port, ulen, uc)
        else:
            _UDP.pack_into(buf, ihl, new_port, dport, ulen, uc)
    # Otherwise ESP and AH (no pseudo-header checksum) and non-first fragments (no L4 header): only
    # the IP header changes.
    if dst:
        s = (hc ^ 0xFFFF) + (dst_addr ^ 0xFFFFFFFF) + new_addr
        _CSUM_ADDRS.pack_into(buf, 10, 0xFFFE - (s - 1) % 0xFFFF, src_addr, new_addr)
    else:
        s = (hc ^ 0xFFFF) + (src_addr ^ 0xFFFFFFFF) + new_addr
        _CSUM_ADDRS.pack_into(buf, 10, 0xFFFE - (s - 1) % 0xFFFF, new_addr, dst_addr)
    return bytes(buf)


def nat_dnat(pkt: bytes | bytearray | memoryview, new_dst: int, new_dport: int | None = None) -> bytes:
    """NAT toward a real server: the IPv4 destination becomes ``new_dst`` (VIP -> RIP).

    ``new_dport``, when given, replaces the UDP destination port; it is ignored where the packet
    carries no UDP header (ESP, AH, a non-first fragment, whose port lives in the first fragment).
    The IP header checksum is updated incrementally (RFC 1624), and so is the UDP checksum when the
    packet is UDP (unfragmented or first fragment) and the checksum is non-zero; a zero UDP checksum
    stays zero. Only UDP gets an L4 fix: TCP, UDP-Lite or DCCP rewritten here would keep a stale
    pseudo-header checksum, and the director never forwards them (the core drops ``NOT_OURS``). The
    headers quoted inside ICMP errors are not rewritten either, for the same reason. NAT breaks AH
    (its ICV covers the addresses); the config refuses AH with NAT.

    Raises PacketError: IP_TRUNCATED when the buffer is shorter than the total length, the IP_*
    reasons for a malformed header, UDP_TRUNCATED when a UDP packet or first fragment has no room
    for its 8-byte header.
    """
    return _nat(pkt, new_dst, new_dport, True)


def nat_snat(pkt: bytes | bytearray | memoryview, new_src: int, new_sport: int | None = None) -> bytes:
    """NAT of a reply: the IPv4 source becomes ``new_src`` (RIP -> VIP), ``new_sport`` the UDP source port.

    Everything else as :func:`nat_dnat`, on the source side.
    """
    return _nat(pkt, new_src, new_sport, False)


def icmp_error_dnat(pkt: bytes | bytearray | memoryview, new_addr: int) -> bytes:
    """NAT of an ICMP error about a conversation, toward its real server (IPVS's ip_vs_nat_icmp).

    The error came to the VIP and quotes the packet the VIP sent (source VIP, destination client);
    the real server sent that packet from its own address, and the director's reply NAT rewrote it.
    So both VIPs become ``new_addr``: the outer destination and the quoted source. Four checksums,
    each updated incrementally (RFC 1624), so a wrong one stays exactly as wrong:

    - the outer IPv4 header's (its destination);
    - the quoted IPv4 header's (its source);
    - the quoted UDP checksum when the quote holds it and it is non-zero (its pseudo-header source:
      it becomes the checksum the real server sent, though the rest of the datagram is not here);
    - the ICMP checksum, over everything the three changes touched inside the ICMP message (all
      at even offsets from its start: 8 + 12, 8 + 10, 8 + IHL + 6).

    Ports stay (NAT mode keeps them). Raises PacketError: the IP_* reasons and IP_TRUNCATED as
    :func:`nat_dnat`; ICMP_TRUNCATED / ICMP_QUOTE_TRUNCATED / ICMP_QUOTE_MALFORMED as
    :func:`director.packet.parse_icmp_error`; ICMP_QUOTE_MALFORMED also when the quoted source is
    not the outer destination (the core matched on exactly that).
    """
    if len(pkt) and pkt[0] >> 4 == 6:
        return icmp6_error_dnat(pkt, new_addr)
    buf = bytearray(pkt)
    n = len(buf)
    ihl, total, frag, proto, src_addr, vip = ipv4_header(buf)
    if n < total:
        raise PacketError(_R_IP_TRUNCATED)
    if n > total:
        del buf[total:]
    if proto != _PROTO_ICMP or frag & _MF_OR_OFFSET or total - ihl < 8:
        raise PacketError(_R_ICMP_TRUNCATED)
    q = ihl + 8
    if total - q < 20:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    qvihl, qtotal, qfrag, qproto, qhc, qsrc = _QUOTE.unpack_from(buf, q)
    qihl = (qvihl & 0x0F) << 2
    if qvihl >> 4 != 4 or qihl < 20 or qtotal < qihl or qsrc != vip:
        raise PacketError(_R_ICMP_QUOTE_MALFORMED)
    if total - q < qihl:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    ic = _U16.unpack_from(buf, ihl + 2)[0]
    addr_delta = (vip ^ 0xFFFFFFFF) + new_addr  # one 32-bit address, old out and new in
    # the quoted IPv4 header: source and its checksum
    s = (qhc ^ 0xFFFF) + addr_delta
    new_qhc = 0xFFFE - (s - 1) % 0xFFFF
    struct.pack_into("!H", buf, q + 10, new_qhc)
    struct.pack_into("!I", buf, q + 12, new_addr)
    ics = (ic ^ 0xFFFF) + addr_delta + (qhc ^ 0xFFFF) + new_qhc
    # the quoted UDP checksum, when the quote holds it
    u = q + qihl
    if qproto == _PROTO_UDP and not qfrag & _OFFSET and total - u >= 8:
        uc = _U16.unpack_from(buf, u + 6)[0]
        if uc:
            s = (uc ^ 0xFFFF) + addr_delta
            new_uc = 0xFFFE - (s - 1) % 0xFFFF or 0xFFFF
            struct.pack_into("!H", buf, u + 6, new_uc)
            ics += (uc ^ 0xFFFF) + new_uc
    _U16.pack_into(buf, ihl + 2, 0xFFFE - (ics - 1) % 0xFFFF)
    # the outer header: destination VIP -> real server
    hc = _U16.unpack_from(buf, 10)[0]
    s = (hc ^ 0xFFFF) + addr_delta
    _CSUM_ADDRS.pack_into(buf, 10, 0xFFFE - (s - 1) % 0xFFFF, src_addr, new_addr)
    return bytes(buf)


def ipip_encap(
    pkt: bytes | bytearray | memoryview, outer_src: int, outer_dst: int, *, ident: int
) -> bytes:
    """The TUN method: ``pkt`` inside a new outer IPv4 header (RFC 2003), from ``outer_src`` to ``outer_dst``.

    The outer header: IHL 5 (no options), protocol 4, TTL 64, Identification ``ident`` (a
    per-director counter; taken modulo 2**16 so the caller may pass a running count), and DF clear
    on purpose. The encapsulated packet can be 20 bytes over the path MTU; with DF clear the
    envelope may be fragmented on the way and the real server reassembles it before decapsulating,
    so a 1500-byte inner packet with DF set still crosses a 1500-MTU path (the Moat lesson,
    docs/architecture.md: fragment the envelope, never the inner packet). A unique ``ident`` is what makes
    that reassembly safe (RFC 6864 section 4.1), hence the counter.

    The outer TOS byte is the inner one, whole: DSCP copied (uniform model) and the ECN field
    copied as RFC 6040 section 4.1 "normal mode" requires, Congestion Experienced included (the
    compatibility mode that writes Not-ECT is for decapsulators that predate RFC 6040).

    The inner packet is not touched (its DF bit, TTL and checksum stay); bytes past its total
    length are not carried. Raises PacketError for a malformed or truncated inner header, and
    IP_BAD_TOTAL_LENGTH when the envelope would exceed 65535 bytes.
    """
    if type(pkt) is not bytes:
        pkt = bytes(pkt)  # also the raw bytes of a memoryview of wider items
    n = len(pkt)
    _ihl, total, _frag, _proto, _src, _dst = ipv4_header(pkt)
    tos = pkt[1]
    if n < total:
        raise PacketError(_R_IP_TRUNCATED)
    outer_total = total + 20
    if outer_total > 0xFFFF:
        raise PacketError(_R_IP_BAD_TOTAL_LENGTH)
    ident &= 0xFFFF
    # Sum of the header's words with the checksum zero: 0x45|TOS, total, ID, flags 0, TTL 64|proto 4.
    s = 0x4500 + tos + outer_total + ident + 0x4004 + outer_src + outer_dst
    header = _IP_FULL.pack(
        0x45, tos, outer_total, ident, 0, 64, _PROTO_IPIP, 0xFFFE - (s - 1) % 0xFFFF, outer_src, outer_dst
    )
    return header + (pkt if n == total else pkt[:total])


def ipip_decap(pkt: bytes | bytearray | memoryview) -> bytes:
    """The inner packet of an IP-in-IP packet (tests and the lab; production decapsulates in the kernel).

    Raises PacketError when the packet is not one whole IP-in-IP packet: IP_* reasons for a malformed
    or truncated outer header; IP_BAD_VERSION when the outer protocol is not 4 (the payload is not
    announced as IPv4); IP_TRUNCATED when the outer packet is a fragment (only part of the inner
    packet is here; reassemble first) or the inner packet is longer than the outer payload;
    IP_BAD_VERSION, IP_BAD_IHL or IP_BAD_TOTAL_LENGTH for a malformed inner header, or an inner total
    length shorter than the outer payload. Checksums are not verified (the kernel verified the outer
    one before user space saw the packet; tests check checksums themselves).
    """
    if type(pkt) is not bytes:
        pkt = bytes(pkt)
    ihl, total, frag, proto, _src, _dst = ipv4_header(pkt)
    if len(pkt) < total:
        raise PacketError(_R_IP_TRUNCATED)
    if proto != _PROTO_IPIP:
        raise PacketError(_R_IP_BAD_VERSION)
    if frag & _MF_OR_OFFSET:
        raise PacketError(_R_IP_TRUNCATED)
    size = total - ihl
    if size < 20:
        raise PacketError(_R_IP_TRUNCATED)
    ivihl, _tos, itotal = _TOS_TOTAL.unpack_from(pkt, ihl)
    if ivihl >> 4 != 4:
        raise PacketError(_R_IP_BAD_VERSION)
    iihl = (ivihl & 0x0F) << 2
    if iihl < 20:
        raise PacketError(_R_IP_BAD_IHL)
    if itotal < iihl or itotal < size:
        raise PacketError(_R_IP_BAD_TOTAL_LENGTH)
    if itotal > size or iihl > size:
        raise PacketError(_R_IP_TRUNCATED)
    return pkt[ihl:total]


def icmp_unreachable(orig: bytes | bytearray | memoryview, src: int, code: int = 2, ttl: int = 64) -> bytes:
    """An ICMP Destination Unreachable (type 3, ``code``) from ``src`` about ``orig``, to its source.

    A complete IPv4 packet (RFC 792): IHL 5, TOS 0xC0 (RFC 1812 section 4.3.2.5: precedence 6 for
    ICMP errors), DF set with ID 0 (an atomic datagram, RFC 6864 section 4.1: at most 96 bytes, so it
    never needs fragmenting, and a pure function has no counter for unique IDs), ``ttl``, protocol 1;
    then type 3, ``code`` (2 = protocol unreachable), checksum, four unused zero bytes (so a code 4
    carries next-hop MTU 0), then the original IP header, options included, and the first 8 bytes of
    its data (fewer if it has fewer), exactly as received.

    Eight bytes, not the up-to-576-byte quote RFC 1812 section 4.3.2.3 allows: they already hold
    what the sender needs to match the error to its flow (the UDP ports; the ESP SPI and sequence
    number, which RFC 4301 section 6 uses to find the SA; AH's SPI is in its first 8 bytes too).
    Anything more would echo ciphertext back, make the answer larger for a spoofed source to
    reflect, and cost a bigger copy per answered packet.

    Refused with PacketError (reason ICMP_SUPPRESSED) for originals no
    ICMP error may answer (RFC 1122 section 3.2.2, RFC 1812 section 4.3.2.7): an ICMP error (types 3,
    4, 5, 11, 12, any type above 18, or an ICMP packet too short to show its type); a non-first
    fragment; a destination that is multicast, limited broadcast or class E (224.0.0.0 and up); a
    source that does not name one host: 0.0.0.0, loopback 127/8, multicast, class E or broadcast
    (224.0.0.0 and up). Directed broadcasts of a subnet and link-layer broadcasts cannot be seen from
    the bytes: the caller filters them, and rate-limits answers (RFC 1812 section 4.3.2.8). The IP_*
    reasons come back for a malformed header, IP_TRUNCATED when the buffer lacks the bytes to quote.
    """
    if type(orig) is not bytes:
        orig = bytes(orig)
    n = len(orig)
    ihl, total, frag, proto, osrc, odst = ipv4_header(orig)
    if frag & _OFFSET:
        raise PacketError(_R_ICMP_SUPPRESSED)  # non-first fragment
    if odst >= 0xE0000000 or osrc >= 0xE0000000 or not osrc or osrc >> 24 == 127:
        raise PacketError(_R_ICMP_SUPPRESSED)
    if proto == _PROTO_ICMP:
        if total == ihl or n == ihl:
            raise PacketError(_R_ICMP_SUPPRESSED)  # cannot tell it is not an error
        itype = orig[ihl]
        if itype in _ICMP_ERROR_TYPES or itype > _ICMP_LAST_KNOWN_TYPE:
            raise PacketError(_R_ICMP_SUPPRESSED)
    qlen = ihl + min(total - ihl, _ICMP_QUOTE)
    if n < qlen:
        raise PacketError(_R_IP_TRUNCATED)
    quote = orig[:qlen]
    # ICMP checksum: the word type 3|code plus the quote (a trailing odd byte is a word's high byte).
    s = 0x0300 + code + (int.from_bytes(quote, "big") << 8 if qlen & 1 else int.from_bytes(quote, "big"))
    icmp_csum = 0xFFFE - (s - 1) % 0xFFFF
    total_out = 28 + qlen
    # IP header words with the checksum zero: 0x45|TOS, total, ID 0, DF, TTL|proto 1, addresses.
    s = 0x4500 + _ICMP_ERROR_TOS + total_out + 0x4000 + (ttl << 8) + _PROTO_ICMP + src + osrc
    header = _ICMP_ERROR.pack(
        0x45, _ICMP_ERROR_TOS, total_out, 0, 0x4000, ttl, _PROTO_ICMP, 0xFFFE - (s - 1) % 0xFFFF,
        src, osrc, 3, code, icmp_csum, 0,
    )  # fmt: skip
    return header + quote


def icmp_no_state(orig: bytes | bytearray | memoryview, src: int) -> bytes:
    """The answer to ESP or AH with no state: ICMP protocol-unreachable (IPv4) or ICMPv6 parameter
    problem, unrecognized next header (IPv6: rewrite6.icmp6_param_problem)."""
    if len(orig) and orig[0] >> 4 == 6:
        return icmp6_param_problem(orig, src)
    return icmp_unreachable(orig, src)
