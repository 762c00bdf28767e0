"""IPv6 in the config: VIPs and real servers of either family, one family per service, RFC 5952
text, and one-line errors naming the field for what is not built for IPv6 yet."""

import pytest

from director import reconcile
from director.config import ConfigErrors, parse
from director.core import Director
from director.packet import ip_to_int


def service(vip: str, *addrs: str, extra: str = "", method: str = "dr") -> str:
    servers = "".join(f'[[service.server]]\naddress = "{a}"\n' for a in addrs)
    return f'[[service]]\nvip = "{vip}"\nscheduler = "rr"\nmethod = "{method}"\n{extra}\n{servers}'


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        parse(text)
    return e.value.errors


def test_a_dual_stack_config_reconciles_to_two_services():
    cfg = parse(service("198.51.100.1", "10.0.0.1") + service("2001:0DB8:0:0::1", "2001:db8:1::a", "2001:db8:1::b"))
    assert [s.vip for s in cfg.services] == ["198.51.100.1", "2001:db8::1"]  # RFC 5952 text
    d = Director()
    plan = reconcile.plan(d, cfg)
    reconcile.apply(d, plan)
    svc = d.service_by_vip(ip_to_int("2001:db8::1"))
    assert sorted(rs.addr for rs in svc.servers.values()) == [ip_to_int("2001:db8:1::a"), ip_to_int("2001:db8:1::b")]


@pytest.mark.parametrize("text,want", [
    (service("2001:db8::1", "10.0.0.1"),
     "service[0].server[0].address: 10.0.0.1 is not of the VIP's address family (2001:db8::1): a service is one family"),
    (service("198.51.100.1", "2001:db8::5"),
     "service[0].server[0].address: 2001:db8::5 is not of the VIP's address family (198.51.100.1): a service is one family"),
    (service("fe80::1", "2001:db8::5"),
     "service[0].vip: not a global or unique-local unicast address: fe80::1 (multicast, link-local and ::/96 are refused)"),
    (service("::10.0.0.1", "2001:db8::5"),
     "service[0].vip: not a global or unique-local unicast address: ::10.0.0.1 (multicast, link-local and ::/96 are refused)"),
    (service("2001:db8::1", "2001:db8::5", extra='return_path = "director"'),
     'service[0].return_path: "director" is not built for IPv6 DR and TUN services yet: "direct"'),
    (service("2001:db8::1", "2001:db8:::5"), "service[0].server[0].address: not an IPv4 or IPv6 address: '2001:db8:::5'"),
])  # fmt: skip
def test_ipv6_mistakes_get_one_line_naming_the_field(text, want):
    assert errors(text) == [want]
