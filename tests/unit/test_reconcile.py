"""Desired config -> running Director: matched by VIP and address, nothing changed on error."""

import pytest

from director import reconcile
from director.config import parse
from director.control import mutate
from director.core import Action, Director
from director.drop_reasons import DropReason
from director.isakmp_state import State
from director.lab import craft
from director.packet import ip_to_int
from director.service import ConfigError
from tests.configs import TWO_SERVERS

BASE = TWO_SERVERS
VIP = ip_to_int("192.0.2.10")
CLIENT = ip_to_int("203.0.113.5")


def running(text=BASE):
    d = Director(capacity=256)
    cfg = parse(text)
    reconcile.reconcile(d, cfg)
    return d, cfg


def establish(d, client=CLIENT, spi=77):
    d.decide(craft.ike(client, VIP, spi), 0.0)
    v = d.decide(craft.ike(client, VIP, spi, 99), 0.1)
    assert v.action == Action.FORWARD
    return v.rs


def test_start_from_nothing_builds_services_and_servers():
    d, _ = running()
    (svc,) = d.services.values()
    assert svc.vip == VIP and svc.scheduler_name == "rr" and len(svc.servers) == 2
    assert reconcile.kernel_state(d) == reconcile.KernelState(
        ("192.0.2.10",), (), ((0, "198.51.100.1"), (1, "198.51.100.2")))


def test_changes_keep_ids_entries_and_counters_of_unchanged_parts():
    d, cfg = running()
    rs = establish(d)
    svc_id = next(iter(d.services))
    new = mutate(cfg, {"cmd": "edit-server", "vip": "192.0.2.10", "address": "198.51.100.1", "changes": {"weight": 5}})
    new = mutate(new, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"scheduler": "wlc", "timeouts": {"init": 3}}})
    new = mutate(new, {"cmd": "add-server", "vip": "192.0.2.10", "server": {"address": "198.51.100.3"}})
    plan = reconcile.reconcile(d, new)
    assert plan.summary() == "change=1"
    svc = d.services[svc_id]
    assert svc.scheduler_name == "wlc" and svc.timeouts.init == 3 and svc.timeouts.established == 100
    assert {r.id for r in svc.servers.values()} == {0, 1, 2}
    assert svc.servers[0].weight == 5
    assert d.decide(craft.esp(CLIENT, VIP, 1), 1.0).rs == rs  # the established client never noticed
    assert d.rs_counters[rs][0] or sum(d.rs_counters[rs]) > 0


def test_a_failing_plan_changes_nothing():
    d, cfg = running()
    establish(d)
    before = (list(d.table.entries()), {i: (s.scheduler_name, len(s.servers)) for i, s in d.services.items()})
    # the first service becomes invalid (8 is not prime), a second one would be new: neither happens
    bad = parse(BASE.replace('scheduler = "rr"', 'scheduler = "mh"\nscheduler_options = { table_size = 8 }')
                + '[[service]]\nvip = "192.0.2.11"\n')
    with pytest.raises(ConfigError, match=r"service\[0\]\.scheduler: .*prime"):
        reconcile.reconcile(d, bad)
    after = (list(d.table.entries()), {i: (s.scheduler_name, len(s.servers)) for i, s in d.services.items()})
    assert after == before and len(d.services) == 1


def test_removed_server_clients_reschedule_and_removed_service_takes_its_entries():
    d, cfg = running()
    rs = establish(d)
    gone = "198.51.100.1" if rs == 0 else "198.51.100.2"
    reconcile.reconcile(d, mutate(cfg, {"cmd": "del-server", "vip": "192.0.2.10", "address": gone}))
    assert d.decide(craft.esp(CLIENT, VIP, 1), 1.0).reason == DropReason.REAL_SERVER_GONE
    v = d.decide(craft.ike(CLIENT, VIP, 1234), 2.0)
    assert v.action == Action.FORWARD and v.rs != rs and d.stats["rescheduled_dead"] == 1
    reconcile.reconcile(d, mutate(cfg, {"cmd": "clear"}))
    assert d.services == {} and len(d.table) == 0


def test_method_change_to_nat_reindexes_replies():
    d, cfg = running()
    new = mutate(cfg, {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"method": "nat", "ah": False}})
    reconcile.reconcile(d, new)
    assert reconcile.kernel_state(d).nat_servers == ("198.51.100.1", "198.51.100.2")
    v = d.decide(craft.ike(CLIENT, VIP, 5), 0.0)
    reply = craft.ike(ip_to_int(["198.51.100.1", "198.51.100.2"][v.rs]), CLIENT, 5, 0x55)
    r = d.decide_reply(reply, 0.1)
    assert (r.action, r.reply, r.addr) == (Action.FORWARD, True, VIP)
    s = d.table.lookup(next(iter(d.services)), CLIENT, 5)
    assert d.table.view(s).spi_r == 0x55 and d.table.view(s).state == State.INIT
