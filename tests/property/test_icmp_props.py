"""Property tests of the ICMP error relay: the parser and the NAT rewrite raise only PacketError,
and the rewrite keeps every checksum exactly as right (or as wrong) as it was."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from director.forwarding.rewrite import icmp_error_dnat
from director.lab import craft
from director.packet import PacketError, build_ipv4, ip_to_int, ipv4_checksum, parse_icmp_error

VIP = ip_to_int("192.0.2.10")
RIP = ip_to_int("198.51.100.7")
ROUTER = ip_to_int("203.0.113.254")


def _icmp_like(body: bytes) -> bytes:
    return build_ipv4(ROUTER, VIP, 1, body, flags_frag=0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_any_icmp_payload_parses_or_raises_packet_error(body):
    for pkt in (_icmp_like(body), _icmp_like(bytes([3, 4, 0, 0]) + body), _icmp_like(bytes([11, 0]) + body)[:60]):
        try:
            e = parse_icmp_error(pkt)
        except PacketError:
            continue
        assert e is None or e.type in (3, 11, 12)
        try:
            out = icmp_error_dnat(pkt, RIP)
        except PacketError:
            continue
        assert len(out) == len(pkt) and out[16:20] == struct.pack("!I", RIP)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([17, 50, 51]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(min_size=8, max_size=40),
       st.integers(20, 48), st.booleans())
def test_rewrite_keeps_checksums_as_right_as_they_were(proto, sport, dport, payload, quote, corrupt):
    client = ip_to_int("203.0.113.9")
    if proto == 17:
        quoted = build_ipv4(VIP, client, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), sport ^ dport) + payload)
    else:
        quoted = build_ipv4(VIP, client, proto, payload)
    pkt = bytearray(craft.icmp_error(ROUTER, VIP, quoted, quote=quote))
    if corrupt:
        pkt[23] ^= 0x5A  # the ICMP checksum: wrong before, exactly as wrong after
    try:
        out = icmp_error_dnat(bytes(pkt), RIP)
    except PacketError:
        assert quote < 28 or len(quoted) < quote, (quote, len(quoted))
        return
    assert ipv4_checksum(out[:20]) == 0 and ipv4_checksum(out[28:48]) == 0
    assert (ipv4_checksum(out[20:]) == 0) == (not corrupt)
    assert out[28 + 12 : 28 + 16] == struct.pack("!I", RIP)
