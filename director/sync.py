"""Director failover: the table sync protocol between an active and a backup director. Pure.

The active director streams its connection table's changes to the backup, which keeps a warm copy
(and, through the table's events to the fast path's ``ClientProjection``, a warm eBPF map): when the active dies and VRRP moves the VIP,
every established client keeps its real server. No sockets here: the daemon moves the datagrams.

Datagram (network byte order; at most ``MAX_DATAGRAM`` bytes)::

     0      2   3   4           8                  16                 24  25  26    28
    +------+---+---+-----------+------------------+------------------+---+---+------+
    | "VS" |ver|typ| sender id |      epoch       |     sequence     |flg|cnt| pad  |  header
    +------+---+---+-----------+------------------+------------------+---+---+------+
    | cnt records of 40 bytes (below)                                               |
    +-------------------------------------------------------------------------------+
    | HMAC-SHA256(key, header + records): 32 bytes                                  |
    +-------------------------------------------------------------------------------+

    record: kind 1, state 1, flags 1 (0x01 NAT-T), pad 1, VIP 4, client 4, client port 2,
            pad 2, real server ADDRESS 4 (ids differ between directors), initiator SPI 8,
            responder SPI 8, remaining timeout in ms 4

    With header flag 0x02 (IPV6) every record of the datagram is an IPv6 one: the same fields
    with 16-byte VIP, client and real server address (76 bytes; at most 17 per datagram). A
    datagram is one family; the sender frames each family apart. (A director older than this
    rejects an IPv6 datagram as malformed: its length does not match 40-byte records.)

Types: CHANGES (a batch of entry changes), SNAPSHOT (one part of a full table: the parts of one
snapshot are sequence numbers 1..n of a fresh epoch, the last flagged END), REQUEST (a backup asks
for a snapshot). A record is the whole entry, so applying one is an idempotent upsert (or a
removal): a lost datagram is repaired by the entry's next change or the next snapshot.

Replay protection: per sender id, an epoch (the sender's start time in microseconds, bumped by every
snapshot it sends) and a 64-packet sliding window over sequence numbers within the epoch, as the
ESP anti-replay window (RFC 4303 section 3.4.3): older epochs, repeated or too old sequence
numbers are rejected and counted; reordering inside the window is accepted. The MAC is checked
first, so a forged datagram never moves a window.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable

from director.conntrack import NO_SLOT, TableFull, TableListener
from director.isakmp_state import Event, State

VERSION = 1
MAGIC = b"VS"
MAX_DATAGRAM = 1400
HEADER = struct.Struct(">2sBBIQQBBH")  # 28 bytes
RECORD = struct.Struct(">BBBxIIHxxIQQI")  # 40 bytes
RECORD6 = struct.Struct(">BBBx16s16sHxx16sQQI")  # 76 bytes: an IPv6 entry (FLAG_IPV6)
MAC_LEN = 32
MAX_RECORDS = (MAX_DATAGRAM - HEADER.size - MAC_LEN) // RECORD.size  # 33
MAX_RECORDS6 = (MAX_DATAGRAM - HEADER.size - MAC_LEN) // RECORD6.size  # 17
WINDOW = 64
MIN_KEY = 16

FLAG_END = 0x01  # SNAPSHOT: the last part
FLAG_IPV6 = 0x02  # every record of the datagram is an IPv6 one (RECORD6)
REC_NATT = 0x01


class MsgType(IntEnum):
    CHANGES = 1
    SNAPSHOT = 2
    REQUEST = 3


class RecKind(IntEnum):
    CREATE = 1
    ESTABLISH = 2
    PORT = 3
    REMOVE = 4
    EXPIRE = 5
    SNAP = 6  # an entry of a snapshot


class SyncError(ValueError):
    """A datagram that is not a well-formed sync message."""


@dataclass(frozen=True, slots=True)
class Record:
    """One entry as the backup needs it to rebuild it (addresses, not ids)."""

    kind: RecKind
    state: State
    vip: int
    client: int
    cport: int
    rs_addr: int
    spi_i: int
    spi_r: int = 0
    remaining: float = 0.0  # seconds until the entry's idle timeout
    natt: bool = False

    @property
    def v6(self) -> bool:
        return self.vip >> 32 != 0

    def pack(self) -> bytes:
        ms = max(0, min(0xFFFFFFFF, int(self.remaining * 1000)))
        flags = REC_NATT if self.natt else 0
        if self.v6:
            return RECORD6.pack(self.kind, self.state, flags, self.vip.to_bytes(16, "big"),
                                self.client.to_bytes(16, "big"), self.cport, self.rs_addr.to_bytes(16, "big"),
                                self.spi_i, self.spi_r, ms)  # fmt: skip
        return RECORD.pack(self.kind, self.state, flags, self.vip, self.client,
                           self.cport, self.rs_addr, self.spi_i, self.spi_r, ms)

    @classmethod
    def unpack_from(cls, buf: bytes, off: int, v6: bool = False) -> "Record":
        if v6:
            kind, state, flags, vip, client, cport, rs, spi_i, spi_r, ms = RECORD6.unpack_from(buf, off)
            vip, client, rs = (int.from_bytes(x, "big") for x in (vip, client, rs))
            if vip >> 32 == 0 or client >> 32 == 0 or (rs and rs >> 32 == 0):
                raise SyncError("record: an IPv6 record with an address in ::/96")
        else:
            kind, state, flags, vip, client, cport, rs, spi_i, spi_r, ms = RECORD.unpack_from(buf, off)
        try:
            return cls(RecKind(kind), State(state), vip, client, cport, rs, spi_i, spi_r, ms / 1000.0,
                       bool(flags & REC_NATT))
        except ValueError:
            raise SyncError(f"record: bad kind {kind} or state {state}") from None


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    sender: int
    epoch: int
    seq: int
    flags: int = 0
    records: tuple[Record, ...] = ()


def parse_key(text: str) -> bytes:
    """A shared key given as hex or base64; ValueError (naming nothing: the caller names the field)."""
    import base64
    import binascii

    text = text.strip()
    key = None
    if len(text) % 2 == 0:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = None
    if key is None:
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be hex or base64") from None
    if len(key) < MIN_KEY:
        raise ValueError(f"must be at least {MIN_KEY} bytes (got {len(key)})")
    return key


def encode(key: bytes, msg: Message) -> bytes:
    v6 = bool(msg.flags & FLAG_IPV6)
    if any(r.v6 != v6 for r in msg.records):
        raise ValueError("a datagram's records are all of one family, IPv6 ones flagged FLAG_IPV6")
    most = MAX_RECORDS6 if v6 else MAX_RECORDS
    if len(msg.records) > most:
        raise ValueError(f"at most {most} records per datagram")
    body = HEADER.pack(MAGIC, VERSION, msg.type, msg.sender, msg.epoch, msg.seq, msg.flags,
                       len(msg.records), 0) + b"".join(r.pack() for r in msg.records)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def authenticate(key: bytes, data: bytes) -> bool:
    if len(data) < HEADER.size + MAC_LEN:
        return False
    return hmac.compare_digest(hmac.new(key, data[:-MAC_LEN], hashlib.sha256).digest(), data[-MAC_LEN:])


def decode(data: bytes) -> Message:
    """Parse an (already authenticated) datagram; SyncError when malformed."""
    if len(data) < HEADER.size + MAC_LEN:
        raise SyncError("datagram: too short")
    magic, ver, typ, sender, epoch, seq, flags, count, _ = HEADER.unpack_from(data)
    if magic != MAGIC or ver != VERSION:
        raise SyncError(f"header: not a version {VERSION} sync message")
    v6 = bool(flags & FLAG_IPV6)
    size = RECORD6.size if v6 else RECORD.size
    if len(data) != HEADER.size + count * size + MAC_LEN:
        raise SyncError("datagram: length does not match the record count")
    try:
        mtype = MsgType(typ)
    except ValueError:
        raise SyncError(f"header: unknown type {typ}") from None
    recs = tuple(Record.unpack_from(data, HEADER.size + i * size, v6) for i in range(count))
    return Message(mtype, sender, epoch, seq, flags, recs)


class ReplayWindow:
    """Per sender: the newest epoch and a sliding window of sequence numbers in it.

    ``floor``: the newest epoch accepted from this sender before a restart (persisted by the
    link). Its window was lost with the process, so nothing of that epoch or older is accepted
    any more: only a newer epoch (the sender's next snapshot, or its restart) opens the window.
    """

    __slots__ = ("epoch", "top", "bits")

    def __init__(self, floor: int = -1) -> None:
        self.epoch = floor
        self.top = 0 if floor < 0 else (1 << 64) + WINDOW  # a closed epoch: every 64-bit sequence number is too old
        self.bits = 0  # bit i: top - i was seen

    def check(self, epoch: int, seq: int) -> bool:
        """True (and recorded) for a fresh (epoch, seq); False for a replay or a too-old one."""
        if seq < 1 or epoch < self.epoch:
            return False
        if epoch > self.epoch:
            self.epoch, self.top, self.bits = epoch, seq, 1
            return True
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
            return True
        off = self.top - seq
        if off >= WINDOW or self.bits >> off & 1:
            return False
        self.bits |= 1 << off
        return True


class Sender(TableListener):
    """The active side: collects the table's changes (its events), frames them, makes snapshots.

    ``attach`` registers it for the director's table events; an event only notes the slot (and,
    for a removal, the entry's record) in the pending batch. ``flush`` turns the batch into
    datagrams. ``enabled`` False (a backup) makes the events do nothing.
    Also frames this director's REQUEST messages (a backup's epoch and sequence live here too).
    """

    def __init__(self, director, key: bytes, sender_id: int, epoch: int, *, send_expiry: bool = True) -> None:
        self.d = director
        self.key = key
        self.id = sender_id & 0xFFFFFFFF
        self.epoch = epoch
        self.seq = 0
        self.enabled = True
        # False (role all): an entry idle here may be busy on another director (the router sends
        # its packets there), so each director expires entries on its own clock and tells no one
        self.send_expiry = send_expiry
        self._upserts: dict[int, tuple[int, int, int, RecKind]] = {}  # slot -> (svc, client, spi_i, kind)
        self._removals: list[Record] = []
        self.stats = {"sent": 0, "records_sent": 0, "snapshots_sent": 0}

    def attach(self) -> None:
        self.d.listen(self)

    def detach(self) -> None:
        self.d.unlisten(self)

    def _upsert(self, s: int, kind: RecKind) -> None:
        if self.enabled:
            self._upserts[s] = (*self.d.table.conversation(s), kind)

    def created(self, s: int) -> None:
        self._upsert(s, RecKind.CREATE)

    def established(self, s: int) -> None:
        self._upsert(s, RecKind.ESTABLISH)

    def changed(self, s: int, old_port: int) -> None:
        self._upsert(s, RecKind.PORT)

    def removed(self, s: int, event: Event, state: int) -> None:
        if not self.enabled:
            return
        self._upserts.pop(s, None)
        if event == Event.EXPIRE and not self.send_expiry:
            return
        v = self.d.table.view(s)
        svc = self.d.services.get(v.svc)
        if svc is None:
            return
        rs = self.d.server(v.rs)
        kind = RecKind.EXPIRE if event == Event.EXPIRE else RecKind.REMOVE
        self._removals.append(Record(kind, v.state, svc.vip, v.client, v.cport, rs.addr if rs else 0, v.spi_i))

    @property
    def pending(self) -> int:
        return len(self._upserts) + len(self._removals)

    def clear(self) -> None:
        self._upserts.clear()
        self._removals.clear()

    def _frame(self, mtype: MsgType, records: list[Record], flags: int = 0) -> bytes:
        self.seq += 1
        self.stats["sent"] += 1
        self.stats["records_sent"] += len(records)
        return encode(self.key, Message(mtype, self.id, self.epoch, self.seq, flags, tuple(records)))

    def _records(self, now: float, slots: Iterable[tuple[int, RecKind]]) -> list[Record]:
        out = []
        for s, kind in slots:
            e = self.d.entry_record(s)
            if e is None:
                continue
            v, vip, rs_addr = e
            out.append(Record(kind, v.state, vip, v.client, v.cport, rs_addr, v.spi_i, v.spi_r,
                              max(0.0, v.expires - now), v.natt))
        return out

    def flush(self, now: float) -> list[bytes]:
        """The pending changes as datagrams (removals first: a key freed and re-created in one
        batch must end up present). Empty when nothing is pending."""
        if not self._upserts and not self._removals:
            return []
        t = self.d.table
        live = [(s, kind) for s, (svc, client, spi_i, kind) in self._upserts.items()
                if t.state_of(s) != State.FREE and t.conversation(s) == (svc, client, spi_i)]
        records = self._removals + self._records(now, live)
        self.clear()
        return [self._frame(MsgType.CHANGES, c, f) for c, f in _chunks(records)]

    def snapshot(self, now: float, epoch: int | None = None, *, keep_pending: bool = False) -> list[bytes]:
        """The whole table (a scan) in a fresh epoch, parts numbered 1..n, the last flagged END.
        Pending changes are included by construction and dropped, unless ``keep_pending`` (role
        all: the snapshot goes to the one peer that asked, the others still need the changes)."""
        self.epoch = max(self.epoch + 1, epoch or 0)
        self.seq = 0
        if not keep_pending:
            self.clear()
        records = self._records(now, ((s, RecKind.SNAP) for s in self.d.table.slots()))
        chunks = _chunks(records) or [([], 0)]
        self.stats["snapshots_sent"] += 1
        return [self._frame(MsgType.SNAPSHOT, c, f | (FLAG_END if i == len(chunks) - 1 else 0))
                for i, (c, f) in enumerate(chunks)]

    def request(self) -> bytes:
        """A REQUEST for a snapshot (sent by a backup that joins or rejoins)."""
        return self._frame(MsgType.REQUEST, [])


def _chunks(records: list[Record]) -> list[tuple[list[Record], int]]:
    """(records, header flags) per datagram: IPv4 records 33 at a time, then IPv6 ones 17 at a
    time flagged FLAG_IPV6 (a datagram is one family)."""
    four = [r for r in records if not r.v6]
    six = [r for r in records if r.v6]
    return ([(four[i:i + MAX_RECORDS], 0) for i in range(0, len(four), MAX_RECORDS)]
            + [(six[i:i + MAX_RECORDS6], FLAG_IPV6) for i in range(0, len(six), MAX_RECORDS6)])  # fmt: skip


class Outcome(IntEnum):
    REJECTED = 0
    APPLIED = 1
    REQUEST = 2  # the peer asks for a snapshot
    SNAPSHOT_DONE = 3  # a complete snapshot was applied (and stale local entries removed)
    STALE = 4  # rejected: an epoch closed by a restart (its sender should send a snapshot, a new epoch)


@dataclass
class _Snap:
    epoch: int
    parts: set = field(default_factory=set)
    total: int = 0
    keys: set = field(default_factory=set)


PEER_COUNTERS = ("received", "accepted", "rejected_mac", "rejected_replay", "malformed")


class Receiver:
    """The receiving side: authenticates, checks replay, applies records to a Director's table.

    ``floors``: per sender id, the newest epoch accepted before a restart (see ReplayWindow).
    ``on_epoch(sender, epoch)`` is called when a sender's new epoch is first accepted, before its
    records are applied: the link persists it there. ``merge`` (role all): records from several
    peers meet, a snapshot only adds (it never removes local entries) and a conflict between a
    record and the local entry resolves by ``wins`` (the same answer on every director).
    ``handle``'s ``peer`` (the source address) keys per-peer counters and the last arrival time.
    """

    def __init__(self, director, key: bytes, own_id: int | None = None, *, floors: dict[int, int] | None = None,
                 on_epoch=None, merge: bool = False) -> None:
        self.d = director
        self.key = key
        self.own_id = own_id
        self.floors = dict(floors or {})
        self.on_epoch = on_epoch
        self.merge = merge
        self.windows: dict[int, ReplayWindow] = {}
        self._snap: dict[int, _Snap] = {}
        self.stats = {"received": 0, "applied": 0, "rejected_mac": 0, "rejected_replay": 0,
                      "malformed": 0, "ignored": 0, "refused_full": 0, "snapshots": 0, "requests": 0,
                      "conflicts_kept": 0, "conflicts_taken": 0, "natt_port_kept": 0}
        self.peers: dict[object, dict] = {}  # peer -> PEER_COUNTERS and "last" (arrival time)

    def _count(self, peer, key: str) -> None:
        self.stats[key] += 1
        if peer is not None:
            self.peers[peer][key] += 1

    def handle(self, data: bytes, now: float, peer=None) -> Outcome:
        if peer is not None:
            ps = self.peers.get(peer)
            if ps is None:
                ps = self.peers[peer] = dict.fromkeys(PEER_COUNTERS, 0) | {"last": None}
            ps["last"] = now
        self._count(peer, "received")
        if not authenticate(self.key, data):
            self._count(peer, "rejected_mac")
            return Outcome.REJECTED
        try:
            msg = decode(data)
        except SyncError:
            self._count(peer, "malformed")
            return Outcome.REJECTED
        if msg.sender == self.own_id:  # our own message reflected back
            self._count(peer, "rejected_replay")
            return Outcome.REJECTED
        w = self.windows.get(msg.sender)
        if w is None:
            w = self.windows[msg.sender] = ReplayWindow(self.floors.get(msg.sender, -1))
        old_epoch = w.epoch
        if not w.check(msg.epoch, msg.seq):
            self._count(peer, "rejected_replay")
            return Outcome.STALE if msg.epoch == w.epoch and w.top > 1 << 64 else Outcome.REJECTED
        if w.epoch != old_epoch and self.on_epoch is not None:
            self.on_epoch(msg.sender, w.epoch)
        if peer is not None:
            self.peers[peer]["accepted"] += 1
        if msg.type == MsgType.REQUEST:
            self.stats["requests"] += 1
            return Outcome.REQUEST
        snap = None
        if msg.type == MsgType.SNAPSHOT:
            snap = self._snap.get(msg.sender)
            if snap is None or snap.epoch != msg.epoch:
                snap = self._snap[msg.sender] = _Snap(msg.epoch)
            snap.parts.add(msg.seq)
            if msg.flags & FLAG_END:
                snap.total = msg.seq
        for r in msg.records:
            self.apply(r, now, snap)
        if snap is not None and snap.total and len(snap.parts) == snap.total:
            self._finish(snap)
            del self._snap[msg.sender]
            return Outcome.SNAPSHOT_DONE
        return Outcome.APPLIED

    def _finish(self, snap: _Snap) -> None:
        """Every part arrived: local entries the snapshot did not name are stale (removed); not
        when merging (role all), where the local table also holds this director's own entries and
        other peers' that the snapshot's sender may not have yet."""
        self.stats["snapshots"] += 1
        if self.merge:
            return
        t = self.d.table
        stale = [s for s in t.slots() if t.conversation(s) not in snap.keys]
        for s in stale:
            t.remove(s)

    def apply(self, r: Record, now: float, snap: _Snap | None = None) -> bool:
        """One record to the table; False when ignored (unknown service or server, table full)."""
        d, t = self.d, self.d.table
        svc = d.service_by_vip(r.vip)
        if svc is None:
            self.stats["ignored"] += 1
            return False
        s = t.lookup(svc.id, r.client, r.spi_i)
        if r.kind in (RecKind.REMOVE, RecKind.EXPIRE):
            if s != NO_SLOT:
                t.remove(s)
            self.stats["applied"] += 1
            return True
        rs = next((x for x in svc.servers.values() if x.addr == r.rs_addr), None)
        if rs is None:
            self.stats["ignored"] += 1
            return False
        if s == NO_SLOT:
            try:
                s = t.create(svc.id, r.client, r.cport, r.spi_i, rs.id, now, natt=r.natt)
            except TableFull:
                self.stats["refused_full"] += 1
                return False
        elif self.merge and not self._takes(r, s):
            if snap is not None:
                snap.keys.add((svc.id, r.client, r.spi_i))
            return True
        else:
            t.move(s, rs.id)  # nothing happens if it is there already
            if r.natt or not t.is_natt(s):
                t.set_port(s, r.cport)  # nothing happens if it is there already
            elif r.cport != t.port_of(s):
                # A record from before the float to 4500 never undoes it: with ECMP the client's
                # 500 and 4500 flows may reach different directors, and the 500 one's record
                # (its port 500 mapping) can arrive after this director saw the client on 4500,
                # where its ESP-in-UDP is looked up by that port.
                self.stats["natt_port_kept"] += 1
            if r.natt:
                t.mark_natt(s)
        if r.state == State.ESTABLISHED and t.state_of(s) != State.ESTABLISHED:
            t.establish(s, r.spi_r, now)
        elif r.spi_r and t.state_of(s) == State.INIT:
            t.record_reply(s, r.spi_r)  # NAT mode: the responder SPI the real server sent (anti-spoofing)
        # the idle deadline the active had: touch() sets now' + the state's timeout
        remaining = max(1.0, r.remaining)
        t.touch(s, now + remaining - t.timeouts(svc.id).for_state(t.state_of(s)))
        if snap is not None:
            snap.keys.add((svc.id, r.client, r.spi_i))
        self.stats["applied"] += 1
        return True

    def _takes(self, r: Record, s: int) -> bool:
        """Role all: whether a record replaces the local entry ``s`` of the same conversation.
        A record never downgrades: ESTABLISHED beats INIT; in the same state the lower real-server
        address wins, so directors that scheduled one conversation differently (a race of the
        client's first packets over two directors) all converge on the same server, whatever the
        order the records arrive in."""
        t = self.d.table
        local_state = t.state_of(s)
        local = self.d.entry_record(s)
        local_rs = local[2] if local is not None else 0
        if local_rs == r.rs_addr:
            return r.state >= local_state  # the same server: an update (established, port, deadline)
        if r.state != local_state:
            take = r.state == State.ESTABLISHED
        else:
            take = r.rs_addr < local_rs
        self.stats["conflicts_taken" if take else "conflicts_kept"] += 1
        return take
