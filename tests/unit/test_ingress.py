"""Per-source ingress limits: the limiter's arithmetic (hand-computed), the config, and the core's
use of it (docs/operations.md, "Ingress limits")."""

import pytest

from director import config
from director.core import Action, Director
from director.drop_reasons import DropReason as R
from director.ingress import AH, ESP, IKE, NS, IngressConfig, ServiceIngress, SourceLimiter
from director.isakmp_state import Timeouts
from director.lab import craft
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import Service

VIP = ip_to_int("192.0.2.10")
RIP = ip_to_int("198.51.100.1")
A, B = ip_to_int("203.0.113.1"), ip_to_int("203.0.113.2")
MS = 1_000_000


def test_token_bucket_sequence_by_hand():
    lim = SourceLimiter(pps=10, cap=3 * NS, key=0)  # 10/s, burst 3: one packet per 100 ms
    # t=0: a new source starts full (3): three pass, the fourth does not
    assert [lim.take(A, 0) for _ in range(4)] == [True, True, True, False]
    assert lim.take(A, 99 * MS) is False  # 0.99 packet refilled
    assert lim.take(A, 100 * MS) is True  # 1.0 packet: one more
    assert lim.take(A, 100 * MS) is False
    assert lim.take(A, 350 * MS) is True  # 2.5 refilled, 1.5 left
    assert lim.take(A, 350 * MS) is True  # 0.5 left
    assert lim.take(A, 350 * MS) is False
    assert lim.take(A, 10 * NS) is True  # long idle: full again (3), capped, not 96
    assert [lim.take(A, 10 * NS) for _ in range(3)] == [True, True, False]
    assert lim.denied == 5


def test_time_going_backwards_refills_nothing():
    lim = SourceLimiter(pps=1000, cap=1 * NS, key=0)
    assert lim.take(A, 5 * NS) is True
    assert lim.take(A, 4 * NS) is False  # an earlier timestamp (another CPU's clock read) adds nothing
    assert lim.take(A, 5 * NS + MS) is True  # 1 ms at 1000/s from the last refill


def test_sources_are_separate_and_slots_bounded():
    lim = SourceLimiter(pps=1, cap=1 * NS, slots=1024, key=0)
    assert lim.slot(A) != lim.slot(B)
    assert lim.take(A, 0) is True and lim.take(A, 0) is False
    assert lim.take(B, 0) is True  # another source: its own bucket
    assert len(lim._tokens) == 1024 and all(0 <= lim.slot(s) < 1024 for s in range(0, 1 << 32, 1 << 20))


def test_service_ingress_classes_and_default_burst():
    ing = ServiceIngress(IngressConfig(esp_pps=5, ah_pps=0, ike_pps=2, burst=0), key=0)
    assert ing.limiters[AH] is None  # 0: not limited
    assert [ing.refused(ESP, A, 0) for _ in range(6)] == [None] * 5 + [R.INGRESS_ESP_LIMITED]  # burst = 1 s of 5/s
    assert [ing.refused(IKE, A, 0) for _ in range(3)] == [None, None, R.INGRESS_IKE_LIMITED]  # IKE: its own bucket
    assert all(ing.refused(AH, A, 0) is None for _ in range(100))


