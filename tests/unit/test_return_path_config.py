"""``return_path`` in the config (taken, checked, reconciled, round-tripped, in the kernel state) and
the reply queue's sender map (director.dataplane.return_path.Senders) with a fake neighbour table."""

import pytest

from director import reconcile
from director.config import ConfigErrors, parse, service_to_dict
from director.conntrack import NO_RS
from director.dataplane.return_path import Senders, mac_bytes, return_servers
from director.packet import ip_to_int

SERVICE = """
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
method = "dr"
ah = false{extra}
[[service.server]]
address = "198.51.100.1"
[[service.server]]
address = "198.51.100.2"
method = "nat"
[[service.server]]
address = "198.51.100.3"
method = "tun"
"""


def cfg(extra=""):
    return parse(SERVICE.format(extra=extra))


def test_return_path_is_taken_reconciled_and_round_trips():
    c = cfg('\nreturn_path = "director"')
    assert c.services[0].return_path == "director"
    assert service_to_dict(c.services[0])["return_path"] == "director"
    assert "return_path" not in service_to_dict(cfg().services[0])  # the default stays implicit
    d = reconcile.validate(c)
    svc = next(iter(d.services.values()))
    assert svc.return_path == "director"
    assert reconcile.kernel_state(d).return_vips == ("192.0.2.10",)
    assert reconcile.kernel_state(reconcile.validate(cfg())).return_vips == ()
    # DR and TUN servers are judged by their MAC; the NAT server's replies have their own path
    assert sorted(return_servers(d)) == [ip_to_int("198.51.100.1"), ip_to_int("198.51.100.3")]
    p = reconcile.plan(d, cfg())
    assert [ch.fields for ch in p.change] == [{"return_path": "direct"}]


@pytest.mark.parametrize("extra, error", [
    ('\nreturn_path = "router"', "service[0].return_path: must be one of direct, director, got 'router'"),
    ("\nreturn_path = true", "service[0].return_path: must be a non-empty string, got True"),
])
def test_bad_return_path_is_named(extra, error):
    with pytest.raises(ConfigErrors) as e:
        cfg(extra)
    assert e.value.errors == [error]


def test_a_nat_service_cannot_ask_for_the_direct_return_path():
    text = SERVICE.format(extra='\nreturn_path = "direct"').replace('method = "dr"', 'method = "nat"')
    with pytest.raises(ConfigErrors) as e:
        parse(text.replace('method = "tun"\n', ""))
    assert [x.split(":")[0] for x in e.value.errors] == ["service[0].return_path"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


RS1, RS2 = ip_to_int("198.51.100.1"), ip_to_int("198.51.100.3")
M1, M2, M3 = mac_bytes("02:00:00:00:00:01"), mac_bytes("02:00:00:00:00:02"), mac_bytes("02:00:00:00:00:03")


def test_senders_learn_each_server_at_its_first_reply_and_refuse_others():
    neigh = {}
    reads = []

    def neighbours():
        reads.append(1)
        return dict(neigh)

    clock = Clock()
    changes = []
    s = Senders(neighbours, clock)
    s.on_change = changes.append
    s.set_servers({RS1: 0, RS2: 2})
    assert s.sender(M1) == NO_RS  # not resolved yet
    neigh.update({RS1: M1, RS2: M2})
    clock.t = 0.001  # two servers answering for the first time within a millisecond: both found
    assert s.sender(M1) == NO_RS  # M1 was just looked for: not again before `retry`
    assert s.sender(M2) == 2 and s.sender(M1) == 0
    assert changes[-1] == {M1: 0, M2: 2}
    n = len(reads)
    assert s.sender(M3) == NO_RS and len(reads) == n + 1  # an unknown MAC: one look
    assert s.sender(M3) == NO_RS and len(reads) == n + 1  # ... and not again within `retry`
    clock.t = 2.0
    neigh[ip_to_int("198.51.100.9")] = M3  # a host that is no return-path server
    assert s.sender(M3) == NO_RS and len(reads) == n + 2


def test_senders_flood_of_made_up_macs_reads_the_table_at_a_bounded_rate():
    reads = []
    clock = Clock()
    s = Senders(lambda: reads.append(1) or {}, clock, rate=100.0, burst=32.0)
    s.set_servers({RS1: 0})
    reads.clear()
    for i in range(10_000):  # 10,000 different MACs in one second
        clock.t = i / 10_000
        assert s.sender(i.to_bytes(6, "big")) == NO_RS
    assert 32 <= len(reads) <= 32 + 100 + 1


def test_vpnadm_sets_and_saves_the_return_path():
    from director.cli import save_lines
    from director.control import mutate

    c = mutate(cfg(), {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"return_path": "director"}})
    assert c.services[0].return_path == "director"
    line = next(save_lines([service_to_dict(c.services[0])]))
    assert "--return-path director" in line
    assert "--return-path" not in next(save_lines([service_to_dict(cfg().services[0])]))
    with pytest.raises(ValueError, match="return_path"):
        mutate(cfg(), {"cmd": "edit-service", "vip": "192.0.2.10", "changes": {"return_path": "gw"}})


@pytest.mark.parametrize("mode, directors", [("nat", 1), ("dr", 2)])
def test_the_lab_option_is_for_dr_and_tun_labs_with_one_director(mode, directors):
    from director.lab.netns import Lab

    with pytest.raises(ValueError, match="return_via_director"):
        Lab(mode, directors=directors, return_via_director=True)
    assert Lab("tun", return_via_director=True).return_via_director  # built only by up()
