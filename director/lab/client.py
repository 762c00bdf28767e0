"""A lab client: real sockets inside one client namespace speaking IKE, NAT-T, ESP and AH.

The kernel builds the IP and UDP headers (these are real packets on a real path); only the IKE
headers and the ESP/AH headers are crafted. IKE messages are header-only stand-ins (the lab's
responder answers initial ones with a random responder SPI), enough to drive the director's state.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from director.lab.netns import Lab
from director.packet import (
    IKE_AUTH,
    IKE_SA_INIT,
    MAIN,
    ike_header,
)

MARKER = b"\x00\x00\x00\x00"


class LabClient:
    """One client (``c1``, ``c2`` or ``c3`` behind the NAT) of a running Lab."""

    def __init__(self, lab: Lab, role: str, family: int = socket.AF_INET) -> None:
        """``family`` AF_INET6: the client speaks to the lab's IPv6 VIP from its IPv6 address."""
        self.lab = lab
        self.role = role
        self.family = family
        v6 = family == socket.AF_INET6
        self.vip = lab.vip6 if v6 else lab.vip
        self.addr = lab.client_addrs6[role] if v6 else lab.client_addrs[role]
        anywhere = "::" if v6 else "0.0.0.0"
        self.s500 = lab.socket(role, family, socket.SOCK_DGRAM)
        self.s4500 = lab.socket(role, family, socket.SOCK_DGRAM)
        for s, port in ((self.s500, 500), (self.s4500, 4500)):
            if v6:  # the IPv4 client of the same namespace keeps its own ports
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((anywhere, port))
        self.esp = lab.socket(role, family, socket.SOCK_RAW, 50)
        self.ah = lab.socket(role, family, socket.SOCK_RAW, 51)
        self.icmp = lab.socket(role, family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        for s in (self.s500, self.s4500, self.icmp):
            s.setblocking(False)

    def close(self) -> None:
        for s in (self.s500, self.s4500, self.esp, self.ah, self.icmp):
            s.close()

    @staticmethod
    def new_spi() -> int:
        return int.from_bytes(os.urandom(8), "big") | 1

    @staticmethod
    def ike_bytes(spi_i: int, spi_r: int = 0, *, v1: bool = False, exchange: int | None = None,
                  body: bytes = b"") -> bytes:
        """One IKE message (UDP payload): IKE_SA_INIT / IKE_AUTH, or Main Mode with ``v1``."""
        if exchange is None:
            exchange = MAIN if v1 else (IKE_SA_INIT if spi_r == 0 else IKE_AUTH)
        return ike_header(spi_i, spi_r, exchange, flags=0 if v1 else 0x08, version=0x10 if v1 else 0x20, body=body)

    # -- sending -------------------------------------------------------------------------------
    def send_ike(self, spi_i: int, spi_r: int = 0, *, v1: bool = False, natt: bool = False,
                 exchange: int | None = None, body: bytes = b"") -> None:
        msg = self.ike_bytes(spi_i, spi_r, v1=v1, exchange=exchange, body=body)
        if natt:
            self.s4500.sendto(MARKER + msg, (self.vip, 4500))
        else:
            self.s500.sendto(msg, (self.vip, 500))

    def send_esp(self, spi: int, seq: int = 1, size: int = 64) -> None:
        self.esp.sendto(struct.pack(">II", spi, seq) + os.urandom(size), (self.vip, 0))

    def send_ah(self, spi: int, seq: int = 1) -> None:
        # next header 59 (no next header), payload length 4 (= 24 bytes: 12 fixed + 12-byte ICV)
        self.ah.sendto(struct.pack(">BBHII", 59, 4, 0, spi, seq) + os.urandom(12), (self.vip, 0))

    def send_esp_in_udp(self, spi: int, seq: int = 1, size: int = 64) -> None:
        self.s4500.sendto(struct.pack(">II", spi, seq) + os.urandom(size), (self.vip, 4500))

    def send_keepalive(self) -> None:
        self.s4500.sendto(b"\xff", (self.vip, 4500))

    # -- receiving -----------------------------------------------------------------------------
    def recv_ike(self, spi_i: int, timeout: float = 2.0) -> tuple[int, str] | None:
        """The responder SPI and source address of the answer to ``spi_i`` (None on timeout)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.s500, self.s4500], [], [], left)
            for s in ready:
                try:
                    data, peer = s.recvfrom(65535)
                    src = peer[0]
                except BlockingIOError:
                    continue
                if s is self.s4500:
                    if data[:4] != MARKER:
                        continue
                    data = data[4:]
                if len(data) >= 28 and int.from_bytes(data[:8], "big") == spi_i:
                    return int.from_bytes(data[8:16], "big"), src
        return None

    def _recv_icmp(self, parse, timeout: float) -> list[tuple]:
        """The first message of the ICMP socket that ``parse(data, source)`` turns into a tuple,
        in a list (empty on timeout)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.icmp], [], [], left)
            if not ready:
                break
            data, peer = self.icmp.recvfrom(65535)
            got = parse(data, peer[0])
            if got is not None:
                return [got]
        return []

    def recv_icmp_unreachable(self, timeout: float = 2.0) -> list[tuple[int, int, str, int]]:
        """ICMP destination-unreachable messages seen: (type, code, source, quoted IP protocol)."""

        def parse(data: bytes, src: str):
            ihl = (data[0] & 0x0F) * 4
            if data[ihl] == 3 and len(data) >= ihl + 8 + 20:
                return data[ihl], data[ihl + 1], src, data[ihl + 8 + 9]
            return None

        return self._recv_icmp(parse, timeout)

    def recv_param_problem(self, timeout: float = 2.0) -> list[tuple[int, int, str, int, int]]:
        """ICMPv6 parameter problems seen (an IPv6 raw socket gets the message without the IPv6
        header): (type, code, source, pointer, the quoted packet's first next header)."""

        def parse(data: bytes, src: str):
            if data[0] == 4 and len(data) >= 8 + 40:
                return data[0], data[1], src, int.from_bytes(data[4:8], "big"), data[8 + 6]
            return None

        return self._recv_icmp(parse, timeout)

    # -- whole exchanges ------------------------------------------------------------------------
    def ikev2_connect(self, timeout: float = 2.0) -> tuple[int, int, str]:
        """IKE_SA_INIT on 500, answer, then IKE_AUTH on 4500 (as IKEv2 moves there). (spi_i, spi_r, from)."""
        spi_i = self.new_spi()
        self.send_ike(spi_i)
        got = self.recv_ike(spi_i, timeout)
        if got is None:
            raise TimeoutError(f"{self.role}: no IKE_SA_INIT answer through the VIP")
        spi_r, src = got
        self.send_ike(spi_i, spi_r, natt=True)
        return spi_i, spi_r, src

    def ikev1_connect(self, timeout: float = 2.0) -> tuple[int, int, str]:
        """Main mode: MM1 on 500 (answered), MM3 on 500, MM5 floated to 4500 behind the marker."""
        spi_i = self.new_spi()
        self.send_ike(spi_i, v1=True)
        got = self.recv_ike(spi_i, timeout)
        if got is None:
            raise TimeoutError(f"{self.role}: no Main Mode answer through the VIP")
        spi_r, src = got
        self.send_ike(spi_i, spi_r, v1=True)
        self.send_ike(spi_i, spi_r, v1=True, natt=True)
        return spi_i, spi_r, src

