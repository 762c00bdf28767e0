"""The table alone: indexes, transitions, expiry, soft expiry, drop-entry, counters."""

import pytest

from director.conntrack import NO_SLOT, Table, TableFull, TableListener, _Index
from director.isakmp_state import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    Timeouts,
    transition,
)

SVC = 1
C1, C2, C3 = 0x0A000001, 0x0A000002, 0x0A000003


class Hooks(TableListener):
    """The table's events as callbacks: on_count(rs, state, +1/-1) as the director keeps its real
    servers' counts, on_change(event, slot) for establish and removal, on_port(slot, old port),
    on_create(slot), activity(slot)."""

    def __init__(self, t, on_count=None, on_change=None, on_port=None, on_create=None, activity=None):
        self.t, self.on_count, self.on_change, self.on_port = t, on_count, on_change, on_port
        self.on_create, self.seen = on_create, activity

    def _count(self, rs, state, delta):
        if self.on_count:
            self.on_count(rs, state, delta)

    def created(self, s):
        self._count(self.t.rs_of(s), State.INIT, 1)
        if self.on_create:
            self.on_create(s)

    def established(self, s):
        if self.on_change:
            self.on_change(Event.RESPONDER_SEEN, s)
        self._count(self.t.rs_of(s), State.INIT, -1)
        self._count(self.t.rs_of(s), State.ESTABLISHED, 1)

    def changed(self, s, old_port):
        if self.on_port:
            self.on_port(s, old_port)

    def moved(self, s, old_rs, state):
        self._count(old_rs, state, -1)
        self._count(self.t.rs_of(s), state, 1)

    def removed(self, s, event, state):
        if self.on_change:
            self.on_change(event, s)
        self._count(self.t.rs_of(s), state, -1)

    def activity(self, s):
        return self.seen(s) if self.seen else None


def make(capacity=16, *, on_count=None, on_change=None, on_port=None, on_create=None, activity=None, **kw):
    hooks = dict(on_count=on_count, on_change=on_change, on_port=on_port, on_create=on_create, activity=activity)
    hooks = {k: v for k, v in hooks.items() if v is not None}
    t = Table(capacity, **kw)
    t.set_timeouts(SVC, Timeouts(init=10.0, established=100.0))
    if hooks:
        t.listen(Hooks(t, **hooks))
    return t


def test_transition_table_is_enforced():
    assert transition(State.FREE, Event.INITIAL) == State.INIT
    assert transition(State.INIT, Event.RESPONDER_SEEN) == State.ESTABLISHED
    assert transition(State.ESTABLISHED, Event.INITIAL) == State.ESTABLISHED  # no downgrade
    with pytest.raises(IllegalTransition):
        transition(State.FREE, Event.RESPONDER_SEEN)
    with pytest.raises(IllegalTransition):
        transition(State.FREE, Event.EXPIRE)
    # every state but FREE can leave by expiry or removal
    for st in (State.INIT, State.ESTABLISHED):
        assert TRANSITIONS[(st, Event.EXPIRE)] == State.FREE
        assert TRANSITIONS[(st, Event.REMOVE)] == State.FREE


def test_timeouts_validate():
    with pytest.raises(ValueError, match="timeouts.init"):
        Timeouts(init=0)
    with pytest.raises(ValueError, match="timeouts.established"):
        Timeouts(established=-1)


def test_create_lookup_and_indexes():
    t = make()
    a = t.create(SVC, C1, 500, 0x1111, rs=3, now=0.0)
    b = t.create(SVC, C1, 4500, 0x2222, rs=3, now=1.0)
    assert t.lookup(SVC, C1, 0x1111) == a
    assert t.lookup(SVC, C1, 0x2222) == b
    assert t.lookup(SVC, C2, 0x1111) == NO_SLOT
    assert t.lookup(SVC + 1, C1, 0x1111) == NO_SLOT  # services are separate
    assert t.client_head(SVC, C1) == b  # newest first
    assert t.natt_head(SVC, C1, 500) == a
    assert t.natt_head(SVC, C1, 4500) == b
    assert t.state[a] == State.INIT and t.n_init == 2 and len(t) == 2
    with pytest.raises(ValueError):
        t.create(SVC, C1, 500, 0x1111, rs=3, now=0.0)


