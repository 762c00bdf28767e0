"""The health prober: IKE probes to each monitored real server, from the daemon's event loop.

One non-blocking UDP socket bound to the director's real-server-side address; ``tick`` sends
probes that are due and fails those that timed out, ``on_readable`` matches answers by source
address and initiator SPI. With ``health.icmp`` a raw ICMP socket (filtered to echo replies in
the kernel) sends an echo request in the same round; the round ends when every check it started
has answered (success) or at ``timeout`` (failure). Results feed each server's HealthState
(director.health); the daemon applies the flips. Nothing here decides what a flip means.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

from director.core import Director
from director.health import (
    ICMP_ECHO_REPLY,
    PROBE_ENTROPY,
    HealthConfig,
    HealthState,
    answers_probe,
    echo_request,
    parse_echo_reply,
    probe_message,
)
from director.packet import int_to_ip

IKE_PORT = 500
SOL_RAW, ICMP_FILTER = 255, 1  # linux/icmp.h: a raw ICMP socket's type filter (set bit = dropped)


@dataclass
class _Target:
    rs_id: int
    addr: str
    cfg: HealthConfig
    state: HealthState
    next_at: float = 0.0
    spi: int = 0  # the IKE probe in flight (0: none)
    echo_seq: int = 0  # the ICMP echo in flight (0: none)
    sent_at: float = 0.0
    stuck_seen: int = 0  # the core's passive-signal count for this server, already accounted
    last_error: str = ""


class _IcmpSocket:
    """The raw ICMP socket, selectable on its own (the daemon's loop tells it from the IKE one)."""

    def __init__(self, bind_addr: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
        self.sock.bind((bind_addr, 0))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Prober:
    bind_addr: str
    targets: dict[int, _Target] = field(default_factory=dict)
    sock: socket.socket | None = None
    icmp: _IcmpSocket | None = None  # opened when a service asks for ICMP checks
    ident: int = field(default_factory=lambda: int.from_bytes(os.urandom(2), "big"))
    _seq: int = 0

    def open(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.bind_addr, 0))
        self.sock.setblocking(False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.icmp is not None:
            self.icmp.close()
            self.icmp = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list:
        """What the daemon's loop waits on: this (IKE answers) and, with ICMP checks, the echo socket."""
        if not self.targets:
            return []
        return [self, self.icmp] if self.icmp is not None else [self]

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFF + 1  # 1..65535: 0 means "none in flight"
        return self._seq

    def _finish(self, t: _Target, ok: bool, error: str = "") -> list[tuple[int, bool]]:
        t.spi = t.echo_seq = 0
        t.last_error = error
        return [(t.rs_id, t.state.up)] if t.state.observe(ok) else []

    def sync(self, d: Director, now: float) -> None:
        """Follow the running services: new servers probed (as up), gone ones forgotten."""
        want = {}
        for svc in d.services.values():
            if svc.health is None:
                continue
            for rs in svc.servers.values():
                t = self.targets.get(rs.id)
                if t is None or t.cfg != svc.health or t.addr != int_to_ip(rs.addr):
                    t = _Target(rs.id, int_to_ip(rs.addr), svc.health, HealthState(svc.health, rs.up), now,
                                stuck_seen=d.stuck_by_rs.get(rs.id, 0))
                want[rs.id] = t
        self.targets = want
        wants_icmp = any(t.cfg.icmp for t in want.values())
        if wants_icmp and self.icmp is None:
            self.icmp = _IcmpSocket(self.bind_addr)
        elif not wants_icmp and self.icmp is not None:
            self.icmp.close()
            self.icmp = None

    def tick(self, d: Director, now: float) -> list[tuple[int, bool]]:
        """Send due probes, fail timed-out ones, count passive signals; returns (rs id, up) flips."""
        flips = []
        for t in self.targets.values():
            stuck = d.stuck_by_rs.get(t.rs_id, 0)
            while t.stuck_seen < stuck:  # each conversation rescheduled away is one failure
                t.stuck_seen += 1
                if t.state.observe(False):
                    flips.append((t.rs_id, t.state.up))
            if (t.spi or t.echo_seq) and now - t.sent_at >= t.cfg.timeout:
                flips += self._finish(t, False, "timeout" if t.spi else "icmp timeout")
            if not (t.spi or t.echo_seq) and now >= t.next_at:
                t.next_at = now + t.cfg.interval
                spi, msg = probe_message(os.urandom(PROBE_ENTROPY))
                try:
                    self.sock.sendto(msg, (t.addr, IKE_PORT))
                    if t.cfg.icmp and self.icmp is not None:
                        seq = self._next_seq()
                        self.icmp.sock.sendto(echo_request(self.ident, seq), (t.addr, 0))
                        t.echo_seq = seq
                except OSError as e:  # no route or neighbour: that is a failed check too
                    flips += self._finish(t, False, e.strerror or str(e))
                else:
                    t.spi, t.sent_at = spi, now
        return flips

    def on_readable(self, now: float) -> list[tuple[int, bool]]:
        """Drain both sockets; a round whose every check answered is a success."""
        flips = []
        by_addr = {t.addr: t for t in self.targets.values()}
        while True:
            try:
                data, (src, _port) = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:  # e.g. an ICMP port unreachable reported on the socket
                continue
            t = by_addr.get(src)
            if t is None or not t.spi or not answers_probe(data, t.spi):
                continue
            t.spi = 0
            if not t.echo_seq:
                flips += self._finish(t, True)
        while self.icmp is not None:
            try:
                data, (src, _port) = self.icmp.sock.recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:
                continue
            t = by_addr.get(src)
            echo = parse_echo_reply(data)
            if t is None or not t.echo_seq or echo != (self.ident, t.echo_seq):
                continue
            t.echo_seq = 0
            if not t.spi:
                flips += self._finish(t, True)
        return flips

    def view(self, rs_id: int) -> dict | None:
        t = self.targets.get(rs_id)
        if t is None:
            return None
        s = t.state
        return {"up": s.up, "checks": s.checks, "failures": s.failures, "fail_run": s.fail_run,
                "last_error": t.last_error}
