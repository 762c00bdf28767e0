"""Properties of the Maglev (mh) table: full, even, weighted, minimally disrupted, reproducible.

Hypothesis runs on small prime tables (251, 1021, 4099) to stay fast; the figures the paper quotes
for M >> N are checked once, deterministically, at the default M = 65537.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from director.schedulers import RealServer, make_scheduler
from director.schedulers.hashing import server_order
from director.schedulers.mh import MaglevScheduler, permutation_params, populate

SMALL_PRIMES = st.sampled_from([251, 1021, 4099])


@st.composite
def server_sets(draw, min_size=1, max_size=10, max_weight=1):
    ipv4 = st.integers(0, 2**32 - 1)
    addrs = draw(st.lists(ipv4, min_size=min_size, max_size=max_size, unique=True))
    weights = draw(st.lists(st.integers(1, max_weight), min_size=len(addrs), max_size=len(addrs)))
    return [RealServer(id=i, addr=a, weight=w) for i, (a, w) in enumerate(zip(addrs, weights))]


def mh(servers: list[RealServer], size: int) -> MaglevScheduler:
    s = make_scheduler("mh", table_size=size)
    s.update(servers)
    return s


def reference_populate(servers: list[RealServer], size: int) -> list[int]:
    """Section 3.4 pseudocode, literally: explicit permutation lists and next[] indexes."""
    members = server_order(servers)
    permutation = []
    for s in members:
        offset, skip = permutation_params(s.addr, size)
        permutation.append([(offset + j * skip) % size for j in range(size)])
    turns = []
    for i, s in enumerate(members):
        turns += [i] * s.weight  # not reduced: callers keep the gcd at 1
    nxt = [0] * len(members)
    entry = [-1] * size
    n = 0
    while True:
        for i in turns:
            c = permutation[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = permutation[i][nxt[i]]
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == size:
                return [members[k].id for k in entry]


# -- hypothesis, small tables ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(servers=server_sets(max_weight=3), size=st.sampled_from([251, 1021]))
def test_population_matches_the_paper_pseudocode(servers, size):
    # Weights with gcd 1 so that the reference, which does not reduce them, takes the same turns.
    servers[0].weight = 1
    assert mh(servers, size).table_ids() == reference_populate(servers, size)


@settings(max_examples=60, deadline=None)
@given(servers=server_sets(), size=SMALL_PRIMES)
def test_every_slot_is_filled_and_shares_are_even(servers, size):
    table = mh(servers, size).table_ids()
    assert len(table) == size
    counts = Counter(table)
    assert set(counts) == {s.id for s in servers}  # every slot holds a real server
    # One turn fills exactly one slot and servers take turns: shares differ by at most one slot.
    assert max(counts.values()) - min(counts.values()) <= 1


@settings(max_examples=60, deadline=None)
@given(servers=server_sets(min_size=2, max_weight=5), size=SMALL_PRIMES)
def test_slot_shares_follow_weights_within_one_round(servers, size):
    counts = Counter(mh(servers, size).table_ids())
    total = sum(s.weight for s in servers)
    for s in servers:
        # Full rounds give exactly w slots each; the last, partial round at most w more.
        assert abs(counts[s.id] - size * s.weight / total) <= s.weight


@settings(max_examples=60, deadline=None)
@given(servers=server_sets(min_size=2), size=SMALL_PRIMES, data=st.data())
def test_remove_then_add_back_restores_the_table_exactly(servers, size, data):
    s = mh(servers, size)
    original = s.table_ids()
    victim = data.draw(st.sampled_from(servers))
    weight = victim.weight
    victim.weight = 0  # quiesced: out of the table, like a removed server
    s.update(servers)
    assert victim.id not in s.table_ids()
    victim.weight = weight
    s.update(list(reversed(servers)))  # order of the list does not matter either
    assert s.table_ids() == original
    victim.up = False  # down (or overloaded): the table stays; its clients fall through
    s.update(servers)
    assert s.table_ids() == original


@settings(max_examples=40, deadline=None)
@given(servers=server_sets(min_size=2), data=st.data())
def test_removing_a_server_moves_little_else(servers, data):
    # At M = 4099, N <= 10 (>= 400 slots per server). Slots of other servers that change owner
    # ("excess"): median 0.7%, p99 1.9% over 3000 random configurations; the tail (worst seen 10.3%)
    # is configurations where two servers drew the same skip, so that their permutations are
    # shifts of one another (probability about N^2 / 2M, 1% here, 0.07% at M = 65537). The bound
    # leaves room for that tail; the tight figure is asserted at 65537 below.
    size = 4099
    before = mh(servers, size).table_ids()
    victim = data.draw(st.sampled_from(servers)).id
    after = mh([s for s in servers if s.id != victim], size).table_ids()
    assert victim not in after
    excess = sum(1 for a, b in zip(before, after) if a != b and a != victim) / size
    assert excess <= 0.15


def test_removal_excess_is_small_typically_at_4099():
    rng = random.Random(20240601)
    size = 4099
    excess = []
    for _ in range(100):
        n = rng.randint(2, 10)
        servers = [RealServer(i, rng.getrandbits(32)) for i in range(n)]
        before = mh(servers, size).table_ids()
        victim = rng.randrange(n)
        after = mh([s for s in servers if s.id != victim], size).table_ids()
        excess.append(sum(1 for a, b in zip(before, after) if a != b and a != victim) / size)
    excess.sort()
    assert excess[50] <= 0.015, excess[50]  # median; measured about 0.7%
    assert excess[95] <= 0.03, excess[95]  # p95; measured under 2%


# -- deterministic, at the default M = 65537 -----------------------------------------------------

M = 65537
_rng = random.Random(65537)
KEYS = [_rng.getrandbits(32) for _ in range(100_000)]
assert len(set(KEYS)) > 99_000


def _servers(n: int) -> list[RealServer]:
    rng = random.Random(n)
    return [RealServer(i, rng.getrandbits(32)) for i in range(n)]


def test_even_shares_and_small_disruption_at_65537():
    for n in (3, 10):
        servers = _servers(n)
        s = mh(servers, M)
        counts = Counter(s.table_ids())
        assert max(counts.values()) - min(counts.values()) <= 1  # slots: exactly even
        before = [s.pick(k, 0).id for k in KEYS]
        shares = Counter(before)
        # 100k keys: binomial sd of a 1/N share is under 0.15%; 1% absolute is > 6 sd.
        for i in range(n):
            assert abs(shares[i] / len(KEYS) - 1 / n) <= 0.01, (n, shares)
        victim = n - 1
        servers[victim].up = False
        s.update(servers)
        after = [s.pick(k, 0).id for k in KEYS]
        moved = sum(a != b for a, b in zip(before, after)) / len(KEYS)
        on_victim = shares[victim] / len(KEYS)
        assert moved == on_victim, (n, moved, on_victim)  # down: only its own clients move
        # ... to the others in proportion to their slots (each has 1/(n-1) of the rest): the
        # moved keys are a few thousand to 33k; 3% absolute is many binomial sd.
        dest = Counter(a for a, b in zip(after, before) if b == victim)
        assert victim not in dest
        for i in range(n - 1):
            assert abs(dest[i] / sum(dest.values()) - 1 / (n - 1)) <= 0.03, (n, dest)
        # removed (or quiesced): Maglev rebuilds; a few of the others' clients move too
        s.update(servers[:victim])
        after = [s.pick(k, 0).id for k in KEYS]
        moved = sum(a != b for a, b in zip(before, after)) / len(KEYS)
        assert on_victim <= moved <= 1 / n + 0.02, (n, moved)
        assert moved - on_victim <= 0.01, (n, moved, on_victim)  # measured 0.2%
        servers[victim].up = True
        s.update(servers)
        assert [s.pick(k, 0).id for k in KEYS] == before


def test_weights_two_to_one_at_65537():
    a, b = _servers(2)
    a.weight, b.weight = 200, 100  # reduced to 2:1
    s = mh([a, b], M)
    counts = Counter(s.table_ids())
    assert abs(counts[a.id] - 2 * counts[b.id]) <= 2
    share_a = sum(s.pick(k, 0) is a for k in KEYS) / len(KEYS)
    assert abs(share_a - 2 / 3) <= 0.01, share_a


def test_populate_is_order_free_at_65537():
    servers = _servers(5)
    assert populate(server_order(servers), M) == populate(server_order(servers[::-1]), M)
