"""A real server's stand-in IKE responder and packet recorder, run inside a lab rs namespace.

``python -m director.lab.responder --addr A [--addr B] --log PATH [--decap] [--silent]``

Binds UDP 500 and 4500 on every ``--addr`` and opens raw ESP (50) and AH (51) sockets; writes one
JSON line per received packet to PATH (flushed per line)::

    {"t": 1700000000.1, "kind": "ike", "src": "198.18.0.11", "sport": 500, "dst": "198.18.0.100",
     "spi_i": "0123456789abcdef", "spi_r": "0000000000000000", "spi": null, "len": 28}

``kind`` is one of ike, ike_natt, esp_in_udp, keepalive, esp, ah; ``len`` is the UDP payload length
(UDP) or the IP payload length (raw). Fields that do not parse are null.

An IKE message with a zero responder SPI gets one reply from the same socket: the same initiator
SPI, a random non-zero responder SPI (stable per initiator SPI, so a retransmit sees the same one),
the same exchange type and message ID, the Response flag (IKEv2), header only (28 bytes), behind
the non-ESP marker again on 4500. ``--silent`` records without answering (a dead real server).

``--decap`` (lab TUN mode): IP-in-IP envelopes that were fragmented on the wire cannot be
decapsulated by the tc program on eth0 (it sees single fragments); the kernel reassembles them at
local delivery, a raw IPPROTO_IPIP socket receives the whole envelope, and the inner packet is
written into the TUN device ``decap0`` (made by the lab) so the stack delivers it locally.

ICMP errors (types 3, 11, 12) the host receives go to a second log, PATH + ``.icmp``, one line each
(kept apart so the packet records above stay what they were)::

    {"t": ..., "src": "198.18.0.254", "dst": "198.18.0.100", "type": 3, "code": 4, "mtu": 1400,
     "icmp_ok": true, "quote": {"src": ..., "dst": ..., "proto": 17, "ip_ok": true,
     "sport": 500, "dport": 4500, "head": "<hex of the quoted header and 8 bytes>"}}

``icmp_ok`` / ``ip_ok``: the ICMP checksum and the quoted IPv4 header checksum verify (a raw socket
sees the packet before the kernel's ICMP code checks anything).

The log file is created only after every socket is bound: its existence means "ready".
SIGTERM or SIGINT: exit 0.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from typing import IO

from director.packet import (
    FLAG_RESPONSE,
    IKE_HEADER_LEN,
    IKE_PORT,
    NATT_KEEPALIVE,
    NATT_PORT,
    NON_ESP_MARKER,
    PROTO_AH,
    PROTO_ESP,
    AhHeader,
    EspHeader,
    IkeHeader,
    Ipv4Header,
    PacketError,
    int_to_ip,
    ipv4_checksum,
)

log = logging.getLogger(__name__)

PROTO_IPIP = 4
IP_PKTINFO = 8  # <linux/in.h>; not exported by Python's socket module
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr (header dst)
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
TUN_NAME = "decap0"
PROTO_IPV6_IN_IPV6 = 41


def _dst_of(anc, default: str) -> str:
    """The packet's destination from IP_PKTINFO or IPV6_PKTINFO ancillary data, else ``default``."""
    for level, typ, cdata in anc:
        if level == socket.IPPROTO_IP and typ == IP_PKTINFO and len(cdata) >= _PKTINFO.size:
            return socket.inet_ntoa(_PKTINFO.unpack_from(cdata)[2])
        if level == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO and len(cdata) >= 16:
            return socket.inet_ntop(socket.AF_INET6, cdata[:16])
    return default


