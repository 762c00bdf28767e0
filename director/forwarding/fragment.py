"""IPv4 (RFC 791) and IPv6 (RFC 8200 section 4.5) fragmentation of an envelope, pure: for tunnel
packets larger than the path MTU.

The director sends IP-in-IP envelopes from its output path with a raw IP_HDRINCL socket, and the
kernel refuses (EMSGSIZE) a raw packet larger than the device MTU instead of fragmenting it. The
envelope's outer header has DF clear on purpose (the Moat lesson, docs/architecture.md), so it may be
fragmented here; the inner packet rides inside the fragments untouched, its own DF bit intact.
In IPv6 only the source fragments, and the director is the source of its ip6ip6 envelopes:
:func:`fragment6` splits one with fragment headers.
"""

from __future__ import annotations

import struct

from director.drop_reasons import DropReason
from director.packet import PacketError, ipv4_checksum

_DF = 0x4000
_MF = 0x2000


def fragment(pkt: bytes, mtu: int) -> list[bytes]:
    """``pkt`` itself when it fits ``mtu``, else its fragments (options copied only where RFC 791 says)."""
    total = len(pkt)
    if total <= mtu:
        return [pkt]
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        raise PacketError(DropReason.IP_TRUNCATED)
    ihl = (pkt[0] & 0x0F) * 4
    flags_frag = struct.unpack_from(">H", pkt, 6)[0]
    if flags_frag & _DF:
        raise ValueError("fragment: the packet has DF set; it must not be fragmented")
    if mtu < ihl + 8:
        raise ValueError(f"fragment: mtu {mtu} too small for a {ihl}-byte header")
    header = bytearray(pkt[:ihl])
    # only options with the copied flag (bit 0x80 of the type) go into later fragments
    later = bytearray(pkt[:20]) + _copied_options(pkt[20:ihl])
    later[0] = 0x40 | (len(later) // 4)
    base_offset = (flags_frag & 0x1FFF) * 8
    more = flags_frag & _MF
    payload = memoryview(pkt)[ihl:]
    out = []
    pos = 0
    hdr = header
    while pos < len(payload):
        room = (mtu - len(hdr)) & ~7
        chunk = payload[pos : pos + room]
        last = pos + len(chunk) >= len(payload)
        h = bytearray(hdr)
        struct.pack_into(">H", h, 2, len(h) + len(chunk))
        struct.pack_into(">H", h, 6, ((base_offset + pos) // 8) | (more if last else _MF))
        struct.pack_into(">H", h, 10, 0)
        struct.pack_into(">H", h, 10, ipv4_checksum(h))
        out.append(bytes(h) + chunk)
        pos += len(chunk)
        hdr = later
    return out


def _copied_options(opts: bytes) -> bytearray:
    out = bytearray()
    i = 0
    while i < len(opts):
        t = opts[i]
        if t == 0:  # end of option list
            break
        if t == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        n = opts[i + 1]
        if t & 0x80:
            out += opts[i : i + n]
        i += n
    while len(out) % 4:
        out.append(0)
    return out


def fragment6(pkt: bytes, mtu: int, ident: int) -> list[bytes]:
    """``pkt`` itself when it fits ``mtu``, else its fragments (RFC 8200 section 4.5).

    For the director's own envelopes: an IPv6 header with no extension headers, so the
    unfragmentable part is the 40-byte header. Each fragment is that header (next header 44,
    payload length its own) and a fragment header (the envelope's next header, the offset in
    8-byte units, M on all but the last, ``ident``), then at most ``mtu - 48`` bytes of the
    payload, a multiple of 8 in every fragment but the last. IPv6 links carry at least 1280.
    """
    if len(pkt) <= mtu:
        return [pkt]
    if len(pkt) < 40 or pkt[0] >> 4 != 6:
        raise PacketError(DropReason.IP_TRUNCATED)
    if mtu < 1280:
        raise ValueError(f"fragment6: mtu {mtu} below IPv6's minimum 1280")
    nh = pkt[6]
    payload = memoryview(pkt)[40:]
    room = (mtu - 48) & ~7
    out = []
    for pos in range(0, len(payload), room):
        chunk = payload[pos : pos + room]
        last = pos + room >= len(payload)
        head = bytearray(pkt[:40])
        struct.pack_into(">H", head, 4, 8 + len(chunk))
        head[6] = 44
        frag = struct.pack(">BBHI", nh, 0, (pos // 8) << 3 | (0 if last else 1), ident & 0xFFFFFFFF)
        out.append(bytes(head) + frag + bytes(chunk))
    return out
