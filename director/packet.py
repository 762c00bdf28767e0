"""Classify one IPv4 or IPv6 packet for the director: IKE, NAT-T framing, ESP, AH, or not ours.

Pure parsing of bytes (no I/O, no scapy): :func:`classify` is the per-packet hot path and returns
one :class:`Classified` or raises :class:`PacketError` carrying a :class:`DropReason`; nothing else
escapes for any bytes-like input. The header dataclasses and ``build_*`` helpers below it serve
tests, the lab and tooling; :func:`classify` does not use them.

References: RFC 791 (IPv4), RFC 8200 (IPv6), RFC 1071 (checksum), RFC 768 (UDP), RFC 2408 (ISAKMP), RFC 7296 (IKEv2),
RFC 3948 (UDP encapsulation of ESP), RFC 4303 (ESP), RFC 4302 (AH), RFC 792 and RFC 1812 section
4.3.2.3 (ICMP errors and what they quote), RFC 4443 (ICMPv6).
"""

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Self

from director.drop_reasons import DropReason

__all__ = [
    "AGGRESSIVE",
    "CREATE_CHILD_SA",
    "FLAG_INITIATOR",
    "FLAG_RESPONSE",
    "IKE_AUTH",
    "IKE_HEADER_LEN",
    "IKE_PORT",
    "IKE_SA_INIT",
    "INFORMATIONAL",
    "INFORMATIONAL_V1",
    "MAIN",
    "NATT_KEEPALIVE",
    "NATT_PORT",
    "NON_ESP_MARKER",
    "PROTO_AH",
    "PROTO_ESP",
    "PROTO_UDP",
    "QUICK",
    "AhHeader",
    "Classified",
    "EspHeader",
    "ICMP_ERROR_TYPES",
    "IcmpError",
    "IkeHeader",
    "Ipv4Header",
    "Kind",
    "PacketError",
    "UdpHeader",
    "ICMP6_ERROR_TYPES",
    "IPV6_MIN",
    "MAX_EXT_HEADERS",
    "PROTO_ICMP6",
    "build_ip",
    "build_ip_udp",
    "build_ipv4",
    "build_ipv6",
    "build_ipv6_udp",
    "build_ipv4_udp",
    "classify",
    "ike_header",
    "int_to_ip",
    "ipv6_header",
    "ipv6_upper",
    "is_ipv6",
    "ip_to_int",
    "ipv4_checksum",
    "parse_icmp_error",
    "upper_checksum6",
]

# -- constants ------------------------------------------------------------------------------------

IKE_PORT = 500
NATT_PORT = 4500  # RFC 3948
PROTO_UDP = 17
PROTO_ESP = 50
PROTO_AH = 51
IKE_HEADER_LEN = 28  # RFC 2408 section 3.1, RFC 7296 section 3.1

# Exchange types. IKEv1 (RFC 2408 section 3.1, RFC 2409):
MAIN = 2  # Identity Protection
AGGRESSIVE = 4
INFORMATIONAL_V1 = 5
QUICK = 32
# IKEv2 (RFC 7296 section 3.1):
IKE_SA_INIT = 34
IKE_AUTH = 35
CREATE_CHILD_SA = 36
INFORMATIONAL = 37

# IKEv2 header flags (RFC 7296 section 3.1).
FLAG_INITIATOR = 0x08
FLAG_RESPONSE = 0x20

NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 section 2.2: IKE follows on port 4500
NATT_KEEPALIVE = b"\xff"  # RFC 3948 section 2.3: the whole UDP payload of a NAT-keepalive

_MF_OR_OFFSET = 0x3FFF  # IPv4 flags/fragment word: More Fragments bit | 13-bit fragment offset


