"""The decision core on an IPv6 service: the same rules as IPv4 (two states, related ESP/AH,
NAT-T float, ICMPv6 relay), per-source limits by /64, and both families in one Director."""

import pytest

from director.core import Action, Director
from director.drop_reasons import DropReason as R
from director.isakmp_state import Timeouts
from director.lab import craft
from director.packet import Kind, ip_to_int
from director.schedulers import RealServer
from director.service import ConfigError, Method, Service

VIP6 = ip_to_int("2001:db8:f::1")
VIP4 = ip_to_int("192.0.2.10")
RIPS6 = [ip_to_int(f"2001:db8:5::{i}") for i in (1, 2, 3)]
RIPS4 = [ip_to_int(f"198.51.100.{i}") for i in (1, 2, 3)]
A = ip_to_int("2001:db8:c:1::10")
A2 = ip_to_int("2001:db8:c:1::99")  # the same /64 as A
B = ip_to_int("2001:db8:c:2::10")  # another /64


def director(method=Method.DR, ingress=(), **kw) -> Director:
    d = Director(capacity=1024, **kw)
    for sid, vip, rips in ((1, VIP6, RIPS6), (2, VIP4, RIPS4)):
        d.add_service(Service(id=sid, vip=vip, scheduler_name="rr", method=method, ah=method != Method.NAT,
                              timeouts=Timeouts(init=10.0, established=100.0), ingress=ingress,
                              servers={sid * 10 + i: RealServer(id=sid * 10 + i, addr=a) for i, a in enumerate(rips)}))
    return d


@pytest.mark.parametrize("method", [Method.DR, Method.NAT])
def test_an_ipv6_conversation_and_its_related_traffic(method):
    d = director(method)
    v = d.decide(craft.ike(A, VIP6, 7), 0.0)
    assert (v.action, v.kind, v.svc) == (Action.FORWARD, Kind.IKE_INITIAL, 1) and v.addr in RIPS6
    if method == Method.NAT:  # the responder SPI comes from the real server's answer, source back to the VIP
        reply = d.decide_reply(craft.ike(v.addr, A, 7, 8), 0.05)
        assert (reply.action, reply.addr) == (Action.FORWARD, VIP6)
    assert d.decide(craft.ike(A, VIP6, 7, 8, natt=True, sport=4500), 0.1).rs == v.rs  # floated to 4500
    assert d.decide(craft.esp_in_udp(A, VIP6, 0x1000, sport=4500), 0.2).rs == v.rs
    esp = d.decide(craft.esp(A, VIP6, 0x2000), 0.2)
    assert (esp.action, esp.rs) == (Action.FORWARD, v.rs)
    assert d.decide(craft.keepalive(A, VIP6, 4500), 0.3).rs == v.rs
    # the IPv4 service beside it knows nothing of this client
    v4 = d.decide(craft.esp(ip_to_int("203.0.113.1"), VIP4, 0x2000), 0.3)
    assert (v4.action, v4.reason) == (Action.ICMP_UNREACH, R.NO_ENTRY)
    # nor does the IPv6 service know an address whose low 32 bits are A's, or A's /64 neighbour
    for other in (A & 0xFFFFFFFF | ip_to_int("2001:db8:9::"), A2):
        stranger = d.decide(craft.esp(other, VIP6, 0x2000), 0.3)
        assert (stranger.action, stranger.reason) == (Action.ICMP_UNREACH, R.NO_ENTRY)
    conns = [e for e in d.table.entries()]
    assert len(conns) == 1 and conns[0].client == A and conns[0].cport == 4500


def test_icmp6_packet_too_big_about_a_conversation_is_relayed_to_its_server():
    d = director()
    v = d.decide(craft.ike(A, VIP6, 7), 0.0)
    d.decide(craft.ike(A, VIP6, 7, 8), 0.1)
    router = ip_to_int("2001:db8:99::1")
    quoted = craft.esp(VIP6, A, 0x5555)  # what the real server sent the client, as the VIP
    r = d.decide(craft.icmp6_error(router, VIP6, quoted), 0.2)
    assert (r.action, r.rs) == (Action.RELAY_ICMP, v.rs)
    r = d.decide(craft.icmp6_error(router, VIP6, craft.esp(VIP6, B, 0x5555)), 0.2)
    assert (r.action, r.reason) == (Action.DROP, R.ICMP_NO_ENTRY)


def test_ipv6_ingress_limits_count_a_slash_64_and_hold_with_the_fast_path():
    """The eBPF programs judge IPv4 only, so the core keeps judging IPv6 sources when they run."""
    d = director(ingress=(2, 0, 0, 0))
    d.ingress_in_core = False  # as the daemon sets it with the fast path loaded
    got = [d.decide(craft.esp(a, VIP6, 0x1000), 0.0).reason for a in (A, A2, A)]
    assert got == [R.NO_ENTRY, R.NO_ENTRY, R.INGRESS_ESP_LIMITED]  # A and A2 share one /64's budget
    assert d.decide(craft.esp(B, VIP6, 0x1000), 0.0).reason == R.NO_ENTRY  # another /64
    assert d.decide(craft.esp(ip_to_int("203.0.113.1"), VIP4, 0x1), 0.0).reason == R.NO_ENTRY
    assert [d.decide(craft.esp(ip_to_int("203.0.113.1"), VIP4, 0x1), 0.0).reason for _ in range(5)] == [R.NO_ENTRY] * 5


def test_new_entries_per_source_count_a_slash_64():
    d = director(new_per_source=2)
    got = [d.decide(craft.ike(a, VIP6, 100 + i), 0.0) for i, a in enumerate((A, A2, A2))]
    assert [v.action for v in got] == [Action.FORWARD, Action.FORWARD, Action.DROP]
    assert got[2].reason == R.SOURCE_RATE_LIMITED
    assert d.decide(craft.ike(B, VIP6, 200), 0.0).action == Action.FORWARD


def test_a_service_is_one_family():
    d = director()
    with pytest.raises(ConfigError, match="address family"):
        d.add_server(1, RealServer(id=99, addr=RIPS4[0]))
    with pytest.raises(ConfigError, match="address family"):
        Service(id=5, vip=VIP6, scheduler_name="rr", servers={1: RealServer(id=1, addr=RIPS4[0])})
