"""Desired config -> running Director: matched by VIP and address, nothing changed on error."""

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from director import reconcile
from director.config import ConfigErrors, parse
from director.control import RequestError, mutate
from director.core import Action, Director
from director.drop_reasons import DropReason
from director.isakmp_state import State
from director.lab import craft
from director.metrics import Collector, Histogram
from director.packet import ip_to_int
from director.service import ConfigError

BASE = """
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
timeouts = { init = 10, established = 100 }
[[service.server]]
address = "198.51.100.1"
[[service.server]]
address = "198.51.100.2"
"""
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
    assert d.table.spi_r[s] == 0x55 and d.table.state[s] == State.INIT


@pytest.mark.parametrize("req, error", [
    ({"cmd": "add-service", "service": {"vip": "192.0.2.10"}}, "vip: service 192.0.2.10 exists"),
    ({"cmd": "add-service", "service": {"vip": "192.0.2.11", "scheduler": "nope"}}, "service.scheduler: must be one of"),
    ({"cmd": "add-service", "service": {"vip": "192.0.2.11", "method": "nat", "ah": True}}, "service.ah: AH cannot cross NAT"),
    ({"cmd": "add-service", "service": {"vip": "bad"}}, "vip: not an IPv4 address"),
    ({"cmd": "add-server", "vip": "192.0.2.10", "server": {"address": "198.51.100.1"}}, "address: real server 198.51.100.1 exists"),
    ({"cmd": "add-server", "vip": "192.0.2.10", "server": {"address": "198.51.100.9", "weight": 70000}}, "service.server[2].weight: must be 0..65535"),
    ({"cmd": "edit-server", "vip": "192.0.2.10", "address": "198.51.100.9", "changes": {"weight": 1}}, "address: no real server 198.51.100.9"),
    ({"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"vip": "192.0.2.1"}}, "changes.vip: not an editable"),
    ({"cmd": "del-service", "vip": "192.0.2.99"}, "vip: no service 192.0.2.99"),
    ({"cmd": "set-timeouts"}, "set-timeouts: give init"),
    ({"cmd": "frobnicate"}, "cmd: unknown command"),
])
def test_bad_requests_name_the_field(req, error):
    _, cfg = running()
    with pytest.raises(RequestError) as e:
        mutate(cfg, req)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_set_timeouts_and_restore_round_trip():
    _, cfg = running()
    new = mutate(cfg, {"cmd": "set-timeouts", "established": 500})
    assert (new.services[0].init_timeout, new.services[0].established_timeout) == (10.0, 500.0)
    from director.config import to_dict

    saved = to_dict(new)["service"]
    again = mutate(mutate(new, {"cmd": "clear"}), {"cmd": "restore", "services": saved})
    assert again == new
    with pytest.raises(RequestError, match="services: must be list"):
        mutate(cfg, {"cmd": "restore", "services": {}})


def test_config_errors_list_every_problem_at_once():
    with pytest.raises(ConfigErrors) as e:
        parse('[daemon]\nqueue = -1\n[[service]]\nvip = "x"\n[[service.server]]\nweight = 1\n')
    assert e.value.errors == [
        "daemon.queue: must be 0..65534, got -1",
        "service[0].vip: not an IPv4 address: 'x'",
        "service[0].server[0].address: missing",
    ]


def test_metrics_collector_reports_the_traffic():
    d, _ = running()
    rs = establish(d)
    for seq in range(3):
        d.decide(craft.esp(CLIENT, VIP, 9, seq), 1.0)
    d.decide(craft.esp(ip_to_int("203.0.113.99"), VIP, 9), 1.0)  # a stranger: icmp verdict
    router = ip_to_int("203.0.113.254")
    assert d.decide(craft.icmp_error(router, VIP, craft.esp(VIP, CLIENT, 9)), 1.0).action == Action.RELAY_ICMP
    d.decide(craft.icmp_error(router, VIP, craft.esp(VIP, ip_to_int("203.0.113.98"), 9)), 1.0)  # no conversation
    h = Histogram()
    h.observe(0.0001)
    fake = SimpleNamespace(director=d, latency={"client": h, "reply": Histogram()},
                           drop_counts=lambda: {r.value: d.drops[r] for r in DropReason},
                           stats={"icmp_sent": 1, "icmp_limited": 0, "icmp_suppressed": 0, "internal_errors": 0, "slow_iterations": 0})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(fake))
    text = generate_latest(reg).decode()
    rip = ["198.51.100.1", "198.51.100.2"][rs]
    assert 'director_packets_total{kind="esp",service="192.0.2.10",verdict="forward"} 3.0' in text
    assert 'director_packets_total{kind="esp",service="192.0.2.10",verdict="icmp_unreachable"} 1.0' in text
    assert f'director_real_server_packets_total{{direction="in",kind="esp",server="{rip}",service="192.0.2.10"}} 3.0' in text
    assert f'director_real_server_connections_total{{server="{rip}",service="192.0.2.10"}} 1.0' in text
    assert f'director_real_server_active_entries{{server="{rip}",service="192.0.2.10"}} 1.0' in text
    assert 'director_entries{state="established"} 1.0' in text
    assert 'director_drops_total{reason="no_entry"} 1.0' in text
    assert "director_icmp_errors_relayed_total 1.0" in text
    assert 'director_drops_total{reason="icmp_no_entry"} 1.0' in text
    assert 'director_nfqueue_handling_seconds_bucket{le="0.00025",queue="client"} 1.0' in text
    assert "203.0.113" not in text  # never a client address
