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
    ICMP6_ECHO_REPLY,
    ICMP_ECHO_REPLY,
    PROBE_ENTROPY,
    HealthConfig,
    HealthState,
    answers_probe,
    echo_request,
    echo_request6,
    parse_echo_reply,
    parse_echo_reply6,
    probe_message,
)
from director.packet import int_to_ip

IKE_PORT = 500
SOL_RAW, ICMP_FILTER = 255, 1  # linux/icmp.h: a raw ICMP socket's type filter (set bit = dropped)
ICMP6_FILTER = 1  # linux/icmpv6.h, at level IPPROTO_ICMPV6


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
    """The raw ICMP socket, selectable on its own (the daemon's loop tells it from the IKE one);
    ``v6``: the ICMPv6 one, filtered to echo replies with ICMP6_FILTER (RFC 3542 section 3.2)."""

    def __init__(self, bind_addr: str, v6: bool = False) -> None:
        if v6:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            blocked = [0xFFFFFFFF] * 8  # struct icmp6_filter: a set bit blocks the type
            blocked[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31)) & 0xFFFFFFFF
            self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *blocked))
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
            self.sock.bind((bind_addr, 0))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class _Udp6:
    """The IKE probe socket for IPv6 real servers (IPv6 only, an ephemeral port), selectable."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind(("::", 0))
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
    sock6: _Udp6 | None = None  # IKE probes to IPv6 real servers (opened when there are some)
    icmp6: _IcmpSocket | None = None  # ICMPv6 echo for IPv6 real servers with ICMP checks
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
        for name in ("icmp", "sock6", "icmp6"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list:
        """What the daemon's loop waits on: this (IKE answers) and, with ICMP checks, the echo socket."""
        if not self.targets:
            return []
        return [self, *(x for x in (self.icmp, self.sock6, self.icmp6) if x is not None)]

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
        v6 = [t for t in want.values() if ":" in t.addr]
        v4 = [t for t in want.values() if ":" not in t.addr]
        for name, needed, make in (
            ("icmp", any(t.cfg.icmp for t in v4), lambda: _IcmpSocket(self.bind_addr)),
            ("sock6", bool(v6), _Udp6),
            ("icmp6", any(t.cfg.icmp for t in v6), lambda: _IcmpSocket("", v6=True)),
        ):
            if needed and getattr(self, name) is None:
                setattr(self, name, make())
            elif not needed and getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

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
                v6 = ":" in t.addr
                try:
                    (self.sock6.sock if v6 else self.sock).sendto(msg, (t.addr, IKE_PORT))
                    icmp = self.icmp6 if v6 else self.icmp
                    if t.cfg.icmp and icmp is not None:
                        seq = self._next_seq()
                        icmp.sock.sendto((echo_request6 if v6 else echo_request)(self.ident, seq), (t.addr, 0))
                        t.echo_seq = seq
                except OSError as e:  # no route or neighbour: that is a failed check too
                    flips += self._finish(t, False, e.strerror or str(e))
                else:
                    t.spi, t.sent_at = spi, now
        return flips

    def on_readable(self, now: float) -> list[tuple[int, bool]]:
        """Drain every socket; a round whose every check answered is a success."""
        flips = []
        by_addr = {t.addr: t for t in self.targets.values()}
        for sock in (self.sock, self.sock6.sock if self.sock6 is not None else None):
            while sock is not None:
                try:
                    data, peer = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:  # e.g. an ICMP port unreachable reported on the socket
                    continue
                t = by_addr.get(peer[0])
                if t is None or not t.spi or not answers_probe(data, t.spi):
                    continue
                t.spi = 0
                if not t.echo_seq:
                    flips += self._finish(t, True)
        for icmp, parse in ((self.icmp, parse_echo_reply), (self.icmp6, parse_echo_reply6)):
            while icmp is not None:
                try:
                    data, peer = icmp.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                t = by_addr.get(peer[0])
                echo = parse(data)
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
