"""The IPv6 rewrites, pure: NAT66 toward a real server and back, NAT of an ICMPv6 error, and the
ICMPv6 parameter problem that answers ESP or AH with no state. ``director.forwarding.rewrite``
hands IPv6 packets here, so callers use one set of functions for both families.

IPv6 has no header checksum; what NAT changes is the UDP checksum (mandatory over IPv6, RFC 8200
section 8.1) and the ICMPv6 checksum, both over a pseudo-header holding the addresses. Both are
updated incrementally as for IPv4 (RFC 1624 equation 3): 2**16 is 1 modulo 0xFFFF, so a 128-bit
address enters the ones' complement sum whole, as a 32-bit one does in ``rewrite``.

References: RFC 8200 (IPv6), RFC 4443 (ICMPv6), RFC 1624, RFC 6296 section 3 (NAT66 keeps the
checksums right by rewriting them, as here; it is not the checksum-neutral NPTv6 mapping).
"""

import struct

from director.drop_reasons import DropReason
from director.packet import PacketError, ipv6_header, ipv6_upper, upper_checksum6

__all__ = ["icmp6_error_dnat", "icmp6_param_problem", "ip6ip6_encap", "nat6"]

_M128 = (1 << 128) - 1
_PROTO_UDP = 17
_PROTO_ICMP6 = 58
_PROTO_IPV6 = 41  # IPv6 in IPv6 (RFC 2473)
_FIRST = 0xFFF8  # the offset bits of a fragment word: zero in an unfragmented packet or a first fragment
_U16 = struct.Struct("!H")
_UDP = struct.Struct("!HHHH")
_R_IP_TRUNCATED = DropReason.IP_TRUNCATED
_R_ICMP_TRUNCATED = DropReason.ICMP_TRUNCATED
_R_ICMP_QUOTE_TRUNCATED = DropReason.ICMP_QUOTE_TRUNCATED
_R_ICMP_QUOTE_MALFORMED = DropReason.ICMP_QUOTE_MALFORMED
_R_ICMP_SUPPRESSED = DropReason.ICMP_SUPPRESSED
_QUOTE_L4 = 8  # bytes of the upper layer quoted in a parameter problem: as rewrite.icmp_unreachable


def _whole(pkt) -> tuple[bytearray, int, int, int, int]:
    """(working copy without padding, payload length, next header, src, dst); a truncated copy is refused."""
    buf = bytearray(pkt)
    plen, nh, src, dst = ipv6_header(buf)
    total = 40 + plen
    if len(buf) < total:
        raise PacketError(_R_IP_TRUNCATED)
    del buf[total:]
    return buf, plen, nh, src, dst


def nat6(pkt, new_addr: int, new_port: int | None, dst: bool) -> bytes:
    """NAT66 of one packet: the destination (``dst``) or source becomes ``new_addr``, and the UDP
    port ``new_port`` (None: kept). The UDP checksum follows when the UDP header is here (not in a
    non-first fragment); ESP and AH carry none. Raises PacketError as ``rewrite.nat_dnat``, and
    the IP6_* reasons for a malformed extension-header chain."""
    buf, plen, nh, src, dst_addr = _whole(pkt)
    proto, off, frag = ipv6_upper(buf, nh, 40 + plen)
    old = dst_addr if dst else src
    if proto == _PROTO_UDP and not frag & _FIRST:
        if 40 + plen - off < 8:
            raise PacketError(DropReason.UDP_TRUNCATED)
        sport, dport, ulen, uc = _UDP.unpack_from(buf, off)
        old_port = dport if dst else sport
        if new_port is None:
            new_port = old_port
        if uc:
            s = (uc ^ 0xFFFF) + (old ^ _M128) + new_addr + (old_port ^ 0xFFFF) + new_port
            uc = 0xFFFE - (s - 1) % 0xFFFF or 0xFFFF
        if dst:
            _UDP.pack_into(buf, off, sport, new_port, ulen, uc)
        else:
            _UDP.pack_into(buf, off, new_port, dport, ulen, uc)
    buf[24 if dst else 8:40 if dst else 24] = new_addr.to_bytes(16, "big")
    return bytes(buf)


def ip6ip6_encap(pkt, src: int, dst: int, hop_limit: int = 64) -> bytes:
    """The IPv6 packet ``pkt`` (trimmed to its payload length) inside an outer IPv6 header from
    ``src`` to ``dst``, next header 41 (RFC 2473), the traffic class copied whole (RFC 6040
    section 4.1, normal mode), flow label 0, no extension headers. The inner packet is not
    touched (no hop limit decrement, as for the IPv4 envelope). Raises PacketError for a
    truncated or malformed inner header; ValueError past 65,535 bytes of payload (no jumbograms)."""
    buf, plen, _nh, _src, _dst = _whole(pkt)
    if len(buf) > 0xFFFF:
        raise ValueError("ip6ip6_encap: the envelope's payload would exceed 65,535 bytes")
    tclass = (buf[0] & 0x0F) << 4 | buf[1] >> 4
    head = struct.pack("!IHBB", 6 << 28 | tclass << 20, len(buf), _PROTO_IPV6, hop_limit)
    return head + src.to_bytes(16, "big") + dst.to_bytes(16, "big") + bytes(buf)