def test_establish_moves_counts_and_is_found_for_esp():
    counts = []
    t = make(on_count=lambda rs, st, d: counts.append((rs, int(st), d)))
    a = t.create(SVC, C1, 500, 0x1111, rs=3, now=0.0)
    assert t.established_of_client(SVC, C1) == (NO_SLOT, True)
    assert t.establish(a, 0xBEEF, now=1.0) is True
    assert t.establish(a, 0xBEEF, now=2.0) is False  # already established: a refresh
    assert t.state[a] == State.ESTABLISHED and t.spi_r[a] == 0xBEEF
    assert t.established_of_client(SVC, C1) == (a, False)
    assert t.established_of_natt(SVC, C1, 500) == (a, False)
    assert counts == [(3, 1, 1), (3, 1, -1), (3, 2, 1)]
    assert (t.n_init, t.n_established) == (0, 1)


def test_init_expires_after_its_short_timeout_established_lives_on():
    t = make()
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    b = t.create(SVC, C2, 500, 2, rs=0, now=0.0)
    t.establish(b, 9, now=0.0)
    assert t.expire(9.0) == 0
    assert t.lookup(SVC, C1, 1) == a
    assert t.expire(12.0) == 1  # INIT gone within one tick past 10 s
    assert t.lookup(SVC, C1, 1) == NO_SLOT
    assert t.client_head(SVC, C1) == NO_SLOT and t.natt_head(SVC, C1, 500) == NO_SLOT
    assert t.lookup(SVC, C2, 2) == b
    assert t.expire(99.0) == 0
    assert t.expire(102.0) == 1
    assert len(t) == 0 and t.stats["expired_init"] == 1 and t.stats["expired_established"] == 1


def test_refresh_postpones_expiry_lazily():
    t = make()
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(a, 9, now=0.0)
    for now in range(10, 400, 50):
        t.touch(a, float(now))
        assert t.expire(float(now)) == 0
    assert t.lookup(SVC, C1, 1) == a
    assert t.expire(360.0 + 100.0 + 2.0) == 1


def test_shortened_timeout_applies_on_next_refresh():
    t = make()
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(a, 9, now=0.0)  # deadline 100
    t.set_timeouts(SVC, Timeouts(init=10.0, established=5.0))
    assert t.expire(6.0) == 0  # the old deadline stands until the entry is refreshed
    t.touch(a, 6.0)  # new deadline 11: refiled earlier
    assert t.expire(13.0) == 1


def test_expiry_cost_is_what_expires_not_the_table():
    t = make(capacity=2000)
    long_lived = [t.create(SVC, i, 500, i + 1, rs=0, now=0.0) for i in range(1, 1001)]
    for s in long_lived:
        t.establish(s, 7, now=0.0)
    for i in range(1001, 1011):
        t.create(SVC, i, 500, i + 1, rs=0, now=0.0)
    visited = []
    orig = t._expire_one
    t._expire_one = lambda s, now: (visited.append(s), orig(s, now))[1]
    assert t.expire(12.0) == 10
    assert len(visited) == 10  # the 1000 established entries were never looked at


def test_wheel_wraps_for_deadlines_beyond_one_revolution():
    t = Table(4, wheel_size=8, tick=1.0)
    t.set_timeouts(SVC, Timeouts(init=5.0, established=50.0))
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(a, 2, now=0.0)
    for now in range(1, 50):
        assert t.expire(float(now)) == 0, now
    assert t.expire(52.0) == 1


def test_retransmit_counts_identical_repeats_only():
    t = make()
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0, ike_len=300)
    assert t.retransmit(a, 1.0, 300) == 1
    assert t.retransmit(a, 2.0, 300) == 2
    assert t.retransmit(a, 3.0, 340) == 0  # COOKIE retry: longer message, the server answered
    assert t.state[a] == State.INIT
    assert t.retransmit(a, 4.0, 340) == 1


def test_nat_t_float_moves_the_natt_index():
    t = make()
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.set_port(a, 4500)
    assert t.natt_head(SVC, C1, 500) == NO_SLOT
    assert t.natt_head(SVC, C1, 4500) == a
    assert t.lookup(SVC, C1, 1) == a and t.rs[a] == 0


