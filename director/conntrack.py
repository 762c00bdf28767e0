"""The ISAKMP connection table: entries, three indexes, expiry, limits and drop-entry. Pure.

Layout. Entries live in preallocated columns (``array.array``), one slot per entry, like a BPF
hash map's value area: memory is fixed when the table is made (``capacity`` entries, about 275
bytes each at a million, clients of either family: docs/ipv6.md), so a flood cannot grow it, and
an entry is named by its slot number, which is what the indexes, lists and timer wheel store. Real servers
are referred to by id, never by object.

Indexes. Three open-addressing hash indexes (linear probing, backward-shift deletion, load <= 0.5)
from fixed-length ``bytes`` keys to slots:

- cookie:  (service, client IP, initiator cookie)  -> the entry        (every IKE packet)
- client:  (service, client IP)                    -> newest entry of that client  (raw ESP/AH)
- natt:    (service, client IP, client UDP port)   -> newest entry of that IP+port (ESP-in-UDP)

The client and natt indexes point at the head of an intrusive doubly-linked list of that
client's entries, newest first. Keys are ``bytes`` on purpose: CPython hashes bytes with SipHash
keyed per process, so an attacker who picks cookies and spoofed addresses cannot aim collisions
at one bucket (``int`` keys hash to themselves modulo 2**61-1 and could be).

Expiry. A timer wheel of ``wheel_size`` buckets of ``tick`` seconds, lazy: a refresh only moves
the entry's deadline; an entry whose bucket comes round before its deadline is filed again. The
cost of ``expire(now)`` is what expires plus at most one refiling per entry per wheel revolution,
never a scan of the table.

Limits. Above ``pressure`` (a fraction of the capacity) and when full, ``create`` first reclaims
an INIT entry (a random sample, else the oldest), then the oldest soft-expired entry, and never an
ESTABLISHED one: when only those are left, it refuses the new entry instead.
Soft expiry: a service may keep up to ``soft_limit`` ESTABLISHED entries ``soft_grace`` seconds
past their idle timeout; traffic revives them, pressure reclaims them first.

Events. Whoever mirrors the table (the real servers' connection counts, the fast path's map, the
failover peer) subclasses ``TableListener`` and registers with ``listen``; the table calls every
listener, in registration order, as entries are created, established, change client port, move
to another real server or leave. Other modules read entries through ``view`` and ``conversation``,
never through the columns.
"""

from __future__ import annotations

import random
import struct
from array import array
from typing import Iterator, NamedTuple

from director.isakmp_state import Event, State, Timeouts, transition

NO_SLOT = -1
NO_RS = 0xFFFF

# flags column
F_NATT = 0x01  # the conversation has used UDP 4500
F_SOFT = 0x02  # kept past its idle timeout (soft expiry)
F_SPI_R_FROM_SERVER = 0x04  # spi_r was recorded from the real server's reply (NAT mode)
F_SUPERSEDED = 0x08  # a newer conversation of its client endpoint was established on its server

# A client address is an int of either family (IPv4 below 2**32, IPv6 never: director.packet), in
# the keys as two 64-bit halves, so one table holds both families and no IPv4 key equals an IPv6 one.
_COOKIE_KEY = struct.Struct(">HQQQ")  # service, client (high, low half), initiator cookie: 26 bytes
_CLIENT_KEY = struct.Struct(">HQQ")  # service, client: 18 bytes
_NATT_KEY = struct.Struct(">HQQH")  # service, client, client port: 20 bytes
_M64 = (1 << 64) - 1

_SAMPLES = 8  # random slots drop-entry looks at before taking the oldest INIT entry
_UNANSWERED_WALK = 64  # INIT list entries drop-entry looks at for an unanswered one (see _reclaim)
# the two FIFO lists drop-entry takes victims from, oldest first
_LIST_INIT = 0
_LIST_SOFT = 1


class TableFull(Exception):
    """No free slot and nothing reclaimable (every entry is ESTABLISHED)."""


class EntryView(NamedTuple):
    """A copy of one entry, for listings, events and tests (never built per packet)."""

    slot: int
    svc: int
    client: int
    cport: int
    spi_i: int
    spi_r: int
    state: State
    rs: int
    created: float
    expires: float
    natt: bool
    soft: bool
    retransmits: int