class PacketError(ValueError):
    """A malformed packet; ``reason`` says why. The only exception this module raises on bytes."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason.name


class Kind(IntEnum):
    """What :func:`classify` found: one of a closed set of outcomes."""

    NOT_OURS = 0  # not IKE/ESP/AH/4500: not for the director's decision core
    IKE_INITIAL = 1  # IKE with responder cookie/SPI zero
    IKE = 2  # IKE, non-initial (responder cookie/SPI set)
    NATT_KEEPALIVE = 3  # UDP 4500, payload one byte 0xFF
    ESP = 4  # IP protocol 50
    AH = 5  # IP protocol 51
    ESP_IN_UDP = 6  # UDP 4500, non-zero SPI first
    FRAGMENT = 7  # any fragment (IPv4, or IPv6 with a fragment header): left to the stack to reassemble


class Classified(NamedTuple):
    """The facts the director needs about one packet.

    A ``NamedTuple`` on purpose, not a frozen dataclass: one is built per packet on the hot path,
    and building a tuple is several times cheaper than running a frozen dataclass ``__init__``.
    Fields that do not apply to the kind are 0. For ``FRAGMENT`` only src, dst and proto are set.
    """

    kind: Kind
    src: int  # source address as an int (IPv6: 128 bits, never below 2**32)
    dst: int
    proto: int  # IP protocol number
    sport: int  # UDP ports (0 when not UDP)
    dport: int
    spi_i: int  # IKE initiator cookie/SPI, unsigned 64-bit (0 when not IKE)
    spi_r: int  # IKE responder cookie/SPI (0 when not IKE, or zero on the wire)
    spi: int  # ESP/AH/ESP-in-UDP SPI (0 otherwise)
    ike_version: int  # IKE major version, 1 or 2 (0 when not IKE)
    exchange: int  # IKE exchange type
    flags: int  # IKE flags
    msg_id: int  # IKE message ID
    natt: bool  # IKE that came on 4500 behind the non-ESP marker
    l4_offset: int  # offset of the UDP/ESP/AH header in the buffer (IHL*4; IPv6: past the extension headers)
    wire_len: int  # IPv4 total length field; IPv6: 40 + payload length


# -- the hot path ---------------------------------------------------------------------------------

# Only the fields classify needs; "x" skips a byte without building an int for it.
_IP4 = struct.Struct("!BxHxxHxBxxII")  # version/ihl, total length, flags/frag, proto, src, dst
_UDP = struct.Struct("!HHH")  # sport, dport, length (checksum not read)
_U32 = struct.Struct("!I")  # ESP SPI, the non-ESP marker / ESP-in-UDP SPI
_AH = struct.Struct("!xBxxI")  # payload length, SPI
_IKE = struct.Struct("!QQxBBBII")  # spi_i, spi_r, version, exchange, flags, msg_id, length

# Module globals are faster to load than attributes of the enum classes.
_K_NOT_OURS = Kind.NOT_OURS
_K_IKE_INITIAL = Kind.IKE_INITIAL
_K_IKE = Kind.IKE
_K_KEEPALIVE = Kind.NATT_KEEPALIVE
_K_ESP = Kind.ESP
_K_AH = Kind.AH
_K_ESP_IN_UDP = Kind.ESP_IN_UDP
_K_FRAGMENT = Kind.FRAGMENT

_R_IP_TRUNCATED = DropReason.IP_TRUNCATED
_R_IP_BAD_VERSION = DropReason.IP_BAD_VERSION
_R_IP_BAD_IHL = DropReason.IP_BAD_IHL
_R_IP_BAD_TOTAL_LENGTH = DropReason.IP_BAD_TOTAL_LENGTH
_R_IP6_EXT_TRUNCATED = DropReason.IP6_EXT_TRUNCATED
_R_IP6_EXT_CHAIN_TOO_LONG = DropReason.IP6_EXT_CHAIN_TOO_LONG
_R_IP6_BAD_HOP_BY_HOP = DropReason.IP6_BAD_HOP_BY_HOP
_R_IP6_BAD_ADDRESS = DropReason.IP6_BAD_ADDRESS
_R_UDP_TRUNCATED = DropReason.UDP_TRUNCATED
_R_UDP_BAD_LENGTH = DropReason.UDP_BAD_LENGTH
_R_IKE_TRUNCATED = DropReason.IKE_TRUNCATED
_R_IKE_BAD_LENGTH = DropReason.IKE_BAD_LENGTH
_R_IKE_BAD_VERSION = DropReason.IKE_BAD_VERSION
_R_IKE_ZERO_SPI_I = DropReason.IKE_ZERO_SPI_I
_R_NATT_TRUNCATED = DropReason.NATT_TRUNCATED
_R_ESP_TRUNCATED = DropReason.ESP_TRUNCATED
_R_ESP_ZERO_SPI = DropReason.ESP_ZERO_SPI
_R_AH_TRUNCATED = DropReason.AH_TRUNCATED
_R_AH_BAD_LENGTH = DropReason.AH_BAD_LENGTH
_R_AH_ZERO_SPI = DropReason.AH_ZERO_SPI

_new = tuple.__new__  # Classified built without the generated __new__'s Python-level call


def ipv4_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """(IHL in bytes, total length, flags+fragment offset, protocol, src, dst), the header checked.

    The one IPv4 header check of the project (the parser and every rewrite use it): at least 20
    bytes, version 4, IHL >= 5 and within the buffer, total length >= IHL. The total length may
    exceed the buffer (a truncated copy); callers that need the whole packet check that themselves.
    """
    if len(buf) < 20:
        raise PacketError(_R_IP_TRUNCATED)
    vihl, total, frag, proto, src, dst = _IP4.unpack_from(buf)
    if vihl >> 4 != 4:
        raise PacketError(_R_IP_BAD_VERSION)
    ihl = (vihl & 0x0F) << 2
    if ihl < 20:
        raise PacketError(_R_IP_BAD_IHL)
    if len(buf) < ihl:
        raise PacketError(_R_IP_TRUNCATED)
    if total < ihl:
        raise PacketError(_R_IP_BAD_TOTAL_LENGTH)
    return ihl, total, frag, proto, src, dst


IPV6_MIN = 1 << 32  # every IPv6 address int is at least this (ipv6_header refuses ::/96)
MAX_EXT_HEADERS = 8  # extension headers classify walks before it gives up (IP6_EXT_CHAIN_TOO_LONG)
_IP6 = struct.Struct("!xxxxHBxQQQQ")  # payload length, next header, source and destination halves
_EXT = struct.Struct("!BB")  # an extension header's next header and length (8-octet units, minus 1)
_FRAG6 = struct.Struct("!BxH")  # a fragment header's next header and offset/M word
_FRAGMENTED = 0xFFF9  # offset (13 bits) | M: a real fragment, not an atomic one (RFC 6946)


def is_ipv6(addr: int) -> bool:
    """Whether an address int is IPv6: IPv4 ints are below 2**32, IPv6 ones never are."""
    return addr >= IPV6_MIN


def ipv6_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(payload length, next header, src, dst) of the IPv6 header at ``buf[0]``, checked.

    At least 40 bytes, version 6, and neither address in ::/96: the unspecified and loopback
    addresses never appear on a link (RFC 4291 section 2.5.2-3), IPv4-compatible ones are
    deprecated (section 2.5.5.1), and refusing the block keeps every IPv6 int at or above 2**32.
    """
    if len(buf) < 40:
        raise PacketError(_R_IP_TRUNCATED)
    if buf[0] >> 4 != 6:
        raise PacketError(_R_IP_BAD_VERSION)
    plen, nh, s1, s2, d1, d2 = _IP6.unpack_from(buf)
    src = s1 << 64 | s2
    dst = d1 << 64 | d2
    if src < IPV6_MIN or dst < IPV6_MIN:
        raise PacketError(_R_IP6_BAD_ADDRESS)
    return plen, nh, src, dst


