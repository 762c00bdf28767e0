"""The Prometheus collector: the director's traffic as metrics, never a client address."""

from prometheus_client import CollectorRegistry, generate_latest

from director import reconcile
from director.config import parse
from director.core import Action, Director
from director.lab import craft
from director.metrics import Collector, Histogram
from director.packet import ip_to_int
from director.views import Views
from tests.configs import TWO_SERVERS

BASE = TWO_SERVERS
VIP = ip_to_int("192.0.2.10")
CLIENT = ip_to_int("203.0.113.5")


def running():
    d = Director(capacity=256)
    reconcile.reconcile(d, parse(BASE))
    return d


def establish(d, client=CLIENT, spi=77):
    d.decide(craft.ike(client, VIP, spi), 0.0)
    v = d.decide(craft.ike(client, VIP, spi, 99), 0.1)
    assert v.action == Action.FORWARD
    return v.rs


def test_metrics_collector_reports_the_traffic():
    d = running()
    rs = establish(d)
    for seq in range(3):
        d.decide(craft.esp(CLIENT, VIP, 9, seq), 1.0)
    d.decide(craft.esp(ip_to_int("203.0.113.99"), VIP, 9), 1.0)  # a stranger: icmp verdict
    router = ip_to_int("203.0.113.254")
    assert d.decide(craft.icmp_error(router, VIP, craft.esp(VIP, CLIENT, 9)), 1.0).action == Action.RELAY_ICMP
    d.decide(craft.icmp_error(router, VIP, craft.esp(VIP, ip_to_int("203.0.113.98"), 9)), 1.0)  # no conversation
    h = Histogram()
    h.observe(0.0001)
    views = Views(d, clock=lambda: 1.0, latency={"client": h, "reply": Histogram()},
                  stats={"icmp_sent": 1, "icmp_limited": 0, "icmp_suppressed": 0, "internal_errors": 0, "slow_iterations": 0})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(views))
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


def test_route_health_injection_gauges():
    """With [daemon.bgp]: one gauge per VIP (announced or not) and per BGP session, and the error flag."""
    from director.announce import DirectorState, ServiceState
    from director.route_injection import RouteInjector

    class Speaker:
        def plan(self, announce, known):
            return announce

        def apply(self, plan):
            pass

        def sessions(self):
            return {"uplink": "Established", "spare": "Active"}

    d = running()
    views = Views(d, clock=lambda: 1.0, latency={"client": Histogram(), "reply": Histogram()},
                  stats={"icmp_sent": 0, "icmp_limited": 0, "icmp_suppressed": 0, "internal_errors": 0, "slow_iterations": 0})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(views))
    assert "director_vip_announced" not in generate_latest(reg).decode()  # no [daemon.bgp]: no family
    inj = views.injector = RouteInjector(Speaker())
    inj.update(DirectorState(dataplane_up=True), [ServiceState("192.0.2.10", 2), ServiceState("192.0.2.20", 0)])
    inj.sessions()
    text = generate_latest(reg).decode()
    assert 'director_vip_announced{service="192.0.2.10"} 1.0' in text
    assert 'director_vip_announced{service="192.0.2.20"} 0.0' in text
    assert 'director_bgp_session_up{peer="uplink"} 1.0' in text
    assert 'director_bgp_session_up{peer="spare"} 0.0' in text
    assert "director_route_injection_error 0.0" in text


def test_an_ipv6_service_is_labelled_in_rfc_5952_form():
    d = Director(capacity=256)
    reconcile.reconcile(d, parse('[[service]]\nvip = "2001:DB8:F:0::1"\nscheduler = "rr"\n'
                                 '[[service.server]]\naddress = "2001:db8:5::0:1"\n'))  # fmt: skip
    vip6, client6 = ip_to_int("2001:db8:f::1"), ip_to_int("2001:db8:c::5")
    d.decide(craft.ike(client6, vip6, 7), 0.0)
    d.decide(craft.ike(client6, vip6, 7, 8), 0.1)
    for seq in range(2):
        assert d.decide(craft.esp(client6, vip6, 9, seq), 1.0).action == Action.FORWARD
    views = Views(d, clock=lambda: 1.0, latency={"client": Histogram(), "reply": Histogram()},
                  stats={"icmp_sent": 0, "icmp_limited": 0, "icmp_suppressed": 0, "internal_errors": 0, "slow_iterations": 0})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(views))
    text = generate_latest(reg).decode()
    assert 'director_packets_total{kind="esp",service="2001:db8:f::1",verdict="forward"} 2.0' in text
    assert 'director_real_server_packets_total{direction="in",kind="esp",server="2001:db8:5::1",service="2001:db8:f::1"} 2.0' in text
    assert "2001:db8:c:" not in text  # never a client address
