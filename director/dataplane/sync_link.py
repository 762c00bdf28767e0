"""The sync link: the socket side of director/sync.py, run from the daemon's event loop.

Failover pair (role auto/master/backup, one peer): it sends this director's table changes while
it holds the VIP (VRRP master), applies the peer's while it does not (backup), and asks for a
snapshot when it becomes backup (a director that joins or rejoins) until one arrives complete.
Scale-out (role all, N peers): every director sends its own changes to every peer and applies
every peer's (never re-sending what it learned), and asks its peers for a snapshot at start until
one arrives. The replication protocol itself, pure, is director/sync.py.

Only the configured peers reach the socket: it is bound to one local address (``bind``, or the
source address toward the first peer) and carries a classic BPF socket filter that accepts
datagrams whose IPv4 source is a peer's, so the kernel drops a stranger's datagram before it is
queued (counted as the socket's drops, read from /proc/net/udp by ``status``) and the packet loop
never computes an HMAC for it.

Replay across restarts: the newest epoch accepted from each sender and this director's own last
epoch live in ``state_file`` (JSON, replaced atomically). A restarted receiver refuses every epoch
up to the persisted one; a restarted sender starts at max(wall clock in µs, persisted + 1), so a
clock that stepped back cannot make its new epochs look old.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time

from pyroute2 import IPRoute

from director.config import SyncConfig
from director.core import Director
from director.packet import int_to_ip, ip_to_int
from director.sync import Outcome, Receiver, Sender, parse_key

log = logging.getLogger(__name__)

# classic BPF (linux/filter.h): the few opcodes the source filter needs
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_SKF_NET_OFF = -0x100000  # offsets from the network header (a UDP socket's filter starts at UDP)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SO_LOCK_FILTER = 44


def source_filter(peers: list[int]) -> bytes:
    """A classic BPF program accepting IPv4 datagrams whose source address is one of ``peers``:
    load the source word, one compare per peer, accept or drop. Jump offsets are 8 bits, so at
    most 255 peers (the config allows SYNC_MAX_PEERS)."""
    if not 0 < len(peers) <= 255:
        raise ValueError("1..255 peers")
    n = len(peers)
    ins = [(_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 12) & 0xFFFFFFFF)]
    ins += [(_BPF_JEQ_K, n - i, 0, p) for i, p in enumerate(peers)]  # jt: to "accept" below
    ins += [(_BPF_RET_K, 0, 0, 0), (_BPF_RET_K, 0, 0, 0xFFFFFFFF)]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def attach_source_filter(sock: socket.socket, peers: list[int]) -> None:
    import ctypes

    prog = source_filter(peers)
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    sock.setsockopt(socket.SOL_SOCKET, _SO_LOCK_FILTER, 1)  # nobody swaps it later


def socket_drops(sock: socket.socket) -> int:
    """The kernel's drop count of this socket (the source filter's drops, and a full queue's), from
    /proc/net/udp of the socket's namespace, matched by inode; 0 if not found."""
    ino = os.fstat(sock.fileno()).st_ino
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) >= 13 and cols[9] == str(ino):
                    return int(cols[12])
    except (OSError, ValueError, StopIteration):
        pass
    return 0