def ipv6_upper(buf, nh: int, end: int, base: int = 0) -> tuple[int, int, int]:
    """(upper-layer protocol, its offset, fragment word) past the extension headers of the IPv6
    packet at ``buf[base]`` whose first next-header value is ``nh`` and which ends at ``end``.

    Walked: hop-by-hop (0, first only), routing (43), fragment (44), destination options (60);
    anything else is the upper layer (AH 51 included: the director reads its SPI, so it ends the
    walk). Each header must lie within ``end`` and the buffer (IP6_EXT_TRUNCATED); at most
    :data:`MAX_EXT_HEADERS`. A fragment header that is a real fragment (offset or M set) ends the
    walk: its word is returned (0 otherwise) and the offset is past it, where the first
    fragment's upper-layer header is. An atomic fragment (neither set) is walked over. A routing
    header with segments left ends the walk as protocol 43: the VIP is not the packet's last stop.
    """
    off = base + 40
    n = len(buf)
    count = 0
    while nh == 0 or nh == 43 or nh == 44 or nh == 60:
        if count == MAX_EXT_HEADERS:
            raise PacketError(_R_IP6_EXT_CHAIN_TOO_LONG)
        if nh == 0 and count:
            raise PacketError(_R_IP6_BAD_HOP_BY_HOP)
        count += 1
        if end - off < 8 or n - off < 8:
            raise PacketError(_R_IP6_EXT_TRUNCATED)
        if nh == 44:
            nxt, word = _FRAG6.unpack_from(buf, off)
            off += 8
            if word & _FRAGMENTED:
                return nxt, off, word
            nh = nxt
            continue
        nxt, words = _EXT.unpack_from(buf, off)
        size = (words + 1) << 3
        if end - off < size or n - off < size:
            raise PacketError(_R_IP6_EXT_TRUNCATED)
        if nh == 43 and buf[off + 3]:
            return 43, off, 0
        off += size
        nh = nxt
    return nh, off, 0


def classify(data: bytes | bytearray | memoryview, reply: bool = False) -> Classified:
    """Classify the IPv4 or IPv6 packet that starts at ``data[0]`` (no link-layer header).

    ``reply=True`` classifies the reply direction (real server to client) by its UDP *source*
    port instead of its destination port. The buffer may be longer than the IP total length
    (link-layer padding, ignored) or shorter (a copy truncated by NFQUEUE): lengths are checked
    against the header fields, and only the header bytes actually read must be in the buffer.
    Raises :class:`PacketError` for every malformed packet.

    IPv6 (RFC 8200): the extension-header chain is walked by :func:`ipv6_upper` (at most
    :data:`MAX_EXT_HEADERS`); addresses come out as 128-bit ints, which are never below 2**32
    (:func:`ipv6_header` refuses ::/96), so an address int says its family (:func:`is_ipv6`).
    ``l4_offset`` is where the upper-layer header starts, ``wire_len`` 40 + the payload length.
    """
    if type(data) is memoryview and (data.format != "B" or data.ndim != 1 or not data.c_contiguous):
        data = data.tobytes()  # rare: a view of other items or strides; copy to plain bytes
    n = len(data)
    if n and data[0] >> 4 == 6:
        plen, nh, src, dst = ipv6_header(data)
        total = 40 + plen
        proto, off, frag = ipv6_upper(data, nh, total)
        if frag:
            return _new(Classified, (_K_FRAGMENT, src, dst, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 0))
        return _upper(data, n, off, total, proto, src, dst, reply)
    ihl, total, frag, proto, src, dst = ipv4_header(data)
    if frag & _MF_OR_OFFSET:
        # A non-first fragment has no L4 header; a first one has only part of the message.
        return _new(Classified, (_K_FRAGMENT, src, dst, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 0))
    return _upper(data, n, ihl, total, proto, src, dst, reply)