@pytest.mark.parametrize("seed", range(5))
def test_full_table_reclaims_an_init_entry_never_established(seed):
    t = make(capacity=3, seed=seed)
    e1 = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(e1, 5, now=0.0)
    i1 = t.create(SVC, C2, 500, 2, rs=0, now=1.0)
    i2 = t.create(SVC, C3, 500, 3, rs=0, now=2.0)
    n = t.create(SVC, 99, 500, 4, rs=0, now=3.0)  # full: one INIT entry (random sample) goes
    assert n in (i1, i2) and t.lookup(SVC, C1, 1) == e1 and t.lookup(SVC, 99, 4) == n
    survivor = i2 if n == i1 else i1
    assert t.stats["reclaimed_init"] == 1 and t.state[survivor] == State.INIT
    for s in (survivor, n):
        t.establish(s, 6, now=4.0)
    with pytest.raises(TableFull):
        t.create(SVC, 100, 500, 5, rs=0, now=5.0)
    assert t.stats["refused_full"] == 1 and t.n_established == 3


def test_pressure_reclaims_init_before_the_table_is_full():
    t = make(capacity=10, pressure=0.5, seed=1)
    est = []
    for i in range(3):
        s = t.create(SVC, 100 + i, 500, i + 1, rs=0, now=0.0)
        t.establish(s, 9, now=0.0)
        est.append(s)
    for i in range(40):  # an INIT flood: the table never grows past the pressure line
        t.create(SVC, 1000 + i, 500, 50 + i, rs=0, now=1.0)
        assert len(t) <= 5
    assert all(t.state[s] == State.ESTABLISHED for s in est)
    assert t.stats["reclaimed_init"] == 38 and t.stats["refused_full"] == 0


def test_soft_expiry_keeps_a_counted_number_and_reclaims_them_first():
    t = make(capacity=3)
    t.set_soft_expiry(SVC, limit=1, grace=50.0)
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    b = t.create(SVC, C2, 500, 2, rs=0, now=0.0)
    t.establish(a, 5, now=0.0)
    t.establish(b, 5, now=0.0)
    assert t.expire(102.0) == 1  # one kept soft, one reclaimed
    assert t.soft_count(SVC) == 1 and t.stats["soft_kept"] == 1
    kept = a if t.state[a] == State.ESTABLISHED else b
    assert t.view(kept).soft
    t.touch(kept, 103.0)  # traffic revives it
    assert t.soft_count(SVC) == 0 and not t.view(kept).soft and t.stats["soft_revived"] == 1
    assert t.expire(205.0) == 0  # past 103 + 100: soft again (quota free again)
    assert t.soft_count(SVC) == 1
    x = t.create(SVC, 50, 500, 7, rs=0, now=205.0)
    y = t.create(SVC, 51, 500, 8, rs=0, now=205.0)
    t.establish(x, 1, now=205.0)
    t.establish(y, 1, now=205.0)
    z = t.create(SVC, 52, 500, 9, rs=0, now=206.0)  # full: the soft entry is reclaimed
    assert z == kept and t.stats["reclaimed_soft"] == 1


def test_remove_and_move_keep_counts():
    counts = {}

    def on_count(rs, st, d):
        counts[(rs, int(st))] = counts.get((rs, int(st)), 0) + d

    t = make(on_count=on_count)
    a = t.create(SVC, C1, 500, 1, rs=1, now=0.0)
    b = t.create(SVC, C2, 500, 2, rs=1, now=0.0)
    t.establish(b, 3, now=0.0)
    t.move(a, 2)
    assert counts == {(1, 1): 0, (2, 1): 1, (1, 2): 1}
    t.remove(b)
    t.remove(a)
    assert all(v == 0 for v in counts.values())
    assert len(t) == 0 and t.n_init == 0 and t.n_established == 0


def test_on_change_sees_establish_and_expiry():
    events = []
    t = make(on_change=lambda ev, s: events.append((ev, s)))
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(a, 2, now=0.0)
    t.expire(200.0)
    assert events == [(Event.RESPONDER_SEEN, a), (Event.EXPIRE, a)]