class TableListener:
    """What the table tells the modules that mirror it. Every method does nothing here: a
    listener overrides the events it needs. ``s`` is the entry's slot; the entry is complete and
    readable (``Table.view``) in every call, ``removed`` included (the slot is freed after it)."""

    __slots__ = ()

    def created(self, s: int) -> None:
        """A new INIT entry is in place."""

    def established(self, s: int) -> None:
        """The entry turned ESTABLISHED (its client echoed the responder cookie)."""

    def changed(self, s: int, old_port: int) -> None:
        """The entry's client UDP port changed from ``old_port`` (NAT-T float, NAT rebinding)."""

    def moved(self, s: int, old_rs: int, state: int) -> None:
        """The entry went from real server ``old_rs`` to its current one; ``state`` is its state."""

    def removed(self, s: int, event: Event, state: int) -> None:
        """The entry, in ``state``, leaves the table by ``event`` (EXPIRE or REMOVE)."""

    def activity(self, s: int) -> float | None:
        """When the ESTABLISHED entry's client was last seen where this table cannot see it (the
        eBPF fast path forwards its ESP without the table), or None. Asked only for an entry
        about to expire; the newest answer of all listeners counts."""
        return None


class _Index:
    """Open-addressing map from fixed-length ``bytes`` keys to non-negative slot numbers.

    With ``aux``, each bucket carries a second slot number (the client groups keep their
    ESTABLISHED entry there, so an ESP lookup is one probe, never a walk of the group).
    """

    __slots__ = ("klen", "mask", "slots", "keys", "size", "aux")

    def __init__(self, capacity: int, klen: int, aux: bool = False) -> None:
        n = 8
        while n < 2 * capacity:
            n <<= 1
        self.mask = n - 1
        self.klen = klen
        self.slots = array("i", [NO_SLOT]) * n
        self.keys = bytearray(n * klen)
        self.size = 0
        self.aux = array("i", [NO_SLOT]) * n if aux else None

    def find(self, key: bytes) -> int:
        """The bucket holding ``key``, or -1."""
        mask, slots, keys, k = self.mask, self.slots, self.keys, self.klen
        b = hash(key) & mask
        while True:
            if slots[b] < 0:
                return -1
            o = b * k
            if keys[o : o + k] == key:
                return b
            b = (b + 1) & mask

    def get(self, key: bytes) -> int:
        b = self.find(key)
        return self.slots[b] if b >= 0 else NO_SLOT

    def insert(self, key: bytes, slot: int, aux: int = NO_SLOT) -> int:
        """Add ``key`` (which must be absent); the load factor stays <= 0.5 by construction."""
        mask, slots, k = self.mask, self.slots, self.klen
        b = hash(key) & mask
        while slots[b] >= 0:
            b = (b + 1) & mask
        slots[b] = slot
        if self.aux is not None:
            self.aux[b] = aux
        self.keys[b * k : b * k + k] = key
        self.size += 1
        return b

    def delete_at(self, b: int) -> None:
        """Empty bucket ``b`` and shift later members of its probe run back (no tombstones)."""
        mask, slots, keys, k = self.mask, self.slots, self.keys, self.klen
        hole = j = b
        while True:
            j = (j + 1) & mask
            if slots[j] < 0:
                break
            kj = bytes(keys[j * k : j * k + k])
            home = hash(kj) & mask
            # the member at j may fill the hole if the hole lies on its probe path home..j
            if (j - home) & mask >= (j - hole) & mask:
                slots[hole] = slots[j]
                keys[hole * k : hole * k + k] = kj
                if self.aux is not None:
                    self.aux[hole] = self.aux[j]
                hole = j
        slots[hole] = NO_SLOT
        self.size -= 1


