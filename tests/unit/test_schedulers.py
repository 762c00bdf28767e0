"""Unit tests of director.schedulers: the registry, availability rules and each algorithm."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

import director
from director.schedulers import SCHEDULERS, RealServer, Scheduler, make_scheduler
from director.schedulers.base import register
from director.schedulers.hashing import SEED_MH, mix64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(director.__file__)))

ALL = ["dh", "fo", "lc", "mh", "nq", "ovf", "rr", "sed", "sh", "twos", "wlc", "wrr"]
BASE = 0x0A000001  # 10.0.0.1
VIP = 0xC0000201  # 192.0.2.1


def servers(*weights: int) -> list[RealServer]:
    return [RealServer(id=i, addr=BASE + i, weight=w) for i, w in enumerate(weights)]


def make(name: str, srv: list[RealServer], **options: object) -> Scheduler:
    s = make_scheduler(name, **options)
    s.update(srv)
    return s


def keys(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(n)]


def pick_many(s: Scheduler, n: int, seed: int = 1) -> list[RealServer | None]:
    """n picks with random clients and VIPs (so dh sees more than one destination)."""
    rng = random.Random(seed)
    return [s.pick(rng.getrandbits(32), rng.getrandbits(32)) for _ in range(n)]


# -- registry ------------------------------------------------------------------------------------


def test_registry_holds_every_scheduler():
    assert sorted(SCHEDULERS) == ALL
    for name, cls in SCHEDULERS.items():
        assert cls.name == name
        assert isinstance(make_scheduler(name), Scheduler)


def test_unknown_scheduler_is_named_with_the_known_ones():
    known = r"\(known: dh, fo, lc, mh, nq, ovf, rr, sed, sh, twos, wlc, wrr\)"
    with pytest.raises(ValueError, match=r"unknown scheduler 'xyz' " + known):
        make_scheduler("xyz")


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("rr", {"table_size": 7}, r"scheduler 'rr' has no option 'table_size'"),
        ("mh", {"tablesize": 251}, r"'mh' has no option 'tablesize' \(options: table_size, fallback, port\)"),
        ("mh", {"port": 1}, r"'port' must be true or false"),
        ("mh", {"fallback": "no"}, r"'fallback' must be true or false"),
        ("twos", {"rng": 1}, r"'twos' has no option 'rng' \(options: none\)"),
        ("fo", {"fallback": True}, r"'fo' has no option 'fallback'"),
        ("sh", {"bogus": 1}, r"'bogus'"),
        ("mh", {"table_size": 65536}, r"'table_size' must be prime, got 65536"),
        ("mh", {"table_size": 1}, r"'table_size' must be >= 2"),
        ("mh", {"table_size": "65537"}, r"'table_size' must be an integer"),
        ("mh", {"table_size": True}, r"'table_size' must be an integer"),
        ("sh", {"table_size": 0}, r"'table_size' must be >= 1"),
        ("dh", {"fallback": "yes"}, r"'fallback' must be true or false"),
    ],
)
def test_bad_option_is_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(name, **options)


def test_good_options_are_taken():
    assert make_scheduler("mh", table_size=251).table_size == 251
    assert make_scheduler("sh", table_size=1024, fallback=False).fallback is False
    m = make_scheduler("mh", fallback=False, port=True)
    assert (m.fallback, m.port) == (False, True)
    m = make_scheduler("mh")
    assert (m.fallback, m.port) == (True, False)


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="'rr' already taken"):

        @register
        class Other(Scheduler):
            name = "rr"

            def pick(self, client, vip):
                return None

    assert SCHEDULERS["rr"].__name__ == "RoundRobinScheduler"


# -- availability, for every scheduler ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_no_servers_gives_none(name):
    s = make_scheduler(name)
    assert s.pick(BASE, VIP) is None
    s.update([])
    assert s.pick(BASE, VIP) is None


@pytest.mark.parametrize("name", ALL)
def test_none_available_gives_none(name):
    srv = servers(1, 0, 1)
    srv[0].up = False
    srv[2].overloaded = True
    s = make(name, srv)
    assert all(p is None for p in pick_many(s, 200))


@pytest.mark.parametrize("name", ALL)
def test_all_quiesced_gives_none(name):
    s = make(name, servers(0, 0))
    assert all(p is None for p in pick_many(s, 200))


@pytest.mark.parametrize("name", ALL)
def test_only_available_servers_are_picked(name):
    srv = servers(3, 0, 2, 5, 1)  # 1: quiesced
    srv[0].up = False
    srv[3].overloaded = True
    s = make(name, srv)
    picked = Counter(p.id for p in pick_many(s, 2000))
    assert set(picked) <= {2, 4}
    assert picked  # something was picked at all


@pytest.mark.parametrize("name", ALL)
def test_weight_zero_gets_no_new_client(name):
    srv = servers(0, 100)
    srv[0].active = 0  # the idle server would win lc/nq/sed if weight were ignored
    srv[1].active = 50  # within its weight, for ovf
    s = make(name, srv)
    assert {p.id for p in pick_many(s, 1000)} == {1}


@pytest.mark.parametrize("name", ALL)
def test_state_change_without_update_is_respected(name):
    # The service calls update() on changes; should one slip through, pick still never returns
    # a server that is not available now.
    srv = servers(1, 1, 1)
    s = make(name, srv)
    before = Counter(p.id for p in pick_many(s, 600))
    srv[1].up = False
    srv[2].overloaded = True
    after = Counter(p.id for p in pick_many(s, 600, seed=2))
    assert set(after) == {0}
    srv[0].weight = 0
    assert all(p is None for p in pick_many(s, 100))
    assert before  # the first round did pick


# -- rr, wrr -------------------------------------------------------------------------------------


def test_rr_cycles_in_list_order():
    s = make("rr", servers(1, 5, 1))  # weights are ignored
    ids = [s.pick(BASE, VIP).id for _ in range(300)]
    assert ids[:6] == [0, 1, 2, 0, 1, 2]
    assert Counter(ids) == {0: 100, 1: 100, 2: 100}


def test_rr_skips_unavailable_and_keeps_its_place_across_update():
    srv = servers(1, 1, 1, 1)
    s = make("rr", srv)
    assert [s.pick(BASE, VIP).id for _ in range(2)] == [0, 1]
    srv[2].up = False
    s.update(srv)
    assert [s.pick(BASE, VIP).id for _ in range(4)] == [3, 0, 1, 3]


def test_wrr_exact_ratio_over_cycles():
    s = make("wrr", servers(1, 2, 3))
    ids = [s.pick(BASE, VIP).id for _ in range(600)]
    assert Counter(ids) == {0: 100, 1: 200, 2: 300}
    for cycle in range(100):  # every cycle of sum(weights) picks is exact
        assert Counter(ids[cycle * 6 : cycle * 6 + 6]) == {0: 1, 1: 2, 2: 3}


def test_wrr_is_smooth():
    s = make("wrr", servers(5, 1, 1))
    assert [s.pick(BASE, VIP).id for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_wrr_keeps_ratios_among_the_available():
    srv = servers(1, 2, 3)
    s = make("wrr", srv)
    srv[2].overloaded = True
    assert Counter(s.pick(BASE, VIP).id for _ in range(300)) == {0: 100, 1: 200}


def test_wrr_follows_a_weight_change():
    srv = servers(1, 1)
    s = make("wrr", srv)
    srv[1].weight = 4
    s.update(srv)
    assert Counter(s.pick(BASE, VIP).id for _ in range(500)) == {0: 100, 1: 400}


# -- lc, wlc, sed, nq ----------------------------------------------------------------------------


def test_lc_overhead_is_active_times_256_plus_inactive():
    a, b = servers(1, 1)
    a.active = 1  # overhead 256
    b.inactive = 255  # overhead 255
    s = make("lc", [a, b])
    assert s.pick(BASE, VIP) is b
    b.inactive = 256  # tie: first in list
    assert s.pick(BASE, VIP) is a
    b.inactive = 257
    assert s.pick(BASE, VIP) is a


def test_lc_ignores_weight_beyond_zero():
    a, b = servers(1, 10)
    a.active, b.active = 1, 2
    assert make("lc", [a, b]).pick(BASE, VIP) is a


def test_wlc_compares_overhead_per_weight():
    a, b = servers(1, 3)
    a.active, b.active = 1, 2  # 256/1 vs 512/3
    s = make("wlc", [a, b])
    assert s.pick(BASE, VIP) is b
    b.active = 3  # 768/3 == 256/1: tie goes to the first
    assert s.pick(BASE, VIP) is a
    b.inactive = 1  # 769/3 > 256
    a.inactive = 0
    assert s.pick(BASE, VIP) is a
    a.inactive = 2  # 258/1 * 3 = 774 > 769
    assert s.pick(BASE, VIP) is b


@pytest.mark.parametrize("name", ["wlc", "sed"])
def test_weighted_least_follows_weights_in_steady_state(name):
    srv = servers(1, 2, 3)
    s = make(name, srv)
    for _ in range(600):
        s.pick(BASE, VIP).active += 1
    assert [r.active for r in srv] == [100, 200, 300]
    # Clients leave and arrive: the shares stay with the weights.
    rng = random.Random(5)
    for _ in range(3000):
        gone = rng.choices(srv, weights=[r.active for r in srv])[0]
        gone.active -= 1
        s.pick(BASE, VIP).active += 1
    assert [r.active for r in srv] == [100, 200, 300]


def test_sed_counts_active_plus_one_and_ignores_inactive():
    a, b = servers(1, 3)
    a.inactive = 1000  # wlc would avoid a; sed does not look at INIT entries
    b.active = 2  # (0+1)/1 vs (2+1)/3: tie, first wins
    s = make("sed", [a, b])
    assert s.pick(BASE, VIP) is a
    assert make("wlc", [a, b]).pick(BASE, VIP) is b
    b.active = 1  # 2/3 < 1
    assert s.pick(BASE, VIP) is b


def test_nq_takes_an_idle_server_first():
    a, b, c = servers(10, 1, 1)
    a.active = 1  # sed: 2/10 is the best expected delay...
    b.active = 3
    s = make("nq", [a, b, c])
    assert s.pick(BASE, VIP) is c  # ...but c is idle
    c.up = False
    assert s.pick(BASE, VIP) is a  # no idle available server: sed
    b.active = 0
    b.overloaded = True
    assert s.pick(BASE, VIP) is a


# -- sh, dh --------------------------------------------------------------------------------------


def test_sh_same_client_same_server_and_even_spread():
    srv = servers(1, 1, 1, 1)
    s = make("sh", srv)
    ks = keys(20000)
    first = [s.pick(k, VIP).id for k in ks]
    assert [s.pick(k, VIP ^ 0xFF).id for k in ks] == first  # the VIP plays no part
    other = make("sh", list(reversed(servers(1, 1, 1, 1))))  # another director, other list order
    assert [other.pick(k, VIP).id for k in ks] == first
    shares = Counter(first)
    assert all(abs(shares[i] / len(ks) - 0.25) < 0.02 for i in range(4)), shares


def test_sh_table_gives_buckets_by_weight():
    s = make("sh", servers(1, 3))
    assert Counter(s.table_ids()) == {0: 64, 1: 192}
    shares = Counter(s.pick(k, VIP).id for k in keys(20000))
    assert abs(shares[1] / 20000 - 0.75) < 0.03, shares


def test_sh_fallback_moves_only_the_dead_servers_clients_and_spreads_them():
    srv = servers(1, 1, 1, 1)
    s = make("sh", srv)
    ks = keys(20000)
    before = {k: s.pick(k, VIP).id for k in ks}
    srv[0].up = False
    s.update(srv)
    after = {k: s.pick(k, VIP).id for k in ks}
    assert all(after[k] == before[k] for k in ks if before[k] != 0)
    moved_to = Counter(after[k] for k in ks if before[k] == 0)
    assert 0 not in moved_to
    assert all(moved_to[i] > 0.15 * sum(moved_to.values()) for i in (1, 2, 3)), moved_to


def test_sh_without_fallback_refuses():
    srv = servers(1, 1)
    s = make("sh", srv, fallback=False)
    ks = keys(2000)
    srv[0].up = False
    results = [s.pick(k, VIP) for k in ks]
    assert {r.id for r in results if r is not None} == {1}
    assert any(r is None for r in results)


def test_dh_hashes_the_vip():
    s = make("dh", servers(1, 1, 1, 1))
    vips = keys(8000, seed=3)
    first = [s.pick(BASE, v).id for v in vips]
    assert [s.pick(c, v).id for c, v in zip(keys(8000, seed=4), vips)] == first  # client ignored
    shares = Counter(first)
    assert all(abs(shares[i] / len(vips) - 0.25) < 0.03 for i in range(4)), shares
    assert Counter(make("sh", servers(1, 1, 1, 1)).table_ids()) == Counter(s.table_ids())


def test_sh_and_dh_hash_independently():
    # Same table, different seeds: a client address and a VIP with the same value do not
    # necessarily land in the same bucket.
    sh, dh = make("sh", servers(1, 1)), make("dh", servers(1, 1))
    same = sum(sh.bucket(k, 0) == dh.bucket(0, k) for k in keys(5000))
    assert same < 100  # about 5000/256 = 20 expected by chance


# -- key hashes ------------------------------------------------------------------------------------


def test_mix64_avalanches():
    rng = random.Random(9)
    flips = []
    for _ in range(2000):
        x, bit = rng.getrandbits(32), rng.randrange(32)
        flips.append(bin(mix64(x, SEED_MH) ^ mix64(x ^ (1 << bit), SEED_MH)).count("1"))
    assert 31 <= sum(flips) / len(flips) <= 33  # half of 64 bits on average
    assert min(flips) >= 8


@pytest.mark.parametrize("name", ["sh", "dh", "mh"])
def test_consecutive_addresses_land_on_unrelated_slots(name):
    # Clients from one NAT pool or one subnet differ in their low bits only; "address mod size"
    # would put them in consecutive slots (and addresses "size" apart in the same slot).
    s = make(name, servers(1, 1), table_size=251)
    slot = s.slot if name == "mh" else (lambda a: s.bucket(a, a))
    slots = [slot(BASE + i) for i in range(4096)]
    adjacent = sum((b - a) % 251 == 1 for a, b in zip(slots, slots[1:]))
    assert adjacent < 60  # about 4096/251 = 16 by chance
    assert len({slot(BASE + i * 251) for i in range(100)}) > 50


# -- mh ------------------------------------------------------------------------------------------


def test_mh_same_client_same_server():
    srv = servers(1, 1, 1)
    s = make("mh", srv, table_size=4099)
    ks = keys(5000)
    first = [s.pick(k, VIP).id for k in ks]
    assert [s.pick(k, 0).id for k in ks] == first
    s.update(srv)
    assert [s.pick(k, VIP).id for k in ks] == first
    assert set(first) == {0, 1, 2}


def test_mh_table_does_not_depend_on_list_order():
    a = make("mh", servers(1, 2, 1, 1), table_size=1021)
    b = make("mh", list(reversed(servers(1, 2, 1, 1))), table_size=1021)
    assert a.table_ids() == b.table_ids()


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("why", ["up", "overloaded"])
def test_mh_fallback_moves_only_the_dead_servers_clients(update, why):
    srv = servers(1, 1, 1)
    s = make("mh", srv, table_size=251)
    table = s.table_ids()
    ks = keys(3000)
    before = {k: s.pick(k, VIP).id for k in ks}
    setattr(srv[1], why, why != "up")
    if update:
        s.update(srv)
    assert s.table_ids() == table  # health and overload never rebuild the table
    after = {k: s.pick(k, VIP).id for k in ks}
    assert 1 not in after.values()
    assert all(after[k] == before[k] for k in ks if before[k] != 1)
    # the first probed slot whose server is available: check each moved client by hand
    for k in ks:
        if before[k] == 1:
            assert after[k] == next(table[b] for b in s.fallback_slots(k) if table[b] != 1)
    assert Counter(after[k] for k in ks if before[k] == 1).keys() == {0, 2}


def test_mh_without_fallback_refuses_the_dead_servers_clients_only():
    srv = servers(1, 1, 1)
    s = make("mh", srv, table_size=251, fallback=False)
    ks = keys(3000)
    before = {k: s.pick(k, VIP).id for k in ks}
    srv[1].up = False
    s.update(srv)
    after = {k: s.pick(k, VIP) for k in ks}
    assert all((after[k] is None) == (before[k] == 1) for k in ks)
    assert all(after[k].id == before[k] for k in ks if before[k] != 1)
    srv[1].up = True
    s.update(srv)
    assert {k: s.pick(k, VIP).id for k in ks} == before


def test_mh_port_hashes_the_source_port_only_with_the_option():
    plain = make("mh", servers(1, 1, 1), table_size=251)
    ported = make("mh", servers(1, 1, 1), table_size=251, port=True)
    nat = BASE + 77  # one NAT address, many NAT-T ports
    ports = list(range(1024, 1024 + 600))
    assert {plain.pick(nat, VIP, p).id for p in ports} == {plain.pick(nat, VIP).id}
    spread = Counter(ported.pick(nat, VIP, p).id for p in ports)
    assert all(n > 600 / 3 * 0.7 for n in spread.values()) and len(spread) == 3, spread
    # port 0 is the address alone: the same slot as without the option
    assert all(ported.slot(k, 0) == plain.slot(k) for k in keys(500))
    # deterministic: another instance (another director) agrees on every (address, port)
    other = make("mh", list(reversed(servers(1, 1, 1))), table_size=251, port=True)
    assert all(other.pick(nat, VIP, p).id == ported.pick(nat, VIP, p).id for p in ports)


def test_mh_excludes_quiesced_servers_from_the_table():
    srv = servers(1, 0, 1)
    s = make("mh", srv, table_size=251)
    assert set(s.table_ids()) == {0, 2}
    srv[1].weight = 1
    s.update(srv)
    assert set(s.table_ids()) == {0, 1, 2}


_MH_DIGEST_SCRIPT = """
import hashlib
from director.schedulers import RealServer, make_scheduler
s = make_scheduler("mh")
s.update([RealServer(i, 0x0A000001 + i, weight=w) for i, w in enumerate((1, 2, 1, 3))])
print(hashlib.sha256(bytes(s.table_ids())).hexdigest())
"""

# Pinned: a change here means directors of two versions would disagree on placement.
MH_GOLDEN = "d8c2a29f286ed190825ae726612634a93fb8f7ef387355e6f11ce6fc6ac3971f"


def _mh_digest_here() -> str:
    s = make("mh", [RealServer(i, 0x0A000001 + i, weight=w) for i, w in enumerate((1, 2, 1, 3))])
    return hashlib.sha256(bytes(s.table_ids())).hexdigest()


def test_mh_table_is_the_same_in_another_process():
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-c", _MH_DIGEST_SCRIPT]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        digests.add(out.stdout.strip())
    assert digests == {_mh_digest_here()}


def test_mh_table_matches_the_pinned_digest():
    assert _mh_digest_here() == MH_GOLDEN


def test_mh_populates_every_one_of_its_65537_slots():
    """Every slot names a server, each server's share follows its weight (equal here: within 1% of
    a tenth). How long the population takes is a benchmark's business, not a test's."""
    srv = [RealServer(i, 0x0A000001 + i) for i in range(10)]
    s = make_scheduler("mh")
    s.update(srv)
    ids = s.table_ids()
    assert len(ids) == 65537
    counts = Counter(ids)
    assert set(counts) == set(range(10))
    assert all(abs(n / 65537 - 0.1) < 0.01 for n in counts.values()), counts


# -- fo, ovf, twos -------------------------------------------------------------------------------


def test_fo_takes_the_heaviest_available_and_fails_over_in_weight_order():
    srv = servers(2, 5, 5, 3)  # 1 and 2 tie at 5: the earlier one wins, as ip_vs_fo (strictly greater)
    s = make("fo", srv)
    assert [s.pick(k, VIP).id for k in keys(50)] == [1] * 50  # load plays no part
    srv[1].active = 1000
    assert s.pick(BASE, VIP).id == 1
    srv[1].up = False
    assert s.pick(BASE, VIP).id == 2
    srv[2].overloaded = True
    assert s.pick(BASE, VIP).id == 3
    srv[3].weight = 0  # quiesced
    assert s.pick(BASE, VIP).id == 0
    srv[1].up = True  # back: takes the new clients again
    assert s.pick(BASE, VIP).id == 1


def test_ovf_fills_the_heaviest_to_its_weight_then_overflows():
    a, b, c = servers(1, 3, 2)
    s = make("ovf", [a, b, c])
    seq = []
    for _ in range(12):
        rs = s.pick(BASE, VIP)
        if rs is None:
            seq.append(None)
            break
        seq.append(rs.id)
        rs.active += 1  # each client turns ESTABLISHED before the next arrives
    # b (3) is skipped once active > 3, i.e. after its 4th client; then c (2) after 3; then a (1) after 2
    assert seq == [1, 1, 1, 1, 2, 2, 2, 0, 0, None]
    b.active = 3  # one of b's clients left: b is the heaviest with room again
    assert s.pick(BASE, VIP) is b


def test_ovf_ignores_init_entries_and_honours_availability():
    a, b = servers(1, 3)
    b.inactive = 1000  # IKE_SA_INITs in flight: not counted, as activeconns in IPVS
    s = make("ovf", [a, b])
    assert s.pick(BASE, VIP) is b
    b.up = False
    assert s.pick(BASE, VIP) is a
    b.up, b.weight = True, 0
    assert s.pick(BASE, VIP) is a


class Draws:
    """A random source that returns the given draws in order (and says when it ran out)."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)
        self.stops: list[int] = []

    def randrange(self, stop: int) -> int:
        self.stops.append(stop)
        v = self.values.pop(0)
        assert 0 <= v < stop
        return v


