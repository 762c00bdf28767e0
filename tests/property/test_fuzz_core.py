"""Fuzz target with a fixed budget: any bytes through the whole decision core and the rewrites.

The daemon's per-packet path is classify -> Director.decide / decide_reply -> a rewrite chosen by
the verdict. Whatever the bytes (random, or mutations of valid IKE/NAT-T/ESP/AH packets), that path
may only return a verdict or raise PacketError from a rewrite the daemon catches; the table's
counters must stay consistent with its entries. The budget is fixed (examples, not time) so every
CI run does the same amount of work.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from director.core import Action, Director
from director.forwarding.fragment import fragment
from director.forwarding.rewrite import icmp_unreachable, ipip_encap, nat_dnat, nat_snat
from director.isakmp_state import State, Timeouts
from director.lab import craft
from director.packet import PacketError, ip_to_int
from director.schedulers import RealServer
from director.service import Method, Service

VIP = ip_to_int("192.0.2.10")
RIP = ip_to_int("198.51.100.1")
CLIENT = ip_to_int("203.0.113.7")
SEEDS = [
    craft.ike(CLIENT, VIP, 0x1111),
    craft.ike(CLIENT, VIP, 0x1111, 0x2222),
    craft.ike(CLIENT, VIP, 0x1111, 0x2222, v1=True, natt=True, sport=4500),
    craft.esp(CLIENT, VIP, 0x3333),
    craft.esp_in_udp(CLIENT, VIP, 0x4444),
    craft.keepalive(CLIENT, VIP),
    craft.ah(CLIENT, VIP, 0x5555),
    craft.ike(RIP, CLIENT, 0x1111, 0x2222),  # a reply from a NAT real server
]


@st.composite
def mutated(draw):
    base = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "grow"]))
        if op == "flip" and base:
            i = draw(st.integers(0, len(base) - 1))
            base[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and base:
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            base = base[: draw(st.integers(0, len(base)))]
        else:
            base += draw(st.binary(max_size=64))
    return bytes(base)


packets = st.one_of(st.binary(max_size=200), mutated())


def director(method: Method) -> Director:
    d = Director(capacity=64, seed=0)
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", method=method, ah=method != Method.NAT,
                          timeouts=Timeouts(init=5.0, established=50.0),
                          servers={0: RealServer(id=0, addr=RIP), 1: RealServer(id=1, addr=RIP + 1)}))
    return d


def apply_like_the_daemon(d: Director, data: bytes, now: float, reply: bool) -> None:
    v = d.decide_reply(data, now) if reply else d.decide(data, now)
    try:
        if v.action == Action.FORWARD:
            if v.reply:
                nat_snat(data, v.addr)
            elif v.method == Method.NAT:
                nat_dnat(data, v.addr)
            elif v.method == Method.TUN:
                fragment(ipip_encap(data, 1, v.addr, ident=1), 1500)
        elif v.action == Action.ICMP_UNREACH:
            icmp_unreachable(data, VIP)
    except PacketError:
        pass  # the daemon counts and drops these


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(st.sampled_from([Method.DR, Method.TUN, Method.NAT]),
       st.lists(st.tuples(packets, st.booleans(), st.floats(0, 2)), min_size=1, max_size=40))
def test_any_packets_through_the_core_and_rewrites(method, stream):
    d = director(method)
    now = 0.0
    for data, reply, dt in stream:
        now += dt
        apply_like_the_daemon(d, data, now, reply)
        d.expire(now)
    t = d.table
    live = list(t.slots())
    assert len(live) == len(t) == t.n_init + t.n_established
    servers = d.services[1].servers
    assert sum(r.active for r in servers.values()) == sum(1 for s in live if t.view(s).state == State.ESTABLISHED)
    assert sum(r.inactive for r in servers.values()) == sum(1 for s in live if t.view(s).state == State.INIT)