class Table:
    """The connection table. Every method takes ``now`` where time matters; nothing reads a clock."""

    def __init__(
        self,
        capacity: int,
        *,
        now: float = 0.0,
        tick: float = 1.0,
        wheel_size: int = 4096,
        pressure: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if capacity < 1 or capacity > 0x7FFFFFFF:
            raise ValueError(f"capacity: must be 1..2**31-1, got {capacity}")
        if wheel_size < 2 or wheel_size & (wheel_size - 1):
            raise ValueError(f"wheel_size: must be a power of two >= 2, got {wheel_size}")
        if not tick > 0:
            raise ValueError(f"tick: must be > 0, got {tick}")
        if not 0.1 <= pressure <= 1.0:
            raise ValueError(f"pressure: must be 0.1..1.0, got {pressure}")
        self.capacity = capacity
        # above this many entries, every new entry first reclaims an INIT one (IPVS's drop_entry
        # under memory pressure): headroom for legitimate clients during an INIT flood
        self.pressure_limit = max(1, int(capacity * pressure))
        self._rng = random.Random(seed)
        # a tuple, rebuilt by listen/unlisten: an event loops over it, nothing is allocated per event
        self._listeners: tuple[TableListener, ...] = ()

        def col(code: str, fill: int | float = 0) -> array:
            return array(code, [fill]) * capacity

        self.state = col("B")
        self.flags = col("B")
        self.retrans = col("B")
        self.svc = col("H")
        self.rs = col("H", NO_RS)
        self.cport = col("H")
        self.ike_len = col("H")
        self.client_hi = col("Q")  # the client address's high 64 bits (0 for IPv4)
        self.client_lo = col("Q")
        self.spi_i = col("Q")
        self.spi_r = col("Q")
        self.expires = col("d")
        self.created = col("d")
        # timer wheel membership; t_tick 0 = not filed (filed ticks are >= 1)
        self.t_tick = col("I")
        self.t_next = col("i", NO_SLOT)
        self.t_prev = col("i", NO_SLOT)
        # client and natt groups, INIT/SOFT FIFO lists
        self.g_next = col("i", NO_SLOT)
        self.g_prev = col("i", NO_SLOT)
        self.p_next = col("i", NO_SLOT)
        self.p_prev = col("i", NO_SLOT)
        self.l_next = col("i", NO_SLOT)
        self.l_prev = col("i", NO_SLOT)
        self._free = array("i", range(capacity - 1, -1, -1))  # stack: slot 0 is handed out first

        self._by_cookie = _Index(capacity, _COOKIE_KEY.size)
        self._by_client = _Index(capacity, _CLIENT_KEY.size, aux=True)
        self._by_natt = _Index(capacity, _NATT_KEY.size, aux=True)

        self._list_head = [NO_SLOT, NO_SLOT]
        self._list_tail = [NO_SLOT, NO_SLOT]
        self._list_len = [0, 0]

        self._tick = tick
        self._wheel_mask = wheel_size - 1
        self._wheel = array("i", [NO_SLOT]) * wheel_size
        self._now_tick = int(now // tick)
        if now < 0:
            raise ValueError(f"now: must be >= 0, got {now}")

        self._timeouts: dict[int, Timeouts] = {}
        self._default_timeouts = Timeouts()
        self._soft_limit: dict[int, int] = {}
        self._soft_grace: dict[int, float] = {}
        self._soft_count: dict[int, int] = {}

        self.n_init = 0
        self.n_established = 0
        self.stats = {
            "created": 0,
            "established": 0,
            "expired_init": 0,
            "expired_established": 0,
            "removed": 0,
            "reclaimed_init": 0,
            "reclaimed_soft": 0,
            "refused_full": 0,
            "soft_kept": 0,
            "soft_revived": 0,
            "refreshed_elsewhere": 0,
            "superseded": 0,
        }

    # -- configuration ---------------------------------------------------------------------
    def listen(self, listener: TableListener) -> None:
        """Call ``listener`` on every event from now on (after the listeners already there)."""
        if listener not in self._listeners:
            self._listeners += (listener,)

    def unlisten(self, listener: TableListener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def set_timeouts(self, svc: int, timeouts: Timeouts) -> None:
        """Applies to every refresh from now on (IPVS semantics: existing deadlines stand)."""
        self._timeouts[svc] = timeouts

    def timeouts(self, svc: int) -> Timeouts:
        return self._timeouts.get(svc, self._default_timeouts)

    def set_soft_expiry(self, svc: int, limit: int, grace: float) -> None:
        if limit < 0:
            raise ValueError(f"soft_expiry.limit: must be >= 0, got {limit}")
        if limit and not grace > 0:
            raise ValueError(f"soft_expiry.grace: must be > 0, got {grace}")
        self._soft_limit[svc] = limit
        self._soft_grace[svc] = grace

    # -- lookups (hot path) ------------------------------------------------------------------
    def lookup(self, svc: int, client: int, spi_i: int) -> int:
        """The entry of one ISAKMP conversation, or NO_SLOT."""
        return self._by_cookie.get(_COOKIE_KEY.pack(svc, client >> 64, client & _M64, spi_i))

    def client_head(self, svc: int, client: int) -> int:
        """The newest entry of ``client`` in ``svc`` (any state), or NO_SLOT."""
        return self._by_client.get(_CLIENT_KEY.pack(svc, client >> 64, client & _M64))

    def natt_head(self, svc: int, client: int, port: int) -> int:
        """The newest entry of ``client``:``port`` in ``svc`` (any state), or NO_SLOT."""
        return self._by_natt.get(_NATT_KEY.pack(svc, client >> 64, client & _M64, port))

    def established_of_client(self, svc: int, client: int) -> tuple[int, bool]:
        """(an ESTABLISHED entry of the client or NO_SLOT, and when none: whether INIT ones exist).

        One probe: the group's bucket keeps its ESTABLISHED entry, so a client with many INIT
        entries (a spoofed initial-packet flood under its address) costs its ESP nothing more.
        """
        return self._established(self._by_client, _CLIENT_KEY.pack(svc, client >> 64, client & _M64))

    def established_of_natt(self, svc: int, client: int, port: int) -> tuple[int, bool]:
        """Same as established_of_client for the client's IP and UDP port (ESP-in-UDP)."""
        return self._established(self._by_natt, _NATT_KEY.pack(svc, client >> 64, client & _M64, port))

    @staticmethod
    def _established(index: _Index, key: bytes) -> tuple[int, bool]:
        b = index.find(key)
        if b < 0:
            return NO_SLOT, False
        e = index.aux[b]
        return (e, False) if e >= 0 else (NO_SLOT, True)

    # -- changes ----------------------------------------------------------------------------
    def create(
        self,
        svc: int,
        client: int,
        cport: int,
        spi_i: int,
        rs: int,
        now: float,
        *,
        ike_len: int = 0,
        natt: bool = False,
    ) -> int:
        """A new INIT entry; reclaims an INIT or soft entry when full; raises TableFull."""
        key = _COOKIE_KEY.pack(svc, client >> 64, client & _M64, spi_i)
        if self._by_cookie.find(key) >= 0:
            raise ValueError("entry exists")  # callers look up first; this is a programming error
        if len(self._free) <= self.capacity - self.pressure_limit:
            if not self._reclaim() and not self._free:
                self.stats["refused_full"] += 1
                raise TableFull()
        s = self._free.pop()
        self.state[s] = transition(State.FREE, Event.INITIAL)
        self.flags[s] = F_NATT if natt else 0
        self.retrans[s] = 0
        self.svc[s] = svc
        self.rs[s] = rs
        self.cport[s] = cport
        self.ike_len[s] = ike_len
        self.client_hi[s] = client >> 64
        self.client_lo[s] = client & _M64
        self.spi_i[s] = spi_i
        self.spi_r[s] = 0
        self.created[s] = now
        self._by_cookie.insert(key, s)
        self._group_add(self._by_client, _CLIENT_KEY.pack(svc, client >> 64, client & _M64), self.g_next, self.g_prev, s)
        self._group_add(self._by_natt, _NATT_KEY.pack(svc, client >> 64, client & _M64, cport), self.p_next, self.p_prev, s)
        self._list_append(_LIST_INIT, s)
        self.n_init += 1
        self.stats["created"] += 1
        self._set_deadline(s, now + self.timeouts(svc).init)
        for listener in self._listeners:
            listener.created(s)
        return s

    def refresh_all(self, now: float) -> int:
        """Restart every entry's idle timer from ``now`` (a backup director taking over: its
        mirrored deadlines are the old active's, which kept refreshing entries it never synced).
        A scan, once per takeover; lazy like ``touch`` otherwise."""
        n = 0
        for s in self.slots():
            self.touch(s, now)
            n += 1
        return n

    def retransmit(self, s: int, now: float, ike_len: int = 0) -> int:
        """A repeated initial packet (responder cookie still zero). Returns the retransmit count.

        Only a byte-length-identical repeat counts: an IKEv2 COOKIE or INVALID_KE retry is a
        different message (it carries a notify or another KE) and resets the count, because the
        real server did answer it.
        """
        st = transition(self.state[s], Event.INITIAL)
        if st != State.INIT:
            return 0
        if ike_len and ike_len != self.ike_len[s]:
            self.retrans[s] = 0
            self.ike_len[s] = ike_len
        elif self.retrans[s] < 255:
            self.retrans[s] += 1
        self.touch(s, now)
        return self.retrans[s]

    def record_reply(self, s: int, spi_r: int) -> None:
        """The real server answered with responder SPI ``spi_r`` (0 = COOKIE/KE retry): seen where its
        replies pass the director (NAT; DR/TUN with the return path through the director)."""
        transition(self.state[s], Event.REPLY)
        if spi_r and self.state[s] == State.INIT:
            self.spi_r[s] = spi_r
            self.flags[s] |= F_SPI_R_FROM_SERVER

    def spi_r_from_server(self, s: int) -> bool:
        return bool(self.flags[s] & F_SPI_R_FROM_SERVER)

    def server_spi_r(self, s: int) -> int | None:
        """The responder SPI the real server sent (its replies pass the director), or None if none was recorded."""
        return self.spi_r[s] if self.flags[s] & F_SPI_R_FROM_SERVER else None

    def establish(self, s: int, spi_r: int, now: float) -> bool:
        """The initiator echoed responder cookie ``spi_r``. True when this made it ESTABLISHED."""
        old = self.state[s]
        new = transition(old, Event.RESPONDER_SEEN)
        if old == new:
            self.touch(s, now)
            return False
        self._list_remove(_LIST_INIT, s)
        self.state[s] = new
        self.spi_r[s] = spi_r
        svc, hi, lo = self.svc[s], self.client_hi[s], self.client_lo[s]
        self._by_client.aux[self._by_client.find(_CLIENT_KEY.pack(svc, hi, lo))] = s
        self._by_natt.aux[self._by_natt.find(_NATT_KEY.pack(svc, hi, lo, self.cport[s]))] = s
        self.retrans[s] = 0
        self.n_init -= 1
        self.n_established += 1
        self.stats["established"] += 1
        for listener in self._listeners:
            listener.established(s)
        self.touch(s, now)
        self._supersede(s, now)
        return True

    def _supersede(self, s: int, now: float) -> None:
        """The client endpoint's older ESTABLISHED conversations on the same real server are most
        likely the ones ``s`` replaced (an IKEv2 IKE SA rekey, a new IKEv1 phase 1): the old SA's
        DELETE is encrypted, so the director never sees it go, and it would count as an active
        connection (lc, wlc, sed, nq) until its idle timeout. Their deadline is cut to the INIT
        timeout, and neither the fast path's activity nor soft expiry keeps them; an IKE packet of
        their own extends them by the INIT timeout only (the old SA's own DELETE is such a packet:
        IKEv1 sends it after the new phase 1 is up). An SA that is in fact still alive keeps its
        entry as long as its IKE traffic comes at least every INIT timeout, and if it goes quiet
        longer, its next message is adopted on the same server (core) anyway. A walk of the
        endpoint's group, once per establish or port change (bounded by the per-source limit on
        new entries)."""
        rs, grace = self.rs[s], now + self.timeouts(self.svc[s]).init
        b = self._by_natt.find(_NATT_KEY.pack(self.svc[s], self.client_hi[s], self.client_lo[s], self.cport[s]))
        e = self._by_natt.slots[b] if b >= 0 else NO_SLOT
        while e >= 0:
            if (e != s and self.state[e] == State.ESTABLISHED and self.rs[e] == rs
                    and not self.flags[e] & (F_SUPERSEDED | F_SOFT) and self.expires[e] > grace):  # fmt: skip
                self.flags[e] |= F_SUPERSEDED
                self.stats["superseded"] += 1
                self._set_deadline(e, grace)
            e = self.p_next[e]

    def touch(self, s: int, now: float) -> None:
        """Refresh the idle deadline (any IKE or ESP packet of the entry). O(1), lazy."""
        if self.flags[s] & F_SOFT:
            self._unsoft(s)
            self.stats["soft_revived"] += 1
        if self.flags[s] & F_SUPERSEDED:  # replaced: its own traffic buys it the INIT timeout only
            deadline = now + self.timeouts(self.svc[s]).init
        else:
            deadline = now + self.timeouts(self.svc[s]).for_state(self.state[s])
        if int(deadline // self._tick) + 1 < self.t_tick[s]:
            self._set_deadline(s, deadline)  # shortened: refile now
        else:
            self.expires[s] = deadline  # later: the wheel refiles it when its bucket comes round

    def set_port(self, s: int, port: int, now: float | None = None) -> None:
        """The client's UDP source port changed (NAT-T float 500 -> 4500, or a NAT rebinding).

        With ``now``, an ESTABLISHED entry arriving in its new endpoint group supersedes the older
        ones there (an IKEv1 phase 1 behind a NAT is established on the port 500 mapping and
        floats to the 4500 one, where the phase 1 it replaces lives)."""
        old = self.cport[s]
        if old == port:
            return
        svc, hi, lo = self.svc[s], self.client_hi[s], self.client_lo[s]
        self._group_del(self._by_natt, _NATT_KEY.pack(svc, hi, lo, old), self.p_next, self.p_prev, s)
        self.cport[s] = port
        self._group_add(self._by_natt, _NATT_KEY.pack(svc, hi, lo, port), self.p_next, self.p_prev, s)
        for listener in self._listeners:
            listener.changed(s, old)
        if now is not None and self.state[s] == State.ESTABLISHED and not self.flags[s] & F_SUPERSEDED:
            self._supersede(s, now)

    def mark_natt(self, s: int) -> None:
        self.flags[s] |= F_NATT

    def is_natt(self, s: int) -> bool:
        """The conversation has used UDP 4500 (its port is then the NAT-T one its ESP-in-UDP uses)."""
        return bool(self.flags[s] & F_NATT)

    def move(self, s: int, rs: int) -> None:
        """Reschedule the entry to real server ``rs`` (dead server, passive health signal)."""
        old = self.rs[s]
        if old == rs:
            return
        self.rs[s] = rs
        self.retrans[s] = 0
        st = self.state[s]
        for listener in self._listeners:
            listener.moved(s, old, st)

    def remove(self, s: int) -> None:
        """Take the entry out (operator, drop-entry); counted as removed."""
        self._free_slot(s, Event.REMOVE)
        self.stats["removed"] += 1

    def expire(self, now: float) -> int:
        """Expire what is due at ``now``; returns how many entries left the table."""
        target = int(now // self._tick)
        if target <= self._now_tick:
            return 0
        mask = self._wheel_mask
        start = max(self._now_tick + 1, target - mask)
        self._now_tick = target
        gone = 0
        wheel, nxt, expires = self._wheel, self.t_next, self.expires
        for t in range(start, target + 1):
            b = t & mask
            s = wheel[b]
            wheel[b] = NO_SLOT
            while s >= 0:
                following = nxt[s]
                self.t_prev[s] = self.t_next[s] = NO_SLOT
                self.t_tick[s] = 0  # detached: not filed
                if expires[s] <= now:
                    gone += self._expire_one(s, now)
                else:
                    self._file(s, int(expires[s] // self._tick) + 1)
                s = following
        return gone

    def _expire_one(self, s: int, now: float) -> int:
        svc = self.svc[s]
        superseded = self.flags[s] & F_SUPERSEDED
        if self._listeners and self.state[s] == State.ESTABLISHED and not superseded:
            seen = None
            for listener in self._listeners:
                t = listener.activity(s)
                if t is not None and (seen is None or t > seen):
                    seen = t
            if seen is not None:
                deadline = seen + self.timeouts(svc).established
                if deadline > now:
                    if self.flags[s] & F_SOFT:
                        self._unsoft(s)
                    self.stats["refreshed_elsewhere"] += 1
                    self._set_deadline(s, deadline)
                    return 0
        if self.state[s] == State.ESTABLISHED and not self.flags[s] & F_SOFT and not superseded:
            limit = self._soft_limit.get(svc, 0)
            if limit and self._soft_count.get(svc, 0) < limit:
                self.flags[s] |= F_SOFT
                self._soft_count[svc] = self._soft_count.get(svc, 0) + 1
                self._list_append(_LIST_SOFT, s)
                self.stats["soft_kept"] += 1
                self._set_deadline(s, now + self._soft_grace[svc])
                return 0
        key = "expired_established" if self.state[s] == State.ESTABLISHED else "expired_init"
        self.stats[key] += 1
        self._free_slot(s, Event.EXPIRE)
        return 1

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.capacity - len(self._free)

    def view(self, s: int) -> EntryView:
        f = self.flags[s]
        return EntryView(
            s,
            self.svc[s],
            self.client_of(s),
            self.cport[s],
            self.spi_i[s],
            self.spi_r[s],
            State(self.state[s]),
            self.rs[s],
            self.created[s],
            self.expires[s],
            bool(f & F_NATT),
            bool(f & F_SOFT),
            self.retrans[s],
        )

    def conversation(self, s: int) -> tuple[int, int, int]:
        """(service, client, initiator SPI): the key that names the entry's conversation."""
        return self.svc[s], self.client_of(s), self.spi_i[s]

    def client_of(self, s: int) -> int:
        return self.client_hi[s] << 64 | self.client_lo[s]

    def svc_of(self, s: int) -> int:
        return self.svc[s]

    def rs_of(self, s: int) -> int:
        return self.rs[s]

    def state_of(self, s: int) -> int:
        return self.state[s]

    def port_of(self, s: int) -> int:
        return self.cport[s]

    def slots(self) -> Iterator[int]:
        """Every live slot (a scan of the table: for listings and operator actions only)."""
        state = self.state
        return (s for s in range(self.capacity) if state[s] != State.FREE)

    def entries(self) -> Iterator[EntryView]:
        return (self.view(s) for s in self.slots())

    def soft_count(self, svc: int) -> int:
        return self._soft_count.get(svc, 0)

    # -- internals --------------------------------------------------------------------------
    def _reclaim(self) -> bool:
        """Drop-entry: free an INIT entry (random sample, else the oldest), else the oldest soft one.

        Among the sampled INIT entries an unanswered one goes first: where replies pass the director
        (NAT; DR/TUN with the return path through it) a spoofed IKE_SA_INIT flood's entries are
        never answered by a real server reachable at their source, a real client's usually are.
        If the sample holds only answered ones, the INIT list (oldest first) is walked for an
        unanswered one, at most ``_UNANSWERED_WALK`` steps, before an answered one is taken: with
        half the table answered, a sample of ``_SAMPLES`` misses every unanswered one once in 256.

        Like IPVS's drop_entry, victims are sampled at random so a flood cannot predict which
        conversations survive; an ESTABLISHED entry is never taken (soft-expired ones are past
        their timeout already).
        """
        if self._list_len[_LIST_INIT]:
            state, flags, cap, rnd = self.state, self.flags, self.capacity, self._rng.randrange
            answered = NO_SLOT  # an INIT entry the real server answered goes only if no unanswered one is found
            for _ in range(_SAMPLES):
                s = rnd(cap)
                if state[s] == State.INIT:
                    if flags[s] & F_SPI_R_FROM_SERVER:
                        if answered < 0:
                            answered = s
                        continue
                    self._free_slot(s, Event.REMOVE)
                    self.stats["reclaimed_init"] += 1
                    return True
            if answered >= 0:
                victim, s, nxt = answered, self._list_head[_LIST_INIT], self.l_next
                for _ in range(_UNANSWERED_WALK):  # the oldest unanswered INIT entry, if one is near
                    if s < 0:
                        break
                    if not flags[s] & F_SPI_R_FROM_SERVER:
                        victim = s
                        break
                    s = nxt[s]
                self._free_slot(victim, Event.REMOVE)
                self.stats["reclaimed_init"] += 1
                return True
        for which, stat in ((_LIST_INIT, "reclaimed_init"), (_LIST_SOFT, "reclaimed_soft")):
            s = self._list_head[which]
            if s >= 0:
                self._free_slot(s, Event.REMOVE)
                self.stats[stat] += 1
                return True
        return False

    def _free_slot(self, s: int, event: Event) -> None:
        st = self.state[s]
        new = transition(st, event)
        for listener in self._listeners:
            listener.removed(s, event, st)
        svc, hi, lo = self.svc[s], self.client_hi[s], self.client_lo[s]
        self._by_cookie.delete_at(self._by_cookie.find(_COOKIE_KEY.pack(svc, hi, lo, self.spi_i[s])))
        self._group_del(self._by_client, _CLIENT_KEY.pack(svc, hi, lo), self.g_next, self.g_prev, s)
        self._group_del(
            self._by_natt, _NATT_KEY.pack(svc, hi, lo, self.cport[s]), self.p_next, self.p_prev, s
        )
        if st == State.INIT:
            self._list_remove(_LIST_INIT, s)
            self.n_init -= 1
        else:
            if self.flags[s] & F_SOFT:
                self._unsoft(s)
            self.n_established -= 1
        if self.t_tick[s]:
            self._unfile(s)
        self.state[s] = new
        self.flags[s] = 0
        self.rs[s] = NO_RS
        self._free.append(s)

    def _unsoft(self, s: int) -> None:
        svc = self.svc[s]
        self.flags[s] &= ~F_SOFT & 0xFF
        self._soft_count[svc] -= 1
        self._list_remove(_LIST_SOFT, s)

    def _set_deadline(self, s: int, deadline: float) -> None:
        self.expires[s] = deadline
        if self.t_tick[s]:
            self._unfile(s)
        self._file(s, int(deadline // self._tick) + 1)

    def _file(self, s: int, t: int) -> None:
        if t <= self._now_tick:
            t = self._now_tick + 1
        b = t & self._wheel_mask
        head = self._wheel[b]
        self.t_tick[s] = t
        self.t_prev[s] = NO_SLOT
        self.t_next[s] = head
        if head >= 0:
            self.t_prev[head] = s
        self._wheel[b] = s

    def _unfile(self, s: int) -> None:
        p, n = self.t_prev[s], self.t_next[s]
        if p >= 0:
            self.t_next[p] = n
        else:
            b = self.t_tick[s] & self._wheel_mask
            if self._wheel[b] == s:
                self._wheel[b] = n
        if n >= 0:
            self.t_prev[n] = p
        self.t_prev[s] = self.t_next[s] = NO_SLOT
        self.t_tick[s] = 0

    def _group_add(self, index: _Index, key: bytes, nxt: array, prv: array, s: int) -> None:
        b = index.find(key)
        prv[s] = NO_SLOT
        established = self.state[s] == State.ESTABLISHED
        if b < 0:
            nxt[s] = NO_SLOT
            index.insert(key, s, s if established else NO_SLOT)
        else:
            head = index.slots[b]
            nxt[s] = head
            prv[head] = s
            index.slots[b] = s
            if established:
                index.aux[b] = s

    def _group_del(self, index: _Index, key: bytes, nxt: array, prv: array, s: int) -> None:
        b = index.find(key)
        p, n = prv[s], nxt[s]
        if p >= 0:
            nxt[p] = n
            if n >= 0:
                prv[n] = p
        elif n >= 0:
            index.slots[b] = n
            prv[n] = NO_SLOT
        else:
            index.delete_at(b)
            b = -1
        nxt[s] = prv[s] = NO_SLOT
        if b >= 0 and index.aux[b] == s:
            # the group's ESTABLISHED entry leaves: find another (a walk, once per such removal)
            e = index.slots[b]
            while e >= 0 and self.state[e] != State.ESTABLISHED:
                e = nxt[e]
            index.aux[b] = e

    def _list_append(self, which: int, s: int) -> None:
        tail = self._list_tail[which]
        self.l_prev[s] = tail
        self.l_next[s] = NO_SLOT
        if tail >= 0:
            self.l_next[tail] = s
        else:
            self._list_head[which] = s
        self._list_tail[which] = s
        self._list_len[which] += 1

    def _list_remove(self, which: int, s: int) -> None:
        p, n = self.l_prev[s], self.l_next[s]
        if p >= 0:
            self.l_next[p] = n
        else:
            self._list_head[which] = n
        if n >= 0:
            self.l_prev[n] = p
        else:
            self._list_tail[which] = p
        self.l_prev[s] = self.l_next[s] = NO_SLOT
        self._list_len[which] -= 1
