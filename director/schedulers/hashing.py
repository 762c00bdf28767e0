"""Deterministic hashes for sh, dh and mh, and the weighted bucket table that sh and dh share.

Two directors (active and backup) must map a client to the same real server, so nothing here
may depend on the process: no ``hash()`` (randomized for str/bytes), no ``id()``, no dict order.
Per-lookup keys go through ``mix64`` (the 64-bit finalizer of MurmurHash3: xor-shift, multiply,
xor-shift, multiply, xor-shift; a bijection on 64-bit words with full avalanche), seeded per use
so that sh, dh and mh do not correlate. Per-server hashes (Maglev offset and skip) are computed
once per rebuild, so they can afford blake2b.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from math import gcd
from typing import ClassVar, Sequence

from director.schedulers.base import RealServer, Scheduler, check_bool_option, check_int_option

_M64 = (1 << 64) - 1

# Seeds keep the per-scheduler key hashes independent of each other (any fixed odd constants).
SEED_SH = 0x9E3779B97F4A7C15
SEED_DH = 0xC2B2AE3D27D4EB4F
SEED_MH = 0x165667B19E3779F9
SEED_LAYOUT = 0x27D4EB2F165667C5


def mix64(x: int, seed: int) -> int:
    """A well-mixed 64-bit hash of an integer key (an address of either family, or a bucket number).
    An IPv6 address's high half is mixed first and folded into its low half."""
    if x >> 64:
        x = mix64(x >> 64, seed) ^ (x & _M64)
    x = (x ^ seed) & _M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def name_hash(addr: int, person: bytes) -> int:
    """A 64-bit hash of a server's address (4 bytes IPv4, 16 IPv6); ``person`` (<= 16 bytes) separates uses."""
    digest = hashlib.blake2b(addr.to_bytes(4 if addr >> 32 == 0 else 16, "big"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def server_order(servers: Sequence[RealServer]) -> list[RealServer]:
    """Servers in a process-independent order (address, then id), not the config's list order."""
    return sorted(servers, key=lambda s: (s.addr, s.id))


def reduced_weights(servers: Sequence[RealServer]) -> list[int]:
    """Weights divided by their gcd (all must be > 0), so 200:100 takes as many turns as 2:1."""
    g = 0
    for s in servers:
        g = gcd(g, s.weight)
    return [s.weight // g for s in servers] if g else []


def bucket_table(servers: Sequence[RealServer], size: int) -> list[RealServer]:
    """The sh/dh table: ``size`` buckets, each server given ``weight`` buckets per cycle.

    As in IPVS's ip_vs_sh_reassign, servers (here in ``server_order``, weights reduced by their
    gcd) take ``weight`` buckets each in turn, cycling until every bucket is assigned, so shares
    follow weights up to the truncation of the last cycle. Weight 0 servers get no bucket (IPVS
    gives them one, which lookups then skip). Unlike IPVS, the buckets are then laid out in a fixed
    pseudo-random order (a seeded sort of the bucket numbers): IPVS fills consecutive buckets, so
    walking forward from a dead server's bucket lands on the same neighbour for almost all of its
    clients and doubles that one server's load; with the shuffled layout the fallback spreads over
    the others in proportion to their weights. The layout depends only on ``size``, the table only
    on membership and weights, so up/overloaded changes move no client of a healthy server.
    """
    members = [s for s in server_order(servers) if s.weight > 0]
    if not members:
        return []
    turns = reduced_weights(members)
    sequence: list[RealServer] = []
    while len(sequence) < size:
        for s, t in zip(members, turns):
            sequence.extend([s] * t)
    layout = sorted(range(size), key=lambda b: mix64(b, SEED_LAYOUT))
    table: list[RealServer] = [members[0]] * size
    for bucket, server in zip(layout, sequence):
        table[bucket] = server
    return table


def walk_forward(
    table: Sequence[RealServer], start: int, members: Sequence[RealServer]
) -> RealServer | None:
    """First available server at or after bucket ``start``, wrapping once; None if there is none.

    ``members`` are the servers in ``table``: checked first, so that with none available the
    answer costs O(servers), not a walk over every bucket.
    """
    if not any(s.available for s in members):
        return None
    size = len(table)
    for k in range(size):
        server = table[(start + k) % size]
        if server.available:
            return server
    return None


class BucketHashScheduler(Scheduler):
    """sh and dh: a key hashed into ``bucket_table``; on an unavailable server, walk forward.

    Options: ``table_size`` (default 256, IPVS's IP_VS_SH_TAB_SIZE / IP_VS_DH_TAB_SIZE; raise it
    when the sum of reduced weights nears 256, or later servers get few or no buckets) and
    ``fallback`` (default True, IPVS's sh-fallback flag: the first available server walking forward
    from the key's bucket; False returns None when the key's server is unavailable, as plain IPVS
    sh and dh do).
    """

    seed: ClassVar[int]

    def __init__(self, *, table_size: int = 256, fallback: bool = True) -> None:
        super().__init__()
        self.table_size = check_int_option(self.name, "table_size", table_size, 1)
        self.fallback = check_bool_option(self.name, "fallback", fallback)
        self._table: list[RealServer] = []

    def _rebuild(self) -> None:
        self._table = bucket_table(self._servers, self.table_size)

    @abstractmethod
    def _key(self, client: int, vip: int) -> int:
        """The address hashed to a bucket."""

    def bucket(self, client: int, vip: int) -> int:
        return mix64(self._key(client, vip), self.seed) % self.table_size

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        if not self._table:
            return None
        b = self.bucket(client, vip)
        server = self._table[b]
        if server.available:
            return server
        return walk_forward(self._table, b, self._servers) if self.fallback else None

    def table_ids(self) -> list[int]:
        """The table as real-server ids, one per bucket (empty when no server has weight)."""
        return [s.id for s in self._table]