@pytest.mark.parametrize("pps, cap", [(0, NS), (1_000_001, NS), (1, 0), (1, NS // 2)])
def test_limiter_refuses_bad_parameters(pps, cap):
    with pytest.raises(ValueError):
        SourceLimiter(pps, cap)


# -- config -------------------------------------------------------------------------------------
BASE = 'daemon = {}\n[[service]]\nvip = "192.0.2.10"\n[[service.server]]\naddress = "198.51.100.1"\n'


def parse_ingress(line: str):
    return config.parse(BASE.replace('vip = "192.0.2.10"\n', f'vip = "192.0.2.10"\n{line}\n')).services[0]


def test_config_ingress_parsed_and_round_trips():
    s = parse_ingress("ingress = { esp_pps = 50, ike_pps = 20, burst = 40 }")
    assert s.ingress == (50, 0, 20, 40)
    again = config.service_to_dict(s)
    assert again["ingress"] == {"esp_pps": 50, "ike_pps": 20, "burst": 40}
    assert parse_ingress("ingress = { esp_pps = 0 }").ingress == ()  # all 0: off
    assert config.parse(BASE).services[0].ingress == ()


@pytest.mark.parametrize("line, field", [
    ("ingress = { esp_pps = -1 }", "service[0].ingress.esp_pps: must be 0..1000000"),
    ("ingress = { ah_pps = 2000000 }", "service[0].ingress.ah_pps: must be 0..1000000"),
    ("ingress = { ike_pps = 1.5 }", "service[0].ingress.ike_pps: must be an integer"),
    ("ingress = { ike_pps = nan }", "service[0].ingress.ike_pps: must be an integer"),
    ("ingress = { esp_pps = inf }", "service[0].ingress.esp_pps: must be an integer"),
    ("ingress = { esp_pps = true }", "service[0].ingress.esp_pps: must be an integer"),
    ("ingress = { burst = 5 }", "service[0].ingress.burst: set without any of"),
    ("ingress = { esp = 5 }", "service[0].ingress.esp: unknown setting"),
    ("ingress = 5", "service[0].ingress: must be a table"),
])
def test_config_ingress_errors_name_the_field(line, field):
    with pytest.raises(config.ConfigErrors) as e:
        parse_ingress(line)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith(field), e.value.errors


# -- the core -------------------------------------------------------------------------------------
def director(ingress=(3, 2, 4, 0), ah=True) -> Director:
    d = Director(capacity=1024)
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", ah=ah, timeouts=Timeouts(init=10.0, established=100.0),
                          servers={0: RealServer(id=0, addr=RIP)}, ingress=ingress))
    return d


def test_core_limits_esp_without_entry_per_source_no_icmp_for_the_excess():
    d = director()
    rs = [d.decide(craft.esp(A, VIP, 0x1000 + i), 0.0) for i in range(5)]
    assert [v.action for v in rs] == [Action.ICMP_UNREACH] * 3 + [Action.DROP] * 2
    assert [v.reason for v in rs[3:]] == [R.INGRESS_ESP_LIMITED] * 2
    assert d.decide(craft.esp(B, VIP, 0x2000), 0.0).reason == R.NO_ENTRY  # another source: unaffected
    # ESP-in-UDP shares the ESP class
    assert d.decide(craft.esp_in_udp(A, VIP, 0x3000), 0.0).reason == R.INGRESS_ESP_LIMITED
    assert d.decide(craft.esp(A, VIP, 0x1000), 0.3).reason == R.INGRESS_ESP_LIMITED  # 0.9 packet refilled
    assert d.decide(craft.esp(A, VIP, 0x1000), 0.34).reason == R.NO_ENTRY  # 1.02: one more
    assert d.drops[R.INGRESS_ESP_LIMITED] == 4


def test_core_limits_ah_separately_also_when_the_service_refuses_ah():
    for ah in (True, False):
        d = director(ah=ah)
        rs = [d.decide(craft.ah(A, VIP, 0x1000), 0.0).reason for _ in range(3)]
        assert rs == [R.NO_ENTRY, R.NO_ENTRY, R.INGRESS_AH_LIMITED]
        assert d.decide(craft.esp(A, VIP, 0x1000), 0.0).reason == R.NO_ENTRY  # ESP: its own budget


def test_core_established_esp_never_limited_and_ike_limited():
    d = director(ingress=(1, 1, 4, 0))
    assert d.decide(craft.ike(A, VIP, 7), 0.0).action == Action.FORWARD
    assert d.decide(craft.ike(A, VIP, 7, 8), 0.0).action == Action.FORWARD  # ESTABLISHED
    assert all(d.decide(craft.esp(A, VIP, 0x1000, seq=i), 0.0).action == Action.FORWARD for i in range(1000))
    assert d.decide(craft.ike(A, VIP, 7, 8), 0.0).action == Action.FORWARD  # 3rd IKE packet
    assert d.decide(craft.ike(A, VIP, 7, 8), 0.0).action == Action.FORWARD  # 4th: the burst
    v = d.decide(craft.ike(A, VIP, 7, 8), 0.0)
    assert (v.action, v.reason) == (Action.DROP, R.INGRESS_IKE_LIMITED)
    v = d.decide(craft.ike(A, VIP, 9), 0.0)  # an initial one too, before admission
    assert (v.action, v.reason) == (Action.DROP, R.INGRESS_IKE_LIMITED)
    assert d.decide(craft.ike(B, VIP, 9), 0.0).action == Action.FORWARD


def test_core_ingress_reloadable_and_off_when_the_kernel_enforces_it():
    d = director(ingress=(1, 0, 0, 0))
    assert [d.decide(craft.esp(A, VIP, 1), 0.0).reason for _ in range(2)] == [R.NO_ENTRY, R.INGRESS_ESP_LIMITED]
    d.change_service(1, fields={"ingress": (1, 0, 0, 0)})  # unchanged: the state stays
    assert d.decide(craft.esp(A, VIP, 1), 0.0).reason == R.INGRESS_ESP_LIMITED
    d.change_service(1, fields={"ingress": ()})
    assert all(d.decide(craft.esp(A, VIP, 1), 0.0).reason == R.NO_ENTRY for _ in range(10))
    d.change_service(1, fields={"ingress": (1, 0, 0, 0)})
    assert [d.decide(craft.esp(A, VIP, 1), 0.0).reason for _ in range(2)] == [R.NO_ENTRY, R.INGRESS_ESP_LIMITED]
    d.ingress_in_core = False
    assert all(d.decide(craft.esp(A, VIP, 1), 0.0).reason == R.NO_ENTRY for _ in range(10))
