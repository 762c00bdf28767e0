"""RouteInjector: decides, applies only changes, survives a refusing speaker and retries."""

from __future__ import annotations

from director.announce import DirectorState, ServiceState, Withdrawn
from director.dataplane.bgp import BirdError
from director.route_injection import RouteInjector, VipStatus

A, B = "198.18.10.100", "198.18.10.101"
UP = DirectorState(dataplane_up=True)


class FakeSpeaker:
    """Records plans and applies; refuses while ``refuse`` is set (like a BIRD that says 8002)."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.applies: list[tuple[frozenset, frozenset]] = []
        self.refuse = False

    def plan(self, announce, known):
        assert announce <= known
        return frozenset(announce), frozenset(known)

    def apply(self, plan):
        if self.refuse:
            raise BirdError("bird: configure -> 8002 syntax error")
        self.applies.append(plan)
        self.running = set(plan[0])

    def sessions(self):
        if self.refuse:
            raise BirdError("bird: cannot connect")
        return {"uplink": "Established"}


def test_applies_the_decision_once_and_only_on_change():
    sp = FakeSpeaker()
    inj = RouteInjector(sp)
    inj.update(UP, [ServiceState(A, 2), ServiceState(B, 0)])
    inj.update(UP, [ServiceState(A, 3), ServiceState(B, 0)])  # same outcome: nothing sent
    assert sp.applies == [(frozenset({A}), frozenset({A, B}))]
    inj.update(UP, [ServiceState(A, 3), ServiceState(B, 1)])
    assert sp.running == {A, B} and len(sp.applies) == 2
    assert inj.status() == [VipStatus(A, True, True, None), VipStatus(B, True, True, None)]


def test_a_refusing_speaker_keeps_the_previous_state_and_the_next_update_retries():
    sp = FakeSpeaker()
    inj = RouteInjector(sp)
    inj.update(UP, [ServiceState(A, 1)])
    sp.refuse = True
    decision = inj.update(DirectorState(dataplane_up=True, drained=True), [ServiceState(A, 1)])
    assert decision.withdrawn == {A: Withdrawn.DIRECTOR_DRAINED}
    assert sp.running == {A}  # still announced: the speaker refused
    assert inj.error == "bird: configure -> 8002 syntax error"
    assert inj.status() == [VipStatus(A, False, True, Withdrawn.DIRECTOR_DRAINED)]
    assert inj.sessions() == {}
    sp.refuse = False
    inj.update(DirectorState(dataplane_up=True, drained=True), [ServiceState(A, 1)])  # same decision: retried
    assert sp.running == set() and inj.error is None
    assert inj.status() == [VipStatus(A, False, False, Withdrawn.DIRECTOR_DRAINED)]
    assert inj.sessions() == {"uplink": "Established"}


def test_a_removed_service_is_still_shown_until_applied():
    sp = FakeSpeaker()
    inj = RouteInjector(sp)
    inj.update(UP, [ServiceState(A, 1), ServiceState(B, 1)])
    sp.refuse = True
    inj.update(UP, [ServiceState(A, 1)])
    assert [s.vip for s in inj.status()] == [A, B]  # B still runs in the speaker
    sp.refuse = False
    inj.update(UP, [ServiceState(A, 1)])
    assert [s.vip for s in inj.status()] == [A] and sp.running == {A}


def test_a_speaker_found_running_something_else_is_re_applied_by_the_next_update():
    """BIRD restarted from another include, or an operator's `birdc disable`: the speaker's
    reading reports drift, and the next update applies the decision again (once)."""
    sp = FakeSpeaker()
    sp.drift = set()
    forgotten = []
    sp.forget = lambda: forgotten.append(True)
    inj = RouteInjector(sp)
    inj.update(UP, [ServiceState(A, 1)])
    inj.sessions()
    inj.update(UP, [ServiceState(A, 1)])
    assert len(sp.applies) == 1 and inj.drifts == 0  # no drift: nothing re-sent
    sp.running, sp.drift = set(), {A}  # someone disabled A behind the director's back
    inj.sessions()
    assert forgotten == [True] and inj.drifts == 1
    inj.update(UP, [ServiceState(A, 1)])
    assert sp.running == {A} and len(sp.applies) == 2
    sp.drift = set()
    inj.sessions()
    inj.update(UP, [ServiceState(A, 1)])
    assert len(sp.applies) == 2
