"""Affinity per prefix (ipvsadm's -M): every client of one /N follows the newest live conversation
of that prefix; IPv6 with a prefix length, IPv4 with a netmask or a length."""

import pytest

from director import cli
from director.config import ConfigErrors, parse
from director.core import Action, Director
from director.isakmp_state import Timeouts
from director.lab import craft
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import ConfigError, Service

VIP6 = ip_to_int("2001:db8:f::1")
RIPS6 = [ip_to_int(f"2001:db8:5::{i}") for i in (1, 2, 3, 4)]
VIP4 = ip_to_int("192.0.2.10")
RIPS4 = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3, 4)]


def director(vip, rips, prefix) -> Director:
    d = Director(capacity=4096)
    d.add_service(Service(id=1, vip=vip, scheduler_name="rr", affinity_prefix=prefix,
                          timeouts=Timeouts(init=10.0, established=100.0),
                          servers={i: RealServer(id=i, addr=a) for i, a in enumerate(rips)}))
    return d


def test_clients_of_one_slash_64_share_a_server_and_others_are_spread():
    d = director(VIP6, RIPS6, 64)
    net = ip_to_int("2001:db8:c:1::")
    first = d.decide(craft.ike(net | 1, VIP6, 1), 0.0).rs
    # 40 more addresses of the same /64 (privacy addresses, say): rr would spread 30 of them
    assert {d.decide(craft.ike(net | 0x1000 + i, VIP6, 100 + i), 0.1).rs for i in range(40)} == {first}
    # 40 clients of 40 other /64s: spread by rr over all four servers, ten each
    others = [d.decide(craft.ike(ip_to_int(f"2001:db8:c:{i + 2:x}::1"), VIP6, 500 + i), 0.2).rs for i in range(40)]
    assert sorted(others.count(rs) for rs in range(4)) == [10, 10, 10, 10]
    assert d.stats["persisted"] == 40


def test_the_prefix_forgets_when_its_entries_go():
    d = director(VIP6, RIPS6, 64)
    net = ip_to_int("2001:db8:c:1::")
    first = d.decide(craft.ike(net | 1, VIP6, 1), 0.0).rs
    for s in list(d.table.slots()):
        d.table.remove(s)
    assert d.decide(craft.ike(net | 2, VIP6, 2), 1.0).rs != first  # rr moved on; nothing binds the prefix now
    assert d._prefixes.groups.keys() == {(1, net >> 64)}


def test_ipv4_by_netmask_and_prefix_off_is_per_address():
    d = director(VIP4, RIPS4, 24)
    a = d.decide(craft.ike(ip_to_int("203.0.113.5"), VIP4, 1), 0.0).rs
    assert d.decide(craft.ike(ip_to_int("203.0.113.77"), VIP4, 2), 0.0).rs == a
    assert d.decide(craft.ike(ip_to_int("203.0.114.5"), VIP4, 3), 0.0).rs != a
    d.change_service(1, fields={"affinity_prefix": 0})  # per address again: the groups rebuilt (none)
    assert d.decide(craft.ike(ip_to_int("203.0.113.78"), VIP4, 4), 0.0).rs != a
    assert not d._prefixes.groups


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="affinity_prefix: must be 0..32"):
        Service(id=1, vip=VIP4, affinity_prefix=33)
    with pytest.raises(ConfigError, match="only with affinity"):
        Service(id=1, vip=VIP6, affinity="ip-port", affinity_prefix=64)
    with pytest.raises(ConfigErrors) as e:
        parse('[[service]]\nvip = "2001:db8::1"\naffinity = "ip-port"\naffinity_prefix = 64\n'
              '[[service.server]]\naddress = "2001:db8::5"\n')
    assert e.value.errors == ['service[0].affinity_prefix: only with affinity = "ip" (a prefix groups addresses, not ports)']
    assert parse('[[service]]\nvip = "2001:db8::1"\naffinity_prefix = 56\n[[service.server]]\naddress = "2001:db8::5"\n'
                 ).services[0].affinity_prefix == 56  # fmt: skip


@pytest.mark.parametrize("vip,mask,prefix", [("2001:db8::1", "64", 64), ("2001:db8::1", "128", 0),
                                             ("192.0.2.1", "255.255.255.0", 24), ("192.0.2.1", "255.255.255.255", 0),
                                             ("192.0.2.1", "16", 16)])  # fmt: skip
def test_vpnadm_dash_m(vip, mask, prefix):
    req = cli.parse(["-A", "-V", vip, "-M", mask])
    assert cli.service_settings(req.args)["affinity_prefix"] == prefix
    saved = list(cli.save_lines([{"vip": vip, "scheduler": "rr", "affinity": "ip", "affinity_prefix": prefix,
                                  "timeouts": {"init": 30.0, "established": 3600.0}, "server": []}]))
    assert ("-M" in saved[0]) == bool(prefix) and (not prefix or f" -M {prefix} " in saved[0] + " ")
    if prefix:  # -R reads back what -S wrote
        assert cli.service_settings(cli.parse(saved[0].split()).args)["affinity_prefix"] == prefix