def _upper(data, n: int, ihl: int, total: int, proto: int, src: int, dst: int, reply: bool) -> Classified:
    """The upper-layer part of :func:`classify`, for both families: ``ihl`` is where the UDP, ESP
    or AH header starts, ``total`` where the packet ends by its IP header."""
    plen = total - ihl  # upper-layer length by the header, whatever the buffer holds

    if proto == 50:  # ESP, RFC 4303 section 2: SPI 4, sequence 4
        if plen < 8 or n < ihl + 8:
            raise PacketError(_R_ESP_TRUNCATED)
        spi = _U32.unpack_from(data, ihl)[0]
        if not spi:
            raise PacketError(_R_ESP_ZERO_SPI)
        return _new(Classified, (_K_ESP, src, dst, 50, 0, 0, 0, 0, spi, 0, 0, 0, 0, False, ihl, total))

    if proto == 51:  # AH, RFC 4302 section 2
        if plen < 12 or n < ihl + 12:
            raise PacketError(_R_AH_TRUNCATED)
        ah_words, spi = _AH.unpack_from(data, ihl)
        ah_len = (ah_words + 2) << 2  # "payload length" is in 32-bit words, minus 2
        if ah_len < 12 or ah_len > plen:
            raise PacketError(_R_AH_BAD_LENGTH)
        if not spi:
            raise PacketError(_R_AH_ZERO_SPI)
        return _new(Classified, (_K_AH, src, dst, 51, 0, 0, 0, 0, spi, 0, 0, 0, 0, False, ihl, total))

    if proto != 17:
        return _new(Classified, (_K_NOT_OURS, src, dst, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, ihl, total))

    # UDP, RFC 768
    if plen < 8 or n < ihl + 8:
        raise PacketError(_R_UDP_TRUNCATED)
    sport, dport, ulen = _UDP.unpack_from(data, ihl)
    if ulen < 8 or ulen > plen:
        raise PacketError(_R_UDP_BAD_LENGTH)
    port = sport if reply else dport
    off = ihl + 8  # start of the UDP payload
    size = ulen - 8  # its length by the UDP header
    if port == 500:
        natt = False
    elif port == 4500:  # RFC 3948 section 2
        if size == 1:
            if n > off and data[off] == 0xFF:
                return _new(
                    Classified,
                    (_K_KEEPALIVE, src, dst, 17, sport, dport, 0, 0, 0, 0, 0, 0, 0, False, ihl, total),
                )
            raise PacketError(_R_NATT_TRUNCATED)
        if size < 4 or n < off + 4:
            raise PacketError(_R_NATT_TRUNCATED)
        spi = _U32.unpack_from(data, off)[0]
        if spi:  # ESP-in-UDP: SPI 4 (non-zero, so never mistaken for the marker), sequence 4
            if size < 8 or n < off + 8:
                raise PacketError(_R_NATT_TRUNCATED)
            return _new(
                Classified,
                (_K_ESP_IN_UDP, src, dst, 17, sport, dport, 0, 0, spi, 0, 0, 0, 0, False, ihl, total),
            )
        off += 4  # the non-ESP marker; an IKE header follows
        size -= 4
        natt = True
    else:
        return _new(
            Classified, (_K_NOT_OURS, src, dst, 17, sport, dport, 0, 0, 0, 0, 0, 0, 0, False, ihl, total)
        )

    # IKE header, RFC 2408 section 3.1 / RFC 7296 section 3.1; nothing past its 28 bytes is read.
    if size < 28 or n < off + 28:
        raise PacketError(_R_IKE_TRUNCATED)
    spi_i, spi_r, version, exchange, flags, msg_id, length = _IKE.unpack_from(data, off)
    major = version >> 4
    if major != 1 and major != 2:
        raise PacketError(_R_IKE_BAD_VERSION)
    if not spi_i:
        raise PacketError(_R_IKE_ZERO_SPI_I)
    if length != size:  # size >= 28 here, so this also rejects length < 28
        raise PacketError(_R_IKE_BAD_LENGTH)
    return _new(
        Classified,
        (
            _K_IKE if spi_r else _K_IKE_INITIAL,
            src, dst, 17, sport, dport, spi_i, spi_r, 0, major, exchange, flags, msg_id, natt, ihl, total,
        ),
    )  # fmt: skip


# -- ICMP errors ----------------------------------------------------------------------------------

PROTO_ICMP = 1
# ICMP errors a router on the client's path sends about a packet it could not deliver (RFC 792):
# destination unreachable (3; code 4 is "fragmentation needed", path-MTU discovery's signal, RFC
# 1191), time exceeded (11), parameter problem (12). Source quench (4) is deprecated (RFC 6633) and
# redirect (5) is for a host's own first hop: neither is about a client's conversation.
ICMP_ERROR_TYPES = frozenset({3, 11, 12})

# ICMPv6 errors (RFC 4443 section 3): destination unreachable (1), packet too big (2, path-MTU
# discovery's signal, RFC 8201), time exceeded (3), parameter problem (4).
PROTO_ICMP6 = 58
ICMP6_ERROR_TYPES = frozenset({1, 2, 3, 4})

_ICMP_HEAD = struct.Struct("!BB")  # type, code
_QUOTE = struct.Struct("!BxHxxHxBxxII")  # the quoted IPv4 header: as _IP4
_QUOTE_L4 = struct.Struct("!HHI")  # first 8 bytes after it: UDP ports (+ length, checksum) or ESP/AH
_R_ICMP_TRUNCATED = DropReason.ICMP_TRUNCATED
_R_ICMP_QUOTE_TRUNCATED = DropReason.ICMP_QUOTE_TRUNCATED
_R_ICMP_QUOTE_MALFORMED = DropReason.ICMP_QUOTE_MALFORMED