def test_index_backward_shift_keeps_every_key_findable():
    idx = _Index(64, 4)
    keys = [i.to_bytes(4, "big") for i in range(60)]
    for i, k in enumerate(keys):
        idx.insert(k, i)
    for i in range(0, 60, 3):
        idx.delete_at(idx.find(keys[i]))
    for i, k in enumerate(keys):
        assert idx.get(k) == (-1 if i % 3 == 0 else i)
    assert idx.size == 40


def test_bad_construction_names_the_field():
    with pytest.raises(ValueError, match="capacity"):
        Table(0)
    with pytest.raises(ValueError, match="wheel_size"):
        Table(4, wheel_size=6)


def test_activity_seen_elsewhere_keeps_an_established_entry():
    seen = {}
    t = make(activity=lambda s: seen.get(s))
    a = t.create(SVC, C1, 4500, 1, rs=0, now=0.0)
    b = t.create(SVC, C2, 4500, 2, rs=0, now=0.0)
    t.establish(a, 5, now=0.0)
    t.establish(b, 5, now=0.0)
    seen[a] = 90.0  # the fast path forwarded a's ESP at t=90, the table never saw it
    assert t.expire(102.0) == 1  # only b goes
    assert t.lookup(SVC, C1, 1) == a and t.stats["refreshed_elsewhere"] == 1
    assert t.expire(189.0) == 0
    assert t.expire(192.0) == 1  # 90 + 100: no newer activity, it expires


def test_listeners_are_called_in_order_and_the_newest_activity_counts():
    calls = []

    class L(TableListener):
        def __init__(self, name, seen):
            self.name, self.seen = name, seen

        def created(self, s):
            calls.append((self.name, "created", s))

        def removed(self, s, event, state):
            calls.append((self.name, "removed", s, event, state))

        def activity(self, s):
            return self.seen

    t = make()
    first, second = L("first", 30.0), L("second", 90.0)
    t.listen(first)
    t.listen(second)
    t.listen(first)  # already there: not twice
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.establish(a, 5, now=0.0)  # the base class ignores what a listener does not override
    assert t.expire(150.0) == 0 and t.expires[a] == 190.0  # 90 (the newest) + 100
    t.unlisten(second)
    assert t.expire(200.0) == 1  # 30 + 100 is past: it goes
    assert calls == [("first", "created", a), ("second", "created", a), ("first", "removed", a, Event.EXPIRE, State.ESTABLISHED)]


def test_port_change_is_reported_with_the_old_port():
    moves = []
    t = make(on_port=lambda s, old: moves.append((s, old, t.port_of(s))))
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    t.set_port(a, 4500)
    t.set_port(a, 4500)  # no change, no report
    assert moves == [(a, 500, 4500)]


def test_on_create_and_refresh_all_for_failover():
    created = []
    t = make(on_create=created.append)
    a = t.create(SVC, C1, 500, 1, rs=0, now=0.0)
    b = t.create(SVC, C2, 500, 2, rs=0, now=0.0)
    t.establish(b, 3, now=0.0)
    assert created == [a, b]
    assert t.refresh_all(95.0) == 2  # a takeover restarts every idle timer from now
    assert t.expire(104.0) == 0  # a (INIT, 10 s) and b (100 s) would both be gone by now
    assert t.expire(106.0) == 1 and t.lookup(SVC, C2, 2) == b


