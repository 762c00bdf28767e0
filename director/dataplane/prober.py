"""The health prober: IKE probes to each monitored real server, from the daemon's event loop.

One non-blocking UDP socket bound to the director's real-server-side address; ``tick`` sends
probes that are due and fails those that timed out, ``on_readable`` matches answers by source
address and initiator SPI. Results feed each server's HealthState (director.health); the daemon
applies the flips. Nothing here decides what a flip means.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from director.core import Director
from director.health import HealthConfig, HealthState, answers_probe, probe_message
from director.packet import int_to_ip

IKE_PORT = 500


@dataclass
class _Target:
    rs_id: int
    addr: str
    cfg: HealthConfig
    state: HealthState
    next_at: float = 0.0
    spi: int = 0  # the probe in flight (0: none)
    sent_at: float = 0.0
    stuck_seen: int = 0  # the core's passive-signal count for this server, already accounted
    last_error: str = ""


@dataclass
class Prober:
    bind_addr: str
    targets: dict[int, _Target] = field(default_factory=dict)
    sock: socket.socket | None = None

    def open(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.bind_addr, 0))
        self.sock.setblocking(False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        return self.sock.fileno()

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

    def tick(self, d: Director, now: float) -> list[tuple[int, bool]]:
        """Send due probes, fail timed-out ones, count passive signals; returns (rs id, up) flips."""
        flips = []
        for t in self.targets.values():
            stuck = d.stuck_by_rs.get(t.rs_id, 0)
            while t.stuck_seen < stuck:  # each conversation rescheduled away is one failure
                t.stuck_seen += 1
                if t.state.observe(False):
                    flips.append((t.rs_id, t.state.up))
            if t.spi and now - t.sent_at >= t.cfg.timeout:
                t.spi = 0
                t.last_error = "timeout"
                if t.state.observe(False):
                    flips.append((t.rs_id, t.state.up))
            if not t.spi and now >= t.next_at:
                spi, msg = probe_message()
                try:
                    self.sock.sendto(msg, (t.addr, IKE_PORT))
                except OSError as e:  # no route or neighbour: that is a failed check too
                    t.last_error = e.strerror or str(e)
                    if t.state.observe(False):
                        flips.append((t.rs_id, t.state.up))
                else:
                    t.spi, t.sent_at = spi, now
                t.next_at = now + t.cfg.interval
        return flips

    def on_readable(self, now: float) -> list[tuple[int, bool]]:
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
            t.last_error = ""
            if t.state.observe(True):
                flips.append((t.rs_id, t.state.up))
        return flips

    def view(self, rs_id: int) -> dict | None:
        t = self.targets.get(rs_id)
        if t is None:
            return None
        s = t.state
        return {"up": s.up, "checks": s.checks, "failures": s.failures, "fail_run": s.fail_run,
                "last_error": t.last_error}
