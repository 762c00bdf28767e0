"""The failover link: the socket side of director/sync.py, run from the daemon's event loop.

It sends this director's table changes while it holds the VIP (VRRP master), applies the peer's
while it does not (backup), and asks for a snapshot when it becomes backup (a director that joins
or rejoins) until one arrives complete. The replication protocol itself, pure, is director/sync.py.
"""

from __future__ import annotations

import logging
import socket
import time

from pyroute2 import IPRoute

from director.config import SyncConfig
from director.core import Director
from director.packet import int_to_ip, ip_to_int
from director.sync import Outcome, Receiver, Sender, parse_key

log = logging.getLogger(__name__)


class SyncLink:
    """The UDP link to the other director.

    Role ``auto``: whether a service VIP is configured on the client interface (``ifindex``),
    checked every ROLE_CHECK seconds through ``ipr``. keepalived adds and removes the VIP itself,
    so the address is the ground truth of who receives the clients' packets; a notify script could
    be missed or be late, a restarted daemon learns its role at once, and no script or control
    command is needed.
    """

    ROLE_CHECK = 0.1
    REQUEST_EVERY = 1.0

    def __init__(self, director: Director, cfg: SyncConfig, *, ipr: IPRoute, ifindex: int) -> None:
        self.director, self.cfg = director, cfg
        self._ipr, self._ifindex = ipr, ifindex
        key = parse_key(cfg.key)
        self.peer = (cfg.peer, cfg.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(self.peer)  # the source address toward the peer: a stable sender id
            own = ip_to_int(probe.getsockname()[0])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", cfg.port))
        self.sock.setblocking(False)
        d = director
        self.sender = Sender(d, key, own, epoch=time.time_ns() // 1000)
        self.sender.attach()
        self.sender.enabled = False
        self.receiver = Receiver(d, key, own_id=own)
        self.role = ""
        self.synced = False
        self.stats = {"send_errors": 0, "role_changes": 0}
        self._next_role = self._next_request = 0.0
        log.info("sync.started peer=%s:%d id=%s role=%s", cfg.peer, cfg.port, int_to_ip(own), cfg.role)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _send(self, datagrams: list[bytes]) -> None:
        for dgram in datagrams:
            try:
                self.sock.sendto(dgram, self.peer)
            except OSError:  # the peer is down (that is what failover is for): counted
                self.stats["send_errors"] += 1

    def _holds_vip(self) -> bool:
        vips = {int_to_ip(s.vip) for s in self.director.services.values()}
        return any(a.get_attr("IFA_ADDRESS") in vips for a in self._ipr.get_addr(index=self._ifindex))

    def _set_role(self, role: str, now: float) -> None:
        if role == self.role:
            return
        if self.role:
            self.stats["role_changes"] += 1
        log.warning("sync.role %s -> %s", self.role or "start", role)
        if self.role == "backup" and role == "master":  # taking over: the mirrored deadlines are stale
            n = self.director.table.refresh_all(now)
            log.warning("sync.takeover entries=%d", n)
        self.role = role
        self.sender.clear()
        self.sender.enabled = role == "master"
        if role == "backup":  # our table may be stale (we were away, or master): resync
            self.synced = False
            self._next_request = now

    def tick(self, now: float) -> None:
        if now >= self._next_role:
            self._next_role = now + self.ROLE_CHECK
            role = self.cfg.role
            if role == "auto":
                role = "master" if self._holds_vip() else "backup"
            self._set_role(role, now)
        if self.role == "master":
            if self.sender.pending:
                self._send(self.sender.flush(now))
        elif not self.synced and now >= self._next_request:
            self._next_request = now + self.REQUEST_EVERY
            self._send([self.sender.request()])

    def on_readable(self, now: float) -> None:
        for _ in range(256):
            try:
                data, _addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable of an earlier send
                continue
            outcome = self.receiver.handle(data, now)
            if outcome == Outcome.REQUEST and self.role == "master":
                self._send(self.sender.snapshot(now, time.time_ns() // 1000))
                log.info("sync.snapshot_sent entries=%d", len(self.director.table))
            elif outcome == Outcome.SNAPSHOT_DONE:
                self.synced = True
                log.info("sync.snapshot_applied entries=%d", len(self.director.table))

    def status(self) -> dict:
        r, s = self.receiver.stats, self.sender.stats
        return {"role": self.role, "synced": self.synced, "peer": f"{self.cfg.peer}:{self.cfg.port}",
                "sent": s["sent"], "records_sent": s["records_sent"], "snapshots_sent": s["snapshots_sent"],
                "received": r["received"], "applied": r["applied"], "rejected_mac": r["rejected_mac"],
                "rejected_replay": r["rejected_replay"], "ignored": r["ignored"], "malformed": r["malformed"],
                "snapshots_applied": r["snapshots"], "requests": r["requests"], **self.stats}
