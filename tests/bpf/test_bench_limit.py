"""The benchmark's limit programs (bench/limit.bpf.c) do what group f says they do, at both hooks:
DR rewrites the MACs only, NAT the destination with a correct IPv4 checksum and the MACs, TUN puts
a correct outer header in front; then they redirect. Anything but IPv4 ESP passes untouched.
Checked on crafted frames through BPF_PROG_TEST_RUN; checksums recomputed here from scratch."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_REDIRECT, require
from director.dataplane import libbpf as L
from director.lab import craft
from director.packet import ip_to_int

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import limit_case  # noqa: E402

CLIENT, VIP, RIP, LAN = (ip_to_int(a) for a in ("203.0.113.7", "192.0.2.10", "10.1.0.11", "10.1.0.1"))
DMAC, SMAC = bytes.fromhex("02000000010b"), bytes.fromhex("020000000001")
IN_L2 = bytes.fromhex("020000000002") + bytes.fromhex("0200000002fe") + b"\x08\x00"
REDIRECT = {"tc": TC_ACT_REDIRECT, "xdp": XDP_REDIRECT}
PASS = {"tc": TC_ACT_OK, "xdp": XDP_PASS}


def rfc1071(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.fixture(scope="module", params=["dr", "tun", "nat"])
def limit(request, tmp_path_factory):
    require()
    obj = limit_case.build(request.param, 7, DMAC, SMAC, RIP, LAN, tmp_path_factory.mktemp("limit") / "limit.o")
    with L.BpfObject(obj) as o:
        o.load()
        yield request.param, o


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_limit_program_rewrites_only_what_its_mode_needs(limit, hook):
    mode, obj = limit
    ip = craft.esp(CLIENT, VIP, 0x1234, 9, size=64)
    r = L.prog_test_run(obj.prog_fd(f"limit_{hook}"), IN_L2 + ip)
    assert r.retval == REDIRECT[hook]
    out = r.data_out
    assert out[:12] == DMAC + SMAC and out[12:14] == b"\x08\x00"
    if mode == "dr":
        assert out[14:] == ip  # the IP packet untouched: not even the TTL
    elif mode == "nat":
        want = bytearray(ip)
        want[16:20] = RIP.to_bytes(4, "big")
        want[10:12] = b"\0\0"
        want[10:12] = rfc1071(bytes(want[:20])).to_bytes(2, "big")
        assert out[14:] == bytes(want)
        assert rfc1071(out[14:34]) == 0
    else:
        outer, inner = out[14:34], out[34:]
        assert inner == ip
        ver_ihl, tos, tot, ident, frag, ttl, proto, _c, src, dst = struct.unpack("!BBHHHBBH4s4s", outer)
        assert (ver_ihl, tos, tot, frag, ttl, proto) == (0x45, ip[1], len(ip) + 20, 0, 64, 4)
        assert (src, dst) == (LAN.to_bytes(4, "big"), RIP.to_bytes(4, "big"))
        assert rfc1071(outer) == 0


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_limit_program_passes_anything_but_esp(limit, hook):
    _mode, obj = limit
    for frame in (IN_L2[:12] + b"\x08\x06" + bytes(28),  # ARP
                  IN_L2 + craft.ike(CLIENT, VIP, 1, 0, body=bytes(36))):  # UDP to the VIP
        r = L.prog_test_run(obj.prog_fd(f"limit_{hook}"), frame)
        assert (r.retval, r.data_out) == (PASS[hook], frame)


def test_headroom_pass_program_passes(tmp_path):
    require()
    with L.BpfObject(limit_case.build_pass(tmp_path / "pass.o")) as o:
        o.load()
        frame = IN_L2 + craft.esp(CLIENT, VIP, 0x1234, 9)
        assert (o.prog_names, L.prog_test_run(o.prog_fd("limit_pass"), frame).retval) == (["limit_pass"], XDP_PASS)
