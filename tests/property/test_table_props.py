"""Hypothesis: after any sequence of table operations, the indexes agree with the entries."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from director.conntrack import NO_SLOT, Table, TableFull, TableListener
from director.isakmp_state import State, Timeouts

CLIENTS = st.sampled_from([1, 2, 3, 0xFFFFFFFF])
PORTS = st.sampled_from([500, 4500, 1024])
SPIS = st.integers(min_value=1, max_value=6)
SVCS = st.sampled_from([1, 2])


class Counts(TableListener):
    """Each real server's INIT and ESTABLISHED entries, kept from the table's events alone."""

    def __init__(self, t):
        self.t, self.counts = t, {}

    def _add(self, rs, state, d):
        self.counts[(rs, int(state))] = self.counts.get((rs, int(state)), 0) + d

    def created(self, s):
        self._add(self.t.rs_of(s), State.INIT, 1)

    def established(self, s):
        self._add(self.t.rs_of(s), State.INIT, -1)
        self._add(self.t.rs_of(s), State.ESTABLISHED, 1)

    def moved(self, s, old_rs, state):
        self._add(old_rs, state, -1)
        self._add(self.t.rs_of(s), state, 1)

    def removed(self, s, event, state):
        self._add(self.t.rs_of(s), state, -1)


class TableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.t = Table(8, wheel_size=16, seed=0)
        listener = Counts(self.t)
        self.t.listen(listener)
        self.counts = listener.counts
        for svc in (1, 2):
            self.t.set_timeouts(svc, Timeouts(init=3.0, established=20.0))
        self.t.set_soft_expiry(2, limit=1, grace=5.0)
        self.now = 0.0
        # model: key (svc, client, spi_i) -> state, port, rs
        self.model = {}

    def _slot(self, key):
        return self.t.lookup(*key)

    @rule(svc=SVCS, client=CLIENTS, port=PORTS, spi=SPIS, rs=st.integers(0, 3))
    def create(self, svc, client, port, spi, rs):
        key = (svc, client, spi)
        if key in self.model:
            return
        live_before = dict(self.model)
        try:
            self.t.create(svc, client, port, spi, rs, self.now)
        except TableFull:
            assert len(self.model) == 8 and all(v[0] == State.ESTABLISHED for v in self.model.values())
            return
        self.model[key] = [State.INIT, port, rs]
        # a reclaimed entry may have vanished: resync the model from the table's cookie index
        for k in live_before:
            if self._slot(k) == NO_SLOT:
                assert live_before[k][0] == State.INIT or self.t.stats["reclaimed_soft"]
                del self.model[k]

    def _pick(self, data):
        keys = sorted(self.model)
        return data.draw(st.sampled_from(keys)) if keys else None

    @precondition(lambda self: self.model)
    @rule(data=st.data(), spi_r=st.integers(1, 9))
    def establish(self, data, spi_r):
        key = self._pick(data)
        self.t.establish(self._slot(key), spi_r, self.now)
        self.model[key][0] = State.ESTABLISHED

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def touch(self, data):
        self.t.touch(self._slot(self._pick(data)), self.now)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), port=PORTS)
    def set_port(self, data, port):
        key = self._pick(data)
        self.t.set_port(self._slot(key), port)
        self.model[key][1] = port

    @precondition(lambda self: self.model)
    @rule(data=st.data(), rs=st.integers(0, 3))
    def move(self, data, rs):
        key = self._pick(data)
        self.t.move(self._slot(key), rs)
        self.model[key][2] = rs

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        key = self._pick(data)
        self.t.remove(self._slot(key))
        del self.model[key]

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 7.0, 30.0]))
    def advance(self, dt):
        self.now += dt
        self.t.expire(self.now)
        for k in list(self.model):
            if self._slot(k) == NO_SLOT:
                del self.model[k]

    @invariant()
    def indexes_agree_with_entries(self):
        t = self.t
        live = set(t.slots())
        assert len(live) == len(self.model) == len(t)
        for key, (state, port, rs) in self.model.items():
            s = self._slot(key)
            assert s in live
            assert (t.state[s], t.cport[s], t.rs[s]) == (state, port, rs)
            assert t.expires[s] >= self.now - 1.0  # nothing overdue by more than a tick
        # client and natt groups hold exactly the entries with that key
        for svc in (1, 2):
            for client in (1, 2, 3, 0xFFFFFFFF):
                expect = {self._slot(k) for k in self.model if k[:2] == (svc, client)}
                got, s = set(), t.client_head(svc, client)
                while s >= 0:
                    got.add(s)
                    s = t.g_next[s]
                assert got == expect
                # the group's cached ESTABLISHED entry (one-probe ESP lookup) is right
                est = {x for x in expect if t.state[x] == State.ESTABLISHED}
                e, saw_init = t.established_of_client(svc, client)
                assert (e in est) if est else (e == NO_SLOT and saw_init == bool(expect))
                for port in (500, 4500, 1024):
                    expect = {self._slot(k) for k, v in self.model.items() if k[:2] == (svc, client) and v[1] == port}
                    got, s = set(), t.natt_head(svc, client, port)
                    while s >= 0:
                        got.add(s)
                        s = t.p_next[s]
                    assert got == expect
                    est = {x for x in expect if t.state[x] == State.ESTABLISHED}
                    e, saw_init = t.established_of_natt(svc, client, port)
                    assert (e in est) if est else (e == NO_SLOT and saw_init == bool(expect))
        n_init = sum(1 for v in self.model.values() if v[0] == State.INIT)
        assert (t.n_init, t.n_established) == (n_init, len(self.model) - n_init)
        assert t._list_len[0] == n_init
        assert t._by_cookie.size == len(self.model)
        # the real servers' counters equal what the entries say
        for (rs, state), n in self.counts.items():
            assert n == sum(1 for v in self.model.values() if v[2] == rs and v[0] == state)
        # every live entry sits in exactly one timer wheel bucket
        filed = []
        for b in range(len(t._wheel)):
            s = t._wheel[b]
            while s >= 0:
                filed.append(s)
                s = t.t_next[s]
        assert sorted(filed) == sorted(live)


TestTable = TableMachine.TestCase
TestTable.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