class IcmpError(NamedTuple):
    """An ICMP error and the packet it quotes: what the director needs to find the conversation.

    ::

        outer IPv4 header (router -> VIP) | type | code | checksum | 4 bytes (next-hop MTU...) |
        quoted IPv4 header (VIP -> client) | first 8 bytes of its payload | ...

    ``qsport``/``qdport`` are the quoted UDP ports (0 unless UDP and the quote holds the first
    fragment's header); ``qspi`` is the quoted ESP or AH SPI (0 otherwise: the SPI of ESP-in-UDP
    lies past the 8 quoted bytes, which hold its UDP header).
    """

    type: int
    code: int
    src: int  # the outer source (the router that sent it)
    dst: int  # the outer destination (a VIP)
    quote_offset: int  # where the quoted IPv4 header starts in the buffer
    qproto: int
    qsrc: int
    qdst: int
    qsport: int
    qdport: int
    qspi: int
    qfirst: bool  # the quoted packet is unfragmented or a first fragment: its L4 header is quoted


def parse_icmp_error(data: bytes | bytearray | memoryview) -> IcmpError | None:
    """The ICMP error in the IPv4 packet ``data``, strictly checked; None when it is not one.

    None: the packet is not ICMP, is a fragment, or is an ICMP message of a type outside
    :data:`ICMP_ERROR_TYPES` (an echo request to a VIP is the kernel's to answer). Raises
    :class:`PacketError`: the IP_* reasons for a malformed outer header; ICMP_TRUNCATED when the
    ICMP header's 8 bytes are not within the total length and the buffer; ICMP_QUOTE_TRUNCATED
    when the quoted IPv4 header (20 bytes, then its IHL) or the 8 bytes after it (fewer only when
    the quoted packet's own total length says it had fewer) are not there; ICMP_QUOTE_MALFORMED
    when the quoted version is not 4, its IHL is below 5 or its total length below its IHL.
    """
    if type(data) is memoryview and (data.format != "B" or data.ndim != 1 or not data.c_contiguous):
        data = data.tobytes()
    if len(data) and data[0] >> 4 == 6:
        return _parse_icmp6_error(data)
    ihl, total, frag, proto, src, dst = ipv4_header(data)
    if proto != PROTO_ICMP or frag & _MF_OR_OFFSET:
        return None
    end = min(total, len(data))  # the bytes that are both in the packet and in the buffer
    head = _icmp_head(data, ihl, end, ICMP_ERROR_TYPES, 20)
    if head is None:
        return None
    itype, code, q = head
    qvihl, qtotal, qfrag, qproto, qsrc, qdst = _QUOTE.unpack_from(data, q)
    qihl = (qvihl & 0x0F) << 2
    if qvihl >> 4 != 4 or qihl < 20 or qtotal < qihl:
        raise PacketError(_R_ICMP_QUOTE_MALFORMED)
    qfirst = not qfrag & 0x1FFF
    need = min(8, qtotal - qihl) if qfirst else 0  # a non-first fragment quotes no L4 header
    if end - q < qihl + need:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    sport, dport, spi = _quoted_l4(data, q + qihl, qproto) if need == 8 else (0, 0, 0)
    return _new(IcmpError, (itype, code, src, dst, q, qproto, qsrc, qdst, sport, dport, spi, qfirst))


_R_IP6_QUOTE = {DropReason.IP6_EXT_TRUNCATED: _R_ICMP_QUOTE_TRUNCATED}


def _icmp_head(data, off: int, end: int, types: frozenset, quote_min: int) -> tuple[int, int, int] | None:
    """(type, code, where the quote starts) of the ICMP or ICMPv6 message at ``off``, or None when
    its type is not one of ``types``; its 8 bytes and ``quote_min`` bytes of quote must lie before
    ``end`` (ICMP_TRUNCATED, ICMP_QUOTE_TRUNCATED)."""
    if end - off < 8:
        raise PacketError(_R_ICMP_TRUNCATED)
    itype, code = _ICMP_HEAD.unpack_from(data, off)
    if itype not in types:
        return None
    if end - off - 8 < quote_min:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    return itype, code, off + 8


def _quoted_l4(buf, at: int, qproto: int) -> tuple[int, int, int]:
    """(UDP source port, destination port, ESP or AH SPI) of the 8 quoted bytes at ``at``."""
    a, b, word = _QUOTE_L4.unpack_from(buf, at)
    if qproto == PROTO_UDP:
        return a, b, 0
    if qproto == PROTO_ESP:
        return 0, 0, (a << 16) | b
    if qproto == PROTO_AH:
        return 0, 0, word
    return 0, 0, 0


def _parse_icmp6_error(data) -> IcmpError | None:
    """parse_icmp_error for IPv6: an ICMPv6 error (RFC 4443) after the outer extension headers,
    quoting an IPv6 packet whose own chain is walked to its UDP ports or ESP/AH SPI. A quoted
    chain that runs past the quote is ICMP_QUOTE_TRUNCATED, any other fault in it (version, chain
    too long, hop-by-hop out of place, an address in ::/96) ICMP_QUOTE_MALFORMED."""
    plen, nh, src, dst = ipv6_header(data)
    total = 40 + plen
    proto, off, frag = ipv6_upper(data, nh, total)
    if proto != PROTO_ICMP6 or frag:
        return None
    end = min(total, len(data))
    head = _icmp_head(data, off, end, ICMP6_ERROR_TYPES, 40)
    if head is None:
        return None
    itype, code, q = head
    quote = data[q:end]
    try:
        qplen, qnh, qsrc, qdst = ipv6_header(quote)
        qproto, qoff, qfrag = ipv6_upper(quote, qnh, 40 + qplen)
    except PacketError as e:
        raise PacketError(_R_IP6_QUOTE.get(e.reason, _R_ICMP_QUOTE_MALFORMED)) from None
    qfirst = not qfrag & 0xFFF8  # offset 0: unfragmented or a first fragment
    need = min(8, 40 + qplen - qoff) if qfirst else 0
    if len(quote) - qoff < need:
        raise PacketError(_R_ICMP_QUOTE_TRUNCATED)
    sport, dport, spi = _quoted_l4(quote, qoff, qproto) if need == 8 else (0, 0, 0)
    return _new(IcmpError, (itype, code, src, dst, q, qproto, qsrc, qdst, sport, dport, spi, qfirst))


