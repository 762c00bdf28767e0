"""Maglev hashing (``mh``): a prime-size lookup table, filled as in Eisenbud et al., NSDI 2016.

Section 3.4 of the paper: each server gets a permutation of the M slots, permutation[j] =
(offset + j * skip) mod M with offset = h1(addr) mod M and skip = h2(addr) mod (M - 1) + 1 (M
prime, so every permutation visits every slot). Servers take turns, each claiming its next
preferred slot that is still empty, until the table is full. A server of weight w takes w turns
per round (weights divided by their gcd first), so slot shares follow weights to within one
round. Only available servers are in the table: the service calls update() when
up/overloaded/weight change, and Maglev's minimal disruption keeps the clients of the other
servers where they were. A client maps to slot mix64(client) mod M.

Deterministic across processes and machines, so active and backup directors build the same
table: h1 and h2 are blake2b of the 4-byte address with distinct personalisations, and servers
take turns in address order, not list order. If a server in the table has become unavailable
without an update(), pick walks forward to the next slot whose server is available.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, check_int_option, register
from director.schedulers.hashing import (
    SEED_MH,
    mix64,
    name_hash,
    reduced_weights,
    server_order,
    walk_forward,
)

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

    def __init__(self, *, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        super().__init__()
        size = check_int_option(self.name, "table_size", table_size, 2)
        if not is_prime(size):
            raise ValueError(f"scheduler 'mh': option 'table_size' must be prime, got {size}")
        self.table_size = size
        self._members: tuple[RealServer, ...] = ()
        self._key: tuple[tuple[int, int, int], ...] | None = None
        self._table: list[int] = []
        self._slots: list[RealServer] = []

    def _rebuild(self) -> None:
        members = tuple(server_order([s for s in self._servers if s.available]))
        key = tuple((s.addr, s.id, s.weight) for s in members)
        if key == self._key and all(a is b for a, b in zip(members, self._members)):
            return  # same set and weights (e.g. an overload flag that went and came back)
        self._key = key
        self._members = members
        self._table = populate(list(members), self.table_size) if members else []
        self._slots = [members[i] for i in self._table]

    def slot(self, client: int) -> int:
        return mix64(client, SEED_MH) % self.table_size

    def pick(self, client: int, vip: int) -> RealServer | None:
        if not self._slots:
            return None
        b = self.slot(client)
        server = self._slots[b]
        if server.available:
            return server
        return walk_forward(self._slots, b, self._members)

    def table_ids(self) -> list[int]:
        """The table as real-server ids, one per slot (empty when no server is available)."""
        return [s.id for s in self._slots]
