"""IPv4 fragmentation of an envelope (RFC 791), pure: for tunnel packets larger than the path MTU.

The director sends IP-in-IP envelopes from its output path with a raw IP_HDRINCL socket, and the
kernel refuses (EMSGSIZE) a raw packet larger than the device MTU instead of fragmenting it. The
envelope's outer header has DF clear on purpose (the Moat lesson, docs/architecture.md), so it may be
fragmented here; the inner packet rides inside the fragments untouched, its own DF bit intact.
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