# -- checksums ------------------------------------------------------------------------------------


def _sum16(data: bytes) -> int:
    """Ones' complement sum of 16-bit big-endian words, folded to 16 bits (RFC 1071)."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_checksum(header_bytes: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 Internet checksum of ``header_bytes``.

    Over a header whose checksum field is zero this is the value to store; over a header with a
    correct checksum stored it is 0.
    """
    return ~_sum16(bytes(header_bytes)) & 0xFFFF


def ipv6_pseudo_sum(src: int, dst: int, length: int, proto: int) -> int:
    """The ones' complement sum (not folded) of the IPv6 pseudo-header, RFC 8200 section 8.1."""
    total = length + proto
    for a in (src, dst):
        for shift in range(0, 128, 16):
            total += (a >> shift) & 0xFFFF
    return total


def upper_checksum6(src: int, dst: int, proto: int, body: bytes) -> int:
    """The UDP or ICMPv6 checksum of ``body`` (its checksum field zero) over the IPv6 pseudo-header.
    A computed 0 is sent as 0xFFFF (UDP over IPv6 may not carry 0, RFC 8200 section 8.1)."""
    total = ipv6_pseudo_sum(src, dst, len(body), proto) + _sum16(bytes(body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def _udp_checksum(src: int, dst: int, udp: bytes) -> int:
    """UDP checksum over the IPv4 pseudo-header and ``udp`` (checksum field zero), RFC 768."""
    pseudo = struct.pack("!IIBBH", src, dst, 0, PROTO_UDP, len(udp))
    csum = ~_sum16(pseudo + udp) & 0xFFFF
    return csum or 0xFFFF  # 0 means "no checksum" on the wire, so a computed 0 is sent as 0xFFFF


# -- header dataclasses (tests, lab, tooling; not the hot path) -----------------------------------

_IP4_FULL = struct.Struct("!BBHHHBBHII")
_UDP_FULL = struct.Struct("!HHHH")
_IKE_FULL = struct.Struct("!QQBBBBII")
_ESP_FULL = struct.Struct("!II")
_AH_FULL = struct.Struct("!BBHII")


def _need(
    buf: bytes | bytearray | memoryview, offset: int, size: int, reason: DropReason
) -> bytes | bytearray | memoryview:
    """``buf`` as a byte buffer holding ``size`` bytes at ``offset``, or PacketError(reason)."""
    if type(buf) is memoryview and (buf.format != "B" or buf.ndim != 1 or not buf.c_contiguous):
        buf = buf.tobytes()
    if offset < 0 or len(buf) - offset < size:
        raise PacketError(reason)
    return buf


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    """IPv4 header, RFC 791 section 3.1 (options kept as raw bytes).

    ::

         0                   1                   2                   3
         0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |Version|  IHL  |Type of Service|          Total Length         |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |         Identification        |Flags|      Fragment Offset    |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |  Time to Live |    Protocol   |         Header Checksum       |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                       Source Address                          |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                    Destination Address                        |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                    Options                    |    Padding    |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

    ``flags_frag`` is the whole second half of word 1 (0x4000 = Don't Fragment, 0x2000 = More
    Fragments, low 13 bits = offset in 8-byte units). ``to_bytes()`` always writes the correct
    checksum, whatever ``checksum`` holds; ``from_bytes`` does not verify it.
    """

    version_ihl: int
    tos: int
    total_length: int
    ident: int
    flags_frag: int
    ttl: int
    proto: int
    checksum: int
    src: int
    dst: int
    options: bytes = b""

    @property
    def version(self) -> int:
        return self.version_ihl >> 4

    @property
    def header_len(self) -> int:
        """IHL in bytes."""
        return (self.version_ihl & 0x0F) * 4

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & _MF_OR_OFFSET)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        buf = _need(buf, offset, 20, DropReason.IP_TRUNCATED)
        fields = _IP4_FULL.unpack_from(buf, offset)
        vihl, total = fields[0], fields[2]
        if vihl >> 4 != 4:
            raise PacketError(DropReason.IP_BAD_VERSION)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20:
            raise PacketError(DropReason.IP_BAD_IHL)
        _need(buf, offset, ihl, DropReason.IP_TRUNCATED)
        if total < ihl:
            raise PacketError(DropReason.IP_BAD_TOTAL_LENGTH)
        options = bytes(buf[offset + 20 : offset + ihl])
        return cls(*fields, options=options)

    def to_bytes(self) -> bytes:
        if len(self.options) != self.header_len - 20:
            raise ValueError(f"IHL says {self.header_len} bytes, options give {20 + len(self.options)}")
        zero = _IP4_FULL.pack(
            self.version_ihl, self.tos, self.total_length, self.ident, self.flags_frag,
            self.ttl, self.proto, 0, self.src, self.dst,
        ) + self.options  # fmt: skip
        csum = ipv4_checksum(zero)
        return zero[:10] + csum.to_bytes(2, "big") + zero[12:]


@dataclass(frozen=True, slots=True)
class UdpHeader:
    """UDP header, RFC 768.

    ::

         0      7 8     15 16    23 24    31
        +--------+--------+--------+--------+
        |     Source      |   Destination   |
        |      Port       |      Port       |
        +--------+--------+--------+--------+
        |     Length      |    Checksum     |
        +--------+--------+--------+--------+

    ``length`` covers header and data (>= 8). Checksum 0 means none was computed.
    """

    sport: int
    dport: int
    length: int
    checksum: int

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        buf = _need(buf, offset, 8, DropReason.UDP_TRUNCATED)
        header = cls(*_UDP_FULL.unpack_from(buf, offset))
        if header.length < 8:
            raise PacketError(DropReason.UDP_BAD_LENGTH)
        return header

    def to_bytes(self) -> bytes:
        return _UDP_FULL.pack(self.sport, self.dport, self.length, self.checksum)


@dataclass(frozen=True, slots=True)
class IkeHeader:
    """ISAKMP / IKE header, RFC 2408 section 3.1 (IKEv1) and RFC 7296 section 3.1 (IKEv2).

    ::

         0                   1                   2                   3
         0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                 Initiator Cookie / IKE SA Initiator's SPI     |
        |                                                               |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                 Responder Cookie / IKE SA Responder's SPI     |
        |                                                               |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |  Next Payload | MjVer | MnVer | Exchange Type |     Flags     |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                          Message ID                           |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                            Length                             |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

    ``version`` is the whole byte (0x10 = IKEv1, 0x20 = IKEv2); ``length`` is the whole message
    in bytes, header included. ``from_bytes`` rejects what no peer may send: a major version
    other than 1 or 2, a zero initiator SPI, a length below 28.
    """

    spi_i: int
    spi_r: int
    next_payload: int
    version: int
    exchange: int
    flags: int
    msg_id: int
    length: int

    @property
    def major(self) -> int:
        return self.version >> 4

    @property
    def minor(self) -> int:
        return self.version & 0x0F

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        buf = _need(buf, offset, IKE_HEADER_LEN, DropReason.IKE_TRUNCATED)
        header = cls(*_IKE_FULL.unpack_from(buf, offset))
        if header.major not in (1, 2):
            raise PacketError(DropReason.IKE_BAD_VERSION)
        if not header.spi_i:
            raise PacketError(DropReason.IKE_ZERO_SPI_I)
        if header.length < IKE_HEADER_LEN:
            raise PacketError(DropReason.IKE_BAD_LENGTH)
        return header

    def to_bytes(self) -> bytes:
        return _IKE_FULL.pack(
            self.spi_i, self.spi_r, self.next_payload, self.version,
            self.exchange, self.flags, self.msg_id, self.length,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EspHeader:
    """ESP header, RFC 4303 section 2 (the part before the encrypted payload).

    ::

         0                   1                   2                   3
         0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |               Security Parameters Index (SPI)                 |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                      Sequence Number                          |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                    Payload Data* (variable)                   |
        ~                                                               ~

    SPI 0 is reserved (RFC 4303 section 2.1) and rejected. Inside UDP 4500 (RFC 3948) the same
    header follows the UDP header directly.
    """

    spi: int
    seq: int

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        buf = _need(buf, offset, 8, DropReason.ESP_TRUNCATED)
        header = cls(*_ESP_FULL.unpack_from(buf, offset))
        if not header.spi:
            raise PacketError(DropReason.ESP_ZERO_SPI)
        return header

    def to_bytes(self) -> bytes:
        return _ESP_FULL.pack(self.spi, self.seq)


@dataclass(frozen=True, slots=True)
class AhHeader:
    """AH header, RFC 4302 section 2 (fixed part; the ICV that follows is not kept).

    ::

         0                   1                   2                   3
         0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        | Next Header   |  Payload Len  |          RESERVED             |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                 Security Parameters Index (SPI)               |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                    Sequence Number Field                      |
        +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        |                Integrity Check Value-ICV (variable)           |
        ~                                                               ~

    ``payload_len`` is the AH length in 32-bit words minus 2 (so 1 = 12 bytes, no ICV; 4 = 24
    bytes with a 96-bit ICV). RESERVED is written as zero. SPI 0 is reserved (section 2.4).
    """

    next_header: int
    payload_len: int
    spi: int
    seq: int

    @property
    def length(self) -> int:
        """The whole AH length in bytes, ICV included."""
        return (self.payload_len + 2) * 4

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        buf = _need(buf, offset, 12, DropReason.AH_TRUNCATED)
        next_header, payload_len, _reserved, spi, seq = _AH_FULL.unpack_from(buf, offset)
        header = cls(next_header, payload_len, spi, seq)
        if header.length < 12:
            raise PacketError(DropReason.AH_BAD_LENGTH)
        if not spi:
            raise PacketError(DropReason.AH_ZERO_SPI)
        return header

    def to_bytes(self) -> bytes:
        return _AH_FULL.pack(self.next_header, self.payload_len, 0, self.spi, self.seq)


# -- builders (tests and the lab) -----------------------------------------------------------------


def build_ipv4(
    src: int,
    dst: int,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0x4000,
    tos: int = 0,
    options: bytes = b"",
    total_length: int | None = None,
) -> bytes:
    """An IPv4 packet with a correct header checksum around ``payload``.

    ``options`` must be a multiple of 4 bytes. ``total_length`` overrides the computed total
    length (to build packets that lie about it, or stand-ins for truncated copies).
    """
    if len(options) % 4 or len(options) > 40:
        raise ValueError("IPv4 options must be a multiple of 4 bytes, at most 40")
    ihl = 5 + len(options) // 4
    if total_length is None:
        total_length = ihl * 4 + len(payload)
    header = Ipv4Header(
        0x40 | ihl, tos, total_length, ident, flags_frag, ttl, proto, 0, src, dst, bytes(options)
    )
    return header.to_bytes() + bytes(payload)


def build_ipv4_udp(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0x4000,
) -> bytes:
    """An IPv4/UDP packet with correct IP header and UDP checksums (RFC 791, RFC 768)."""
    payload = bytes(payload)
    length = 8 + len(payload)
    udp = UdpHeader(sport, dport, length, 0).to_bytes() + payload
    csum = _udp_checksum(src, dst, udp)
    udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    return build_ipv4(src, dst, PROTO_UDP, udp, ttl=ttl, ident=ident, flags_frag=flags_frag)


def build_ipv6(
    src: int,
    dst: int,
    proto: int,
    payload: bytes,
    *,
    ext: tuple[tuple[int, bytes], ...] = (),
    hop_limit: int = 64,
    tclass: int = 0,
    flow: int = 0,
    payload_length: int | None = None,
) -> bytes:
    """An IPv6 packet (RFC 8200) around ``payload``, after the extension headers ``ext``.

    ``ext`` is a sequence of (header type, body): each header is written as next header, then the
    body; for every type but the fragment header (44) the length byte is filled in and
    ``2 + len(body)`` must be a multiple of 8; a fragment header's body is its 6 bytes (offset
    word and identification). ``payload_length`` overrides the computed one.
    """
    chain = bytearray()
    types = [t for t, _ in ext] + [proto]
    for i, (t, body) in enumerate(ext):
        body = bytes(body)
        if t == 44:
            if len(body) != 6:
                raise ValueError("a fragment header body is 6 bytes")
            chain += bytes([types[i + 1], 0]) + body
            continue
        if (2 + len(body)) % 8:
            raise ValueError(f"extension header {t}: 2 + body must be a multiple of 8 bytes")
        chain += bytes([types[i + 1], (2 + len(body)) // 8 - 1]) + body
    body = bytes(chain) + bytes(payload)
    if payload_length is None:
        payload_length = len(body)
    first = types[0]
    head = struct.pack("!IHBB", 6 << 28 | tclass << 20 | flow, payload_length, first, hop_limit)
    return head + src.to_bytes(16, "big") + dst.to_bytes(16, "big") + body


def build_ipv6_udp(src: int, dst: int, sport: int, dport: int, payload: bytes, **kw) -> bytes:
    """An IPv6/UDP packet with a correct UDP checksum (RFC 768, RFC 8200 section 8.1); ``kw`` as
    :func:`build_ipv6` (extension headers before the UDP header)."""
    payload = bytes(payload)
    udp = UdpHeader(sport, dport, 8 + len(payload), 0).to_bytes() + payload
    csum = upper_checksum6(src, dst, PROTO_UDP, udp)
    return build_ipv6(src, dst, PROTO_UDP, udp[:6] + csum.to_bytes(2, "big") + udp[8:], **kw)


def build_ip_udp(src: int, dst: int, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 UDP packet, by the family of ``src`` (both addresses one family)."""
    if is_ipv6(src):
        return build_ipv6_udp(src, dst, sport, dport, payload)
    return build_ipv4_udp(src, dst, sport, dport, payload)


def build_ip(src: int, dst: int, proto: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet, by the family of ``src``."""
    if is_ipv6(src):
        return build_ipv6(src, dst, proto, payload)
    return build_ipv4(src, dst, proto, payload)


def ike_header(
    spi_i: int,
    spi_r: int,
    exchange: int,
    flags: int = 0,
    version: int = 0x20,
    msg_id: int = 0,
    next_payload: int = 33,
    body: bytes = b"",
) -> bytes:
    """An IKE header followed by ``body``, with the length field set to the whole message."""
    body = bytes(body)
    header = IkeHeader(
        spi_i, spi_r, next_payload, version, exchange, flags, msg_id, IKE_HEADER_LEN + len(body)
    )
    return header.to_bytes() + body


def ip_to_int(address: str) -> int:
    """An IPv4 or IPv6 address to its int (``"192.0.2.1"`` -> 3221225985, ``"2001:db8::1"`` ->
    a 128-bit int). ValueError for anything else, and for IPv6 addresses in ::/96, which
    :func:`ipv6_header` refuses on the wire (and which would read back as IPv4)."""
    a = ipaddress.ip_address(address)
    n = int(a)
    if a.version == 6 and n < IPV6_MIN:
        raise ValueError(f"{address!r} is in ::/96 (unspecified, loopback or IPv4-compatible)")
    return n


def int_to_ip(address: int) -> str:
    """An address int to its text: dotted quad below 2**32, else IPv6 in RFC 5952 form."""
    if address < IPV6_MIN:
        return str(ipaddress.IPv4Address(address))
    return str(ipaddress.IPv6Address(address))
