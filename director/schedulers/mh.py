"""Maglev hashing (``mh``): a prime-size lookup table, filled as in Eisenbud et al., NSDI 2016.

Section 3.4 of the paper: each server gets a permutation of the M slots, permutation[j] =
(offset + j * skip) mod M with offset = h1(addr) mod M and skip = h2(addr) mod (M - 1) + 1 (M
prime, so every permutation visits every slot). Servers take turns, each claiming its next
preferred slot that is still empty, until the table is full. A server of weight w takes w turns
per round (weights divided by their gcd first), so slot shares follow weights to within one
round. A client maps to slot mix64(key) mod M, the key being the client address (with ``port``:
the address and its UDP source port).

The table holds every server with weight > 0, whether it is up or not: it depends on membership
and weights alone (config), never on health, overload or on what a director has seen, so every
director with the same config builds the same table, and a server going down or coming back moves
no client of another server. Options, as IPVS's scheduler flags:

- ``fallback`` (``mh-fallback``; default true here, as ``sh`` and ``dh``): a client whose slot
  belongs to a server that is down or over ``-x`` probes further slots, each drawn by hashing
  the key with the probe number (as ip_vs_mh_get_fallback does), and goes to the first available
  server met; after ``FALLBACK_PROBES`` misses (most of the table unavailable) it walks forward
  from the last probe, which always ends. Probes are independent of the table's layout, so the
  dead server's clients spread over the others in proportion to their slots (walking forward from
  the slot itself would not: Maglev's fill order makes neighbouring slots' owners correlated,
  30% off in a 10-server table). ``fallback = false`` is plain IPVS ``mh``: no server for those
  clients.
- ``port`` (``mh-port``; default false): hash the client's UDP source port too, so many clients
  behind one NAT address (each with its own NAT-T port) spread over the servers instead of all
  landing on one. Meant for ``affinity = "ip-port"``: with ``ip`` affinity a client's later
  conversations follow its first one anyway.

A quiesced server (weight 0) leaves the table, like a removed one; Maglev's minimal disruption
moves its slots to the servers next in each slot's preference and about 1% of the others' (see
tests/property/test_maglev_props.py), so its keys never meet "no server". IPVS keeps a quiesced
server in the table under its last non-zero weight instead; that weight is history (what this
director saw), not config, and two directors that saw different histories would disagree.

Deterministic across processes and machines, so active and backup directors build the same
table: h1 and h2 are blake2b of the 4-byte address with distinct personalisations, and servers
take turns in address order, not list order.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, check_bool_option, check_int_option, register
from director.schedulers.hashing import (
    SEED_MH,
    mix64,
    name_hash,
    reduced_weights,
    server_order,
    walk_forward,
)

FALLBACK_PROBES = 32  # rehashed probes before walking forward (0.9^32 = 3% when 90% of slots are down)
DEFAULT_TABLE_SIZE = 65537  # the paper's M for small N; the table should be >= 100 x servers


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def permutation_params(addr: int, size: int) -> tuple[int, int]:
    """(offset, skip) of a server's preference list in a table of ``size`` slots."""
    offset = name_hash(addr, b"vpndir-mh-offset") % size
    skip = name_hash(addr, b"vpndir-mh-skip") % (size - 1) + 1
    return offset, skip


def populate(members: list[RealServer], size: int) -> list[int]:
    """The Maglev table: for each slot, the index into ``members`` of its server."""
    n = len(members)
    if n == 1:
        return [0] * size
    params = [permutation_params(s.addr, size) for s in members]
    pos = [offset for offset, _ in params]
    skips = [skip for _, skip in params]
    turns = []  # one round: server i appears weight(i) times, in order
    for i, w in enumerate(reduced_weights(members)):
        turns.extend([i] * w)
    table = [-1] * size
    filled = 0
    while True:
        for i in turns:
            c = pos[i]
            skip = skips[i]
            while table[c] >= 0:  # next preferred slot that is still empty
                c += skip
                if c >= size:
                    c -= size
            table[c] = i
            c += skip
            if c >= size:
                c -= size
            pos[i] = c
            filled += 1
            if filled == size:
                return table


@register
class MaglevScheduler(Scheduler):
    name = "mh"

    def __init__(self, *, table_size: int = DEFAULT_TABLE_SIZE, fallback: bool = True, port: bool = False) -> None:
        super().__init__()
        size = check_int_option(self.name, "table_size", table_size, 2)
        if not is_prime(size):
            raise ValueError(f"scheduler 'mh': option 'table_size' must be prime, got {size}")
        self.table_size = size
        self.fallback = check_bool_option(self.name, "fallback", fallback)
        self.port = check_bool_option(self.name, "port", port)
        self._members: tuple[RealServer, ...] = ()
        self._key: tuple[tuple[int, int, int], ...] | None = None
        self._table: list[int] = []
        self._slots: list[RealServer] = []

    def _rebuild(self) -> None:
        members = tuple(server_order([s for s in self._servers if s.weight > 0]))
        key = tuple((s.addr, s.id, s.weight) for s in members)
        if key == self._key and all(a is b for a, b in zip(members, self._members)):
            return  # same set and weights: an up/down or overload change keeps the table
        self._key = key
        self._members = members
        self._table = populate(list(members), self.table_size) if members else []
        self._slots = [members[i] for i in self._table]

    def _hash_key(self, client: int, port: int) -> int:
        return client ^ (port << 32) if self.port else client  # < 2**48: probe numbers go above

    def slot(self, client: int, port: int = 0) -> int:
        """The client's slot; ``port`` counts only with the ``port`` option (0 is the address alone)."""
        return mix64(self._hash_key(client, port), SEED_MH) % self.table_size

    def fallback_slots(self, client: int, port: int = 0) -> list[int]:
        """The slots a client probes after its own (``fallback``), in order."""
        key = self._hash_key(client, port)
        return [mix64(key ^ (k << 48), SEED_MH) % self.table_size for k in range(1, FALLBACK_PROBES + 1)]

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        slots = self._slots
        if not slots:
            return None
        key = self._hash_key(client, port)
        size = self.table_size
        server = slots[mix64(key, SEED_MH) % size]
        if server.available or not self.fallback:
            return server if server.available else None
        if not any(s.available for s in self._members):
            return None
        b = 0
        for k in range(1, FALLBACK_PROBES + 1):
            b = mix64(key ^ (k << 48), SEED_MH) % size
            if slots[b].available:
                return slots[b]
        return walk_forward(slots, b, self._members)

    def table_ids(self) -> list[int]:
        """The table as real-server ids, one per slot (empty when no server has weight)."""
        return [s.id for s in self._slots]