class Responder:
    """The sockets, the log and the per-initiator responder SPIs of one responder process."""

    def __init__(self, addrs: list[str], log_path: str, *, silent: bool = False, decap: bool = False) -> None:
        self.silent = silent
        self.spi_r: dict[int, int] = {}
        self.sel = selectors.DefaultSelector()
        self.stop = False
        self.tun_fd: int | None = None
        for addr in addrs:
            for port in (IKE_PORT, NATT_PORT):
                if ":" in addr:  # IPv6: the header's destination comes as IPV6_PKTINFO
                    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                sock.bind((addr, port))
                sock.setblocking(False)
                self.sel.register(sock, selectors.EVENT_READ, (self._on_udp, port))
        for proto in (PROTO_ESP, PROTO_AH):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, (self._on_raw, proto))
            if any(":" in a for a in addrs):  # an IPv6 raw socket gets the payload, the header's
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto)  # addresses as ancillary data
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                sock.setblocking(False)
                self.sel.register(sock, selectors.EVENT_READ, (self._on_raw6, proto))
        if decap:
            self.tun_fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(self.tun_fd, _TUNSETIFF, struct.pack("16sH22x", TUN_NAME.encode(), _IFF_TUN | _IFF_NO_PI))
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_IPIP)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, (self._on_ipip, PROTO_IPIP))
            if any(":" in a for a in addrs):  # ip6ip6: an IPv6 raw socket gets the inner packet itself
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, PROTO_IPV6_IN_IPV6)
                sock.setblocking(False)
                self.sel.register(sock, selectors.EVENT_READ, (self._on_ip6ip6, PROTO_IPV6_IN_IPV6))
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, (self._on_icmp, socket.IPPROTO_ICMP))
        if any(":" in a for a in addrs):  # ICMPv6 errors (types 1-4); the message comes without its IPv6 header
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, (self._on_icmp6, socket.IPPROTO_ICMPV6))
        self.icmp_out: IO[str] = open(log_path + ".icmp", "a", buffering=1)
        # Created last: its existence tells the lab every socket is bound.
        self.out: IO[str] = open(log_path, "a", buffering=1)

    # -- recording ------------------------------------------------------------------------------

    def record(self, kind: str, src: str, sport: int, dst: str, length: int, *,
               spi_i: int | None = None, spi_r: int | None = None, spi: int | None = None) -> None:  # fmt: skip
        rec = {
            "t": time.time(), "kind": kind, "src": src, "sport": sport, "dst": dst,
            "spi_i": None if spi_i is None else f"{spi_i:016x}",
            "spi_r": None if spi_r is None else f"{spi_r:016x}",
            "spi": spi, "len": length,
        }  # fmt: skip
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    # -- UDP 500 / 4500 -------------------------------------------------------------------------

    def _on_udp(self, sock: socket.socket, port: int) -> None:
        try:
            data, anc, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
        except BlockingIOError:
            return
        dst = _dst_of(anc, sock.getsockname()[0])
        src, sport = peer[0], peer[1]
        if port == NATT_PORT:
            if data == NATT_KEEPALIVE:
                self.record("keepalive", src, sport, dst, len(data))
                return
            if data[:4] != NON_ESP_MARKER:
                spi = None
                try:
                    spi = EspHeader.from_bytes(data).spi
                except PacketError:
                    pass
                self.record("esp_in_udp", src, sport, dst, len(data), spi=spi)
                return
            self._on_ike(sock, "ike_natt", data, 4, src, sport, dst)
        else:
            self._on_ike(sock, "ike", data, 0, src, sport, dst)

    def _on_ike(self, sock: socket.socket, kind: str, data: bytes, offset: int, src: str, sport: int,
                dst: str) -> None:  # fmt: skip
        try:
            hdr = IkeHeader.from_bytes(data, offset)
        except PacketError:
            self.record(kind, src, sport, dst, len(data))
            return
        self.record(kind, src, sport, dst, len(data), spi_i=hdr.spi_i, spi_r=hdr.spi_r)
        if hdr.spi_r or self.silent:
            return
        spi_r = self.spi_r.get(hdr.spi_i)
        if spi_r is None:
            spi_r = self.spi_r[hdr.spi_i] = secrets.randbits(64) or 1
        # IKEv1 has no Response flag (RFC 2408 section 3.1 defines E, C, A only).
        flags = FLAG_RESPONSE if hdr.major == 2 else 0
        reply = IkeHeader(hdr.spi_i, spi_r, 0, hdr.version, hdr.exchange, flags, hdr.msg_id, IKE_HEADER_LEN)
        payload = reply.to_bytes()
        if offset:
            payload = NON_ESP_MARKER + payload
        try:
            sock.sendto(payload, (src, sport))
        except OSError as e:  # an unroutable client must not end the responder
            log.warning("reply.failed dst=%s:%d err=%s", src, sport, e)

    # -- raw ESP / AH / IPIP ----------------------------------------------------------------------

    def _on_raw(self, sock: socket.socket, proto: int) -> None:
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        try:
            ip = Ipv4Header.from_bytes(data)
        except PacketError:
            return
        payload_len = len(data) - ip.header_len
        spi = None
        try:
            if proto == PROTO_ESP:
                spi = EspHeader.from_bytes(data, ip.header_len).spi
            else:
                spi = AhHeader.from_bytes(data, ip.header_len).spi
        except PacketError:
            pass
        kind = "esp" if proto == PROTO_ESP else "ah"
        self.record(kind, int_to_ip(ip.src), 0, int_to_ip(ip.dst), payload_len, spi=spi)

    def _on_raw6(self, sock: socket.socket, proto: int) -> None:
        try:
            data, anc, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        except BlockingIOError:
            return
        spi = None
        try:
            spi = (EspHeader.from_bytes(data) if proto == PROTO_ESP else AhHeader.from_bytes(data)).spi
        except PacketError:
            pass
        self.record("esp" if proto == PROTO_ESP else "ah", peer[0], 0, _dst_of(anc, ""), len(data), spi=spi)

    def _on_icmp(self, sock: socket.socket, _proto: int) -> None:
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        try:
            ip = Ipv4Header.from_bytes(data)
            icmp = data[ip.header_len : ip.total_length]
            if len(icmp) < 8 or icmp[0] not in (3, 11, 12):
                return
            q = Ipv4Header.from_bytes(icmp, 8)
        except PacketError:
            return
        head = icmp[8 : 8 + q.header_len + 8]
        l4 = head[q.header_len :]
        ports = struct.unpack(">HH", l4[:4]) if q.proto == 17 and len(l4) >= 4 else (None, None)
        rec = {
            "t": time.time(), "src": int_to_ip(ip.src), "dst": int_to_ip(ip.dst), "type": icmp[0],
            "code": icmp[1], "mtu": struct.unpack_from(">H", icmp, 6)[0],
            "icmp_ok": ipv4_checksum(icmp) == 0,
            "quote": {"src": int_to_ip(q.src), "dst": int_to_ip(q.dst), "proto": q.proto,
                      "ip_ok": ipv4_checksum(head[: q.header_len]) == 0,
                      "sport": ports[0], "dport": ports[1], "head": head.hex()},
        }  # fmt: skip
        self.icmp_out.write(json.dumps(rec) + "\n")
        self.icmp_out.flush()

    def _on_icmp6(self, sock: socket.socket, _proto: int) -> None:
        """An ICMPv6 error (RFC 4443: types 1-4), recorded as _on_icmp records ICMP ones; the quote
        is the IPv6 header the error quotes (its addresses and next header)."""
        try:
            msg, anc, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        except BlockingIOError:
            return
        if len(msg) < 8 + 40 or msg[0] not in (1, 2, 3, 4):
            return
        q = msg[8:]
        rec = {
            "t": time.time(), "src": peer[0].split("%")[0], "dst": _dst_of(anc, ""), "type": msg[0], "code": msg[1],
            "mtu": struct.unpack_from(">I", msg, 4)[0],
            "quote": {"src": socket.inet_ntop(socket.AF_INET6, q[8:24]), "dst": socket.inet_ntop(socket.AF_INET6, q[24:40]),
                      "proto": q[6], "head": q[:48].hex()},
        }  # fmt: skip
        self.icmp_out.write(json.dumps(rec) + "\n")
        self.icmp_out.flush()

    def _on_ipip(self, sock: socket.socket, _proto: int) -> None:
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        try:
            outer = Ipv4Header.from_bytes(data)
            Ipv4Header.from_bytes(data, outer.header_len)
        except PacketError:
            return
        assert self.tun_fd is not None
        try:
            os.write(self.tun_fd, data[outer.header_len :])
        except OSError as e:
            log.warning("decap.write_failed err=%s", e)

    def _on_ip6ip6(self, sock: socket.socket, _proto: int) -> None:
        """A reassembled ip6ip6 envelope (RFC 2473): the socket gives the payload, the inner packet."""
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        if len(data) < 40 or data[0] >> 4 != 6:
            return
        assert self.tun_fd is not None
        try:
            os.write(self.tun_fd, data)
        except OSError as e:
            log.warning("decap.write_failed err=%s", e)

    # -- loop -------------------------------------------------------------------------------------

    def serve(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self.sel.register(wake_r, selectors.EVENT_READ, (None, 0))
        while not self.stop:
            for key, _ in self.sel.select():
                handler, arg = key.data
                if handler is None:
                    try:
                        wake_r.recv(64)
                    except BlockingIOError:
                        pass
                    continue
                handler(key.fileobj, arg)
        self.out.close()
        self.icmp_out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m director.lab.responder", description=__doc__.split("\n")[0])
    parser.add_argument("--addr", action="append", required=True, help="local address to bind (repeatable)")
    parser.add_argument("--log", required=True, help="JSON-lines file, one record per received packet")
    parser.add_argument("--decap", action="store_true", help="decapsulate reassembled IPIP into decap0")
    parser.add_argument("--silent", action="store_true", help="record only, never answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="responder: %(message)s")

    responder: Responder | None = None

    def on_signal(_sig: int, _frame: object) -> None:
        if responder is not None:
            responder.stop = True
        else:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    responder = Responder(args.addr, args.log, silent=args.silent, decap=args.decap)
    responder.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