class SyncState:
    """The persisted part of the sync: this sender's last epoch and, per sender id, the newest epoch
    accepted. Written with write-to-temporary, fsync, rename (a crash leaves the old file or the
    new one, never half of one). Writes happen only when an epoch changes: at start, at every
    snapshot this director sends and when a peer's new epoch is first accepted; snapshots are
    sent at most once per SyncLink.SNAPSHOT_EVERY, so the write rate stays bounded."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.own = 0
        self.floors: dict[int, int] = {}
        self.writes = 0
        try:
            with open(path) as f:
                data = json.load(f)
            self.own = int(data["own_epoch"])
            self.floors = {int(k): int(v) for k, v in data["senders"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"daemon.sync.state_file: {path} is unreadable ({e}); "
                             "remove it to start without replay floors") from None

    def next_epoch(self, at_least: int = 0) -> int:
        """A fresh epoch for this sender, persisted before it is used: wall clock in µs, but
        always above every epoch used before (a clock stepped back changes nothing)."""
        self.own = max(time.time_ns() // 1000, self.own + 1, at_least)
        self.save()
        return self.own

    def accepted(self, sender: int, epoch: int) -> None:
        if epoch > self.floors.get(sender, -1):
            self.floors[sender] = epoch
            self.save()

    def save(self) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"own_epoch": self.own, "senders": {str(k): v for k, v in self.floors.items()}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.writes += 1


SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by Python's socket module


class SyncLink:
    """The UDP link to the other directors.

    Role ``auto``: whether a service VIP is configured on the client interface (``ifindex``),
    checked every ROLE_CHECK seconds through ``ipr``. keepalived adds and removes the VIP itself,
    so the address is the ground truth of who receives the clients' packets; a notify script could
    be missed or be late, a restarted daemon learns its role at once, and no script or control
    command is needed.
    """

    ROLE_CHECK = 0.1
    REQUEST_EVERY = 1.0
    SYNC_WAIT = 10.0  # role all: how long a joining director keeps its VIPs withdrawn waiting for a snapshot
    RCVBUF = 16 << 20  # a snapshot arrives as one burst per peer (33 entries a datagram): room for ~100k entries
    SNAPSHOT_EVERY = 1.0  # at most one snapshot per second (each one is a new epoch: a state write)

    def __init__(self, director: Director, cfg: SyncConfig, *, ipr: IPRoute, ifindex: int) -> None:
        self.director, self.cfg = director, cfg
        self._ipr, self._ifindex = ipr, ifindex
        key = parse_key(cfg.key)
        self.peers = [(p, cfg.port) for p in cfg.peers]
        self.peer = self.peers[0]
        self._peer_addrs = frozenset(cfg.peers)
        bind = cfg.bind
        if not bind:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(self.peer)  # the source address toward the first peer
                bind = probe.getsockname()[0]
        self.bind = bind
        own = ip_to_int(bind)  # the sender id: this director's sync address
        self.state = SyncState(cfg.state_file)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            attach_source_filter(self.sock, [ip_to_int(p) for p in cfg.peers])  # before bind: no gap
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((bind, cfg.port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        try:  # beyond net.core.rmem_max: CAP_NET_ADMIN, which the daemon has
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        d = director
        merge = cfg.role == "all"
        self.sender = Sender(d, key, own, epoch=self.state.next_epoch(), send_expiry=not merge)
        self.sender.attach()
        self.sender.enabled = False
        self.receiver = Receiver(d, key, own_id=own, floors=self.state.floors, on_epoch=self.state.accepted,
                                 merge=merge)
        self.role = ""
        self.synced = False
        self.stats = {"send_errors": 0, "role_changes": 0, "snapshots_deferred": 0}
        self._next_role = self._next_request = 0.0
        self._next_snapshot = 0.0
        self._want_snapshot: set[tuple[str, int]] = set()
        self._stale_request: dict[tuple[str, int], float] = {}
        self._requests = 0  # role all: requests go to one peer at a time, in turn
        self._started: float | None = None
        log.info("sync.started bind=%s:%d peers=%s role=%s", bind, cfg.port, ",".join(cfg.peers), cfg.role)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _send(self, datagrams: list[bytes], to: list[tuple[str, int]] | None = None) -> None:
        for addr in self.peers if to is None else to:
            for dgram in datagrams:
                try:
                    self.sock.sendto(dgram, addr)
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
        self.sender.enabled = role in ("master", "all")
        if role in ("backup", "all"):  # our table may be stale (we were away, or master): resync
            self.synced = False
            self._next_request = now

    def tick(self, now: float) -> None:
        if now >= self._next_role:
            self._next_role = now + self.ROLE_CHECK
            role = self.cfg.role
            if role == "auto":
                role = "master" if self._holds_vip() else "backup"
            self._set_role(role, now)
        if self._want_snapshot and now >= self._next_snapshot:
            self._snapshot(now)
        if self.role in ("master", "all"):
            if self.sender.pending:
                self._send(self.sender.flush(now))
        if self.role in ("backup", "all") and not self.synced and now >= self._next_request:
            self._next_request = now + self.REQUEST_EVERY
            to = None
            if self.role == "all":  # every peer holds the shared table: one whole snapshot at a time,
                # not N bursts at once (they overflowed the receive buffer and never completed)
                to = [self.peers[self._requests % len(self.peers)]]
                self._requests += 1
            self._send([self.sender.request()], to)

    def table_ready(self, now: float) -> bool:
        """Whether the table may be announced (role all): a peer's snapshot is in, or SYNC_WAIT has
        passed since the start (peers that are all down must not keep the VIP withdrawn forever)."""
        if self._started is None:
            self._started = now
        return self.role != "all" or self.synced or now - self._started >= self.SYNC_WAIT

    def _snapshot(self, now: float) -> None:
        """Answer the pending requests: one snapshot (a new, persisted epoch) to every peer that asked."""
        to = sorted(self._want_snapshot)
        self._want_snapshot.clear()
        self._next_snapshot = now + self.SNAPSHOT_EVERY
        if self.role == "all":  # the others still need the pending changes: flushed first, to all
            if self.sender.pending:
                self._send(self.sender.flush(now))
        epoch = self.state.next_epoch(self.sender.epoch + 1)
        self._send(self.sender.snapshot(now, epoch, keep_pending=self.role == "all"), to)
        log.info("sync.snapshot_sent entries=%d to=%s", len(self.director.table), ",".join(a for a, _ in to))

    def on_readable(self, now: float) -> None:
        for _ in range(256):
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable of an earlier send
                continue
            if addr[0] not in self._peer_addrs:  # the kernel filter already keeps strangers out
                continue
            peer = (addr[0], self.cfg.port)  # a snapshot goes to the peer's sync port
            if self.role == "all":  # learned entries are not re-sent (no echo between peers)
                self.sender.enabled = False
                try:
                    outcome = self.receiver.handle(data, now, peer=addr[0])
                finally:
                    self.sender.enabled = True
            else:
                outcome = self.receiver.handle(data, now, peer=addr[0])
            if outcome == Outcome.REQUEST and self.role in ("master", "all"):
                self._want_snapshot.add(peer)
                if now >= self._next_snapshot:
                    self._snapshot(now)
                else:
                    self.stats["snapshots_deferred"] += 1
            elif outcome == Outcome.STALE and now >= self._stale_request.get(peer, 0.0):
                # that sender's epoch was closed by our restart: ask it for a snapshot (a new
                # epoch), whatever our synced state (role all: one peer's snapshot does not
                # reopen another's epoch); at most once a second per peer
                self._stale_request[peer] = now + self.REQUEST_EVERY
                self._send([self.sender.request()], [peer])
            elif outcome == Outcome.SNAPSHOT_DONE:
                self.synced = True
                log.info("sync.snapshot_applied entries=%d", len(self.director.table))

    def peer_status(self, now: float) -> list[dict]:
        """Per peer: the last datagram's age (None: nothing yet) and its counters."""
        out = []
        for p in self.cfg.peers:
            ps = self.receiver.peers.get(p)
            row = {"peer": p}
            if ps is None:
                row |= {"last_age": None, "received": 0, "accepted": 0, "rejected_mac": 0,
                        "rejected_replay": 0, "malformed": 0}
            else:
                row |= {"last_age": None if ps["last"] is None else round(max(0.0, now - ps["last"]), 3)}
                row |= {k: v for k, v in ps.items() if k != "last"}
            out.append(row)
        return out

    def status(self) -> dict:
        r, s = self.receiver.stats, self.sender.stats
        return {"role": self.role, "synced": self.synced, "peer": f"{self.cfg.peer}:{self.cfg.port}",
                "bind": f"{self.bind}:{self.cfg.port}", "epoch": self.sender.epoch,
                "sent": s["sent"], "records_sent": s["records_sent"], "snapshots_sent": s["snapshots_sent"],
                "received": r["received"], "applied": r["applied"], "rejected_mac": r["rejected_mac"],
                "rejected_replay": r["rejected_replay"], "ignored": r["ignored"], "malformed": r["malformed"],
                "snapshots_applied": r["snapshots"], "requests": r["requests"],
                "conflicts_kept": r["conflicts_kept"], "conflicts_taken": r["conflicts_taken"],
                "natt_port_kept": r["natt_port_kept"],
                "dropped_kernel": socket_drops(self.sock), "state_writes": self.state.writes,
                "peers": self.peer_status(time.monotonic()), **self.stats}