def icmp6_error_dnat(pkt, new_addr: int) -> bytes:
    """NAT of an ICMPv6 error about a conversation toward its real server, as
    ``rewrite.icmp_error_dnat`` for IPv4: the outer destination (the VIP) and the quoted source
    (the VIP) become ``new_addr``. The quoted UDP checksum follows when the quote holds it, and the
    ICMPv6 checksum follows all three (its pseudo-header holds the outer destination)."""
    buf, plen, nh, src, vip = _whole(pkt)
    total = 40 + plen
    proto, off, frag = ipv6_upper(buf, nh, total)
    if proto != _PROTO_ICMP6 or frag or total - off < 8:
        raise PacketError(_R_ICMP_TRUNCATED)
    q = off + 8
    if total - q < 40:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    if buf[q] >> 4 != 6 or int.from_bytes(buf[q + 8:q + 24], "big") != vip:
        raise PacketError(_R_ICMP_QUOTE_MALFORMED)
    delta = (vip ^ _M128) + new_addr
    ic = _U16.unpack_from(buf, off + 2)[0]
    ics = (ic ^ 0xFFFF) + 2 * delta  # the pseudo-header's destination and the quoted source
    quote = bytes(buf[q:total])
    try:
        qproto, qoff, qfrag = ipv6_upper(quote, quote[6], 40 + int.from_bytes(quote[4:6], "big"))
    except PacketError:
        qproto, qoff, qfrag = -1, 0, 0  # a quote cut inside its chain: no UDP header to follow
    u = q + qoff
    if qproto == _PROTO_UDP and not qfrag & _FIRST and total - u >= 8:
        uc = _U16.unpack_from(buf, u + 6)[0]
        if uc:
            s = (uc ^ 0xFFFF) + delta
            new_uc = 0xFFFE - (s - 1) % 0xFFFF or 0xFFFF
            _U16.pack_into(buf, u + 6, new_uc)
            ics += (uc ^ 0xFFFF) + new_uc
    _U16.pack_into(buf, off + 2, 0xFFFE - (ics - 1) % 0xFFFF)
    buf[q + 8:q + 24] = new_addr.to_bytes(16, "big")
    buf[24:40] = new_addr.to_bytes(16, "big")
    return bytes(buf)


def icmp6_param_problem(orig, src: int, hop_limit: int = 64) -> bytes:
    """ICMPv6 parameter problem, code 1 (unrecognized next header), from ``src`` to the source
    of ``orig``: IPv6's answer to ESP or AH with no state here (RFC 4443 section 3.4), the
    counterpart of ICMP protocol-unreachable.

    The pointer is the offset of the next-header field that names the ESP or AH header (6 with no
    extension headers, else the first byte of the header before it). The quote is the original's
    headers, extension headers included, and the first 8 bytes of ESP or AH (SPI and sequence
    number), no more, as ``rewrite.icmp_unreachable`` quotes for IPv4, and for the same reasons.

    Refused with ICMP_SUPPRESSED (RFC 4443 section 2.4 e): a multicast source or destination, or
    an original that is not ESP or AH (the director answers nothing else with this error)."""
    orig = bytes(orig)
    plen, nh, osrc, odst = ipv6_header(orig)
    if osrc >> 120 == 0xFF or odst >> 120 == 0xFF:
        raise PacketError(_R_ICMP_SUPPRESSED)
    pointer, off, count = 6, 40, 0
    while nh in (0, 43, 60) and count < 8:  # the chain classify already walked and accepted
        pointer = off
        nh, off = orig[off], off + ((orig[off + 1] + 1) << 3)
        count += 1
    if nh not in (50, 51):
        raise PacketError(_R_ICMP_SUPPRESSED)
    end = min(off + _QUOTE_L4, 40 + plen)
    if len(orig) < end:
        raise PacketError(_R_IP_TRUNCATED)
    body = bytes([4, 1, 0, 0]) + pointer.to_bytes(4, "big") + orig[:end]
    csum = upper_checksum6(src, osrc, _PROTO_ICMP6, body)
    head = struct.pack("!IHBB", 6 << 28, len(body), _PROTO_ICMP6, hop_limit)
    return head + src.to_bytes(16, "big") + osrc.to_bytes(16, "big") + body[:2] + csum.to_bytes(2, "big") + body[4:]