def test_twos_draws_by_weight_and_keeps_the_less_loaded_per_weight():
    from director.schedulers.twos import TwoChoicesScheduler

    a, b, c = servers(1, 2, 3)  # cumulative weights: a [0,1), b [1,3), c [3,6)
    a.active, b.active, c.active = 1, 1, 3  # overhead/weight: 256, 128, 256
    draws = Draws(0, 5, 2, 1, 4, 0, 3, 3, 1, 4)
    s = TwoChoicesScheduler(draws)
    s.update([a, b, c])
    got = [s.pick(BASE, VIP).id for _ in range(5)]
    # (a, c): tie 256*3 = 768 vs 768: the first draw stays -> a
    # (b, b): b; (c, a): tie -> c; (c, c): c; (b, c): 128 < 256 -> b
    assert got == [0, 1, 2, 2, 1]
    assert draws.stops == [6] * 10  # uniform over [0, total weight)
    c.active = 2  # c: 512/3 = 170.7 < a's 256
    s.rng = Draws(0, 3)
    assert s.pick(BASE, VIP) is c


def test_twos_draws_only_available_servers():
    from director.schedulers.twos import TwoChoicesScheduler

    a, b, c, d = servers(4, 1, 0, 2)
    a.up = False
    d.overloaded = True
    draws = Draws(0, 0)
    s = TwoChoicesScheduler(draws)
    s.update([a, b, c, d])
    assert s.pick(BASE, VIP) is b
    assert draws.stops == [1, 1]  # only b's weight is in the draw


def test_twos_default_source_is_private():
    state = random.getstate()
    s = make("twos", servers(1, 1, 1))
    picks = [s.pick(BASE, VIP) for _ in range(100)]
    assert random.getstate() == state  # the random module's shared state is untouched
    assert len({p.id for p in picks}) == 3
