"""Route health injection: the pure decision of which VIPs a director announces."""

from __future__ import annotations

import pytest

from director.announce import DirectorState, ServiceState, Withdrawn, decide

UP = DirectorState(dataplane_up=True)
A, B = "198.18.10.100", "198.18.10.101"


def test_healthy_services_are_announced():
    got = decide(UP, [ServiceState(A, 3), ServiceState(B, 1)])
    assert got.announce == {A, B}
    assert got.withdrawn == {}


def test_a_vip_with_no_healthy_server_is_withdrawn_and_the_others_stay():
    got = decide(UP, [ServiceState(A, 0), ServiceState(B, 2)])
    assert got.announce == {B}
    assert got.withdrawn == {A: Withdrawn.NO_HEALTHY_SERVER}


def test_a_vip_is_served_while_any_of_its_services_has_a_healthy_server():
    got = decide(UP, [ServiceState(A, 0), ServiceState(A, 1)])
    assert got.announce == {A}


def test_draining_one_service_withdraws_its_whole_vip_only():
    got = decide(UP, [ServiceState(A, 2, drained=True), ServiceState(A, 2), ServiceState(B, 2)])
    assert got.announce == {B}
    assert got.withdrawn == {A: Withdrawn.SERVICE_DRAINED}


@pytest.mark.parametrize(
    "director, reason",
    [
        (DirectorState(dataplane_up=True, shutting_down=True), Withdrawn.SHUTDOWN),
        (DirectorState(dataplane_up=False), Withdrawn.DATAPLANE_DOWN),
        (DirectorState(dataplane_up=True, drained=True), Withdrawn.DIRECTOR_DRAINED),
        # shutdown outranks everything, a dead dataplane outranks a drain
        (DirectorState(dataplane_up=False, drained=True, shutting_down=True), Withdrawn.SHUTDOWN),
        (DirectorState(dataplane_up=False, drained=True), Withdrawn.DATAPLANE_DOWN),
        # a joining director with shared state waits for its peers' snapshot (after the dataplane)
        (DirectorState(dataplane_up=True, table_synced=False), Withdrawn.TABLE_SYNCING),
        (DirectorState(dataplane_up=True, drained=True, table_synced=False), Withdrawn.TABLE_SYNCING),
        (DirectorState(dataplane_up=False, table_synced=False), Withdrawn.DATAPLANE_DOWN),
    ],
)
def test_director_wide_conditions_withdraw_every_vip(director, reason):
    got = decide(director, [ServiceState(A, 3), ServiceState(B, 0, drained=True)])
    assert got.announce == frozenset()
    assert got.withdrawn == {A: reason, B: reason}
    assert got.known == {A, B}


def test_no_services_announce_nothing():
    got = decide(UP, [])
    assert got.announce == frozenset() and got.withdrawn == {}


def test_negative_server_count_is_refused():
    with pytest.raises(ValueError, match="healthy_servers"):
        ServiceState(A, -1)