def test_a_newer_conversation_of_the_endpoint_supersedes_the_older_on_its_server():
    """An IKE SA rekey (new SPIs, same client endpoint, same server): the old conversation's DELETE
    is encrypted, so the old entry would count as active until its idle timeout. Established
    timeout 100 s, INIT 10 s: the old one now has 10 s, unless an IKE packet of its own comes."""
    counts = {}

    def count(rs, state, delta):
        counts[(rs, state)] = counts.get((rs, state), 0) + delta

    seen = {}
    t = make(on_count=count, activity=lambda s: seen.get(s))
    old = t.create(SVC, C1, 4500, 0x1111, rs=3, now=0.0)
    t.establish(old, 0xAAAA, now=0.0)
    other_rs = t.create(SVC, C1, 4500, 0x2222, rs=4, now=0.0)  # same endpoint, other server
    t.establish(other_rs, 0xBBBB, now=0.0)
    other_port = t.create(SVC, C1, 500, 0x3333, rs=3, now=0.0)  # other endpoint (port)
    t.establish(other_port, 0xCCCC, now=0.0)
    new = t.create(SVC, C1, 4500, 0x4444, rs=3, now=50.0)
    t.establish(new, 0xDDDD, now=50.0)
    assert t.stats["superseded"] == 1
    assert t.expires[old] == 60.0 and t.expires[other_rs] == 100.0 and t.expires[other_port] == 100.0
    seen[old] = 55.0  # the client's ESP seen by the fast path does not keep the superseded one
    assert t.expire(62.0) == 1
    assert t.lookup(SVC, C1, 0x1111) == NO_SLOT and t.stats["expired_established"] == 1
    assert counts[(3, State.ESTABLISHED)] == 2  # other_port and new: no phantom left
    assert {t.lookup(SVC, C1, spi) for spi in (0x2222, 0x3333, 0x4444)} == {other_rs, other_port, new}


def test_a_superseded_conversation_lives_on_its_own_traffic_in_init_timeouts():
    t = make()
    old = t.create(SVC, C1, 4500, 0x1111, rs=3, now=0.0)
    t.establish(old, 0xAAAA, now=0.0)
    new = t.create(SVC, C1, 4500, 0x2222, rs=3, now=5.0)
    t.establish(new, 0xBBBB, now=5.0)
    assert t.expires[old] == 15.0
    t.establish(old, 0xAAAA, now=12.0)  # an IKE message of the old SA (its DELETE, or DPD)
    assert t.expires[old] == 22.0  # the INIT timeout again, not the established one
    t.touch(old, now=20.0)
    assert t.expire(25.0) == 0 and len(t) == 2  # kept while its own traffic keeps coming
    assert t.expire(31.0) == 1 and t.lookup(SVC, C1, 0x1111) == NO_SLOT
    assert t.lookup(SVC, C1, 0x2222) == new


def test_an_ikev1_phase1_behind_nat_supersedes_when_it_floats_to_the_old_ones_port():
    """Established on the NAT's mapping of port 500, the new phase 1 floats to the 4500 mapping,
    where the phase 1 it replaces lives: the float supersedes it (a mirrored port change, no
    ``now``, does not)."""
    t = make()
    old = t.create(SVC, C1, 40500, 0x1111, rs=3, now=0.0)
    t.establish(old, 0xAAAA, now=0.0)
    new = t.create(SVC, C1, 40001, 0x2222, rs=3, now=50.0)
    t.establish(new, 0xBBBB, now=50.0)
    assert t.stats["superseded"] == 0  # other endpoint so far
    t.set_port(new, 40500)
    assert t.stats["superseded"] == 0
    t.set_port(new, 40001)
    t.set_port(new, 40500, now=51.0)
    assert t.stats["superseded"] == 1 and t.expires[old] == 61.0


def test_both_families_in_one_table_never_meet():
    """An IPv6 client whose low 32 bits are an IPv4 client's address, and one whose high half is
    that address: three clients, three conversations, three groups."""
    t = Table(64)
    v6_low = 0x20010DB8 << 96 | C1
    v6_high = C1 << 64 | 0x20010DB8
    slots = [t.create(SVC, c, 500, 0x77, 1, 0.0) for c in (C1, v6_low, v6_high)]
    assert len(set(slots)) == 3
    for c, s in zip((C1, v6_low, v6_high), slots):
        assert t.lookup(SVC, c, 0x77) == s and t.client_head(SVC, c) == s and t.natt_head(SVC, c, 500) == s
        assert t.view(s).client == c and t.conversation(s) == (SVC, c, 0x77)
        t.establish(s, 0x99, 1.0)
        assert t.established_of_client(SVC, c) == (s, False)
    t.remove(slots[1])
    assert t.lookup(SVC, v6_low, 0x77) == NO_SLOT
    assert t.lookup(SVC, C1, 0x77) == slots[0] and t.lookup(SVC, v6_high, 0x77) == slots[2]
