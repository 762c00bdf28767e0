"""Unit tests for the IPv6 rewrites: NAT66 both ways, an ICMPv6 error toward its real server, and
the parameter problem that answers ESP/AH with no state. Checksums are checked by recomputing
them whole (upper_checksum6) and against scapy's parse."""

import pytest
import scapy.all as S

from director.drop_reasons import DropReason
from director.forwarding.rewrite import icmp_error_dnat, icmp_no_state, nat_dnat, nat_snat
from director.packet import (
    EspHeader,
    PacketError,
    build_ipv6,
    build_ipv6_udp,
    ike_header,
    int_to_ip,
    ip_to_int,
    upper_checksum6,
)

C = ip_to_int("2001:db8:c::10")
V = ip_to_int("2001:db8:f::1")
R = ip_to_int("2001:db8:5::2")
DST = (60, b"\x01\x04\x00\x00\x00\x00")
ESP = EspHeader(0x11223344, 9).to_bytes() + b"\x55" * 40


def udp_ok(pkt: bytes) -> bool:
    p = S.IPv6(pkt)
    want = p[S.UDP].chksum
    del p[S.UDP].chksum
    return S.IPv6(bytes(p))[S.UDP].chksum == want


@pytest.mark.parametrize("ext", [(), (DST,)])
def test_nat66_both_ways_keeps_the_udp_checksum_right(ext):
    pkt = build_ipv6_udp(C, V, 4500, 4500, b"\0\0\0\0" + ike_header(7, 8, 35), ext=ext)
    to_rs = nat_dnat(pkt, R)
    assert to_rs == build_ipv6_udp(C, R, 4500, 4500, b"\0\0\0\0" + ike_header(7, 8, 35), ext=ext)
    back = nat_snat(build_ipv6_udp(R, C, 4500, 31000, ESP, ext=ext), V)
    assert back == build_ipv6_udp(V, C, 4500, 31000, ESP, ext=ext) and udp_ok(back)


def test_nat66_of_esp_and_of_a_non_first_fragment_moves_only_the_address():
    esp = build_ipv6(C, V, 50, ESP)
    assert nat_dnat(esp, R) == build_ipv6(C, R, 50, ESP)
    frag = build_ipv6(C, V, 17, b"\xee" * 32, ext=((44, b"\x00\x11\0\0\0\7"),))
    assert nat_dnat(frag, R) == build_ipv6(C, R, 17, b"\xee" * 32, ext=((44, b"\x00\x11\0\0\0\7"),))


def test_nat66_drops_padding_and_refuses_a_truncated_copy():
    pkt = build_ipv6(C, V, 50, ESP)
    assert nat_dnat(pkt + b"\0" * 6, R) == build_ipv6(C, R, 50, ESP)
    with pytest.raises(PacketError) as info:
        nat_dnat(pkt[:-1], R)
    assert info.value.reason is DropReason.IP_TRUNCATED


def test_icmp6_error_toward_the_real_server():
    quoted = build_ipv6_udp(V, C, 4500, 31000, ESP)
    body = bytes([2, 0, 0, 0]) + (1400).to_bytes(4, "big") + quoted
    router = ip_to_int("2001:db8:99::1")
    csum = upper_checksum6(router, V, 58, body)
    err = build_ipv6(router, V, 58, body[:2] + csum.to_bytes(2, "big") + body[4:])
    out = icmp_error_dnat(err, R)
    p = S.IPv6(out)
    assert p.dst == int_to_ip(R) and p[S.ICMPv6PacketTooBig].mtu == 1400
    inner = bytes(p[S.ICMPv6PacketTooBig].payload)
    assert inner == build_ipv6_udp(R, C, 4500, 31000, ESP)  # the quote as the real server sent it
    want = upper_checksum6(router, R, 58, bytes(out[40:42]) + b"\0\0" + bytes(out[44:]))
    assert int.from_bytes(out[42:44], "big") == want


def test_parameter_problem_points_at_the_next_header_field():
    for ext, pointer in (((), 6), ((DST,), 40), ((DST, DST), 48)):
        orig = build_ipv6(C, V, 50, ESP, ext=ext)
        ans = icmp_no_state(orig, V)
        p = S.IPv6(ans)
        pp = p[S.ICMPv6ParamProblem]
        assert (p.src, p.dst, pp.type, pp.code, pp.ptr) == (int_to_ip(V), int_to_ip(C), 4, 1, pointer)
        assert bytes(pp.payload) == orig[:40 + 8 * len(ext) + 8]  # headers and the SPI, sequence
        want = pp.cksum
        del pp.cksum
        assert S.IPv6(bytes(p))[S.ICMPv6ParamProblem].cksum == want


@pytest.mark.parametrize("src,dst,proto", [
    ("ff02::1", "2001:db8:f::1", 50),  # multicast source
    ("2001:db8:c::10", "ff05::2", 50),  # multicast destination
    ("2001:db8:c::10", "2001:db8:f::1", 17),  # not ESP or AH
])  # fmt: skip
def test_parameter_problem_suppressed(src, dst, proto):
    with pytest.raises(PacketError) as info:
        icmp_no_state(build_ipv6(ip_to_int(src), ip_to_int(dst), proto, ESP), V)
    assert info.value.reason is DropReason.ICMP_SUPPRESSED


def test_ip6ip6_envelope_and_its_fragments():
    from director.forwarding.fragment import fragment6
    from director.forwarding.rewrite6 import ip6ip6_encap

    director = ip_to_int("2001:db8:1::1")
    inner = build_ipv6_udp(C, V, 500, 500, ike_header(7, 0, 34, body=bytes(3000)), tclass=0xB8)
    env = ip6ip6_encap(inner + b"\0" * 4, director, R)  # link padding is not carried
    p = S.IPv6(env)
    assert (p.src, p.dst, p.nh, p.tc, p.plen) == (int_to_ip(director), int_to_ip(R), 41, 0xB8, len(inner))
    assert env[40:] == inner  # the inner packet untouched (hop limit included)
    pieces = fragment6(env, 1500, 0xABCD1234)
    assert [len(x) for x in pieces[:-1]] == [1496] * (len(pieces) - 1) and all(len(x) <= 1500 for x in pieces)
    whole = b""
    for i, x in enumerate(pieces):
        f = S.IPv6(x)
        fh = f[S.IPv6ExtHdrFragment]
        assert (f.nh, fh.nh, fh.id, fh.m, fh.offset * 8) == (44, 41, 0xABCD1234, int(i < len(pieces) - 1), len(whole))
        whole += bytes(fh.payload)
    assert whole == inner
    assert fragment6(env[:1400], 1500, 1) == [env[:1400]]  # what fits is sent whole
