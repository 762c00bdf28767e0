"""The views and the one counter read model: the core's counts plus the kernel's, read alike by
the control API (vpnadm --stats, --rate) and Prometheus; the daemon's config changes and a
scrape never interleave."""

import sys
import threading

from prometheus_client import CollectorRegistry, generate_latest

from director import reconcile
from director.config import parse
from director.core import Action, Director, rs_counter, svc_counter
from director.counters import Counters
from director.daemon import Daemon
from director.lab import craft
from director.metrics import Collector, Histogram
from director.packet import Kind, ip_to_int
from director.views import Views

BASE = """
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
[[service.server]]
address = "198.51.100.1"
[[service.server]]
address = "198.51.100.2"
"""
VIP = ip_to_int("192.0.2.10")
CLIENT = ip_to_int("203.0.113.5")
ESP = int(Kind.ESP)


class FakeKernel:
    """What FastPath.rs_stats returns, with counts a test adds to (as the tc program would)."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, list[int]]] = {}

    def forward(self, rs_id: int, kind: int, packets: int, size: int) -> None:
        c = self.counts.setdefault(rs_id, {"packets": [0] * 8, "bytes": [0] * 8})
        c["packets"][kind] += packets
        c["bytes"][kind] += packets * size

    def __call__(self) -> dict[int, dict[str, list[int]]]:
        return {k: {"packets": list(v["packets"]), "bytes": list(v["bytes"])} for k, v in self.counts.items()}


def running(text=BASE):
    d = Director(capacity=256)
    reconcile.reconcile(d, parse(text))
    return d


def establish(d, client=CLIENT, spi=77) -> int:
    d.decide(craft.ike(client, VIP, spi), 0.0)
    v = d.decide(craft.ike(client, VIP, spi, 99), 0.1)
    assert v.action == Action.FORWARD
    return v.rs


def views_of(d, now=[0.0]) -> Views:
    return Views(d, clock=lambda: now[0], stats={"icmp_sent": 0, "icmp_limited": 0, "icmp_suppressed": 0,
                                                 "internal_errors": 0, "slow_iterations": 0},
                 latency={"client": Histogram(), "reply": Histogram()})


class FakeFastPath:
    def __init__(self, kernel: FakeKernel) -> None:
        self.rs_stats = kernel
        self.stats = {}

    def dp_stats(self) -> dict:
        return {}

    def clients(self) -> list:
        return []


def scrape(views: Views) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(views))
    return generate_latest(reg).decode()


def test_kernel_forwarded_packets_are_added_to_servers_and_services():
    d = running()
    rs = establish(d)
    for seq in range(3):  # 3 ESP packets decided by the core (the slow path)
        d.decide(craft.esp(CLIENT, VIP, 9, seq, size=64), 1.0)
    kernel = FakeKernel()
    kernel.forward(rs, ESP, 1000, 84)  # a previous daemon's run: not ours
    v = views_of(d)
    v.attach_fastpath(FakeFastPath(kernel))
    kernel.forward(rs, ESP, 40, 84)  # forwarded in the kernel since: they never reached the core
    t = v.counters.totals()
    core = d.rs_counters[rs]
    assert t.servers[rs][rs_counter(False, Kind.ESP)] == core[rs_counter(False, Kind.ESP)] + 40 == 43
    assert t.servers[rs][rs_counter(False, Kind.ESP, True)] == core[rs_counter(False, Kind.ESP, True)] + 40 * 84
    svc_id = next(iter(d.services))
    assert t.services[svc_id][svc_counter(Action.FORWARD, Kind.ESP)] == 43
    other = 1 - rs
    assert t.servers[other][rs_counter(False, Kind.ESP)] == 0
    # one model for every reader: the control API's listing and the scrape say the same
    (svc,) = v.services()
    row = next(r for r in svc["servers"] if r["id"] == rs)
    assert row["stats"]["inpkts"] == sum(core[rs_counter(False, k)] for k in Kind) + 40
    assert svc["stats"]["inpkts"] == row["stats"]["inpkts"]
    text = scrape(v)
    rip = ["198.51.100.1", "198.51.100.2"][rs]
    assert f'director_real_server_packets_total{{direction="in",kind="esp",server="{rip}",service="192.0.2.10"}} 43.0' in text
    assert 'director_packets_total{kind="esp",service="192.0.2.10",verdict="forward"} 43.0' in text
    assert f'director_real_server_bytes_total{{direction="in",kind="esp",server="{rip}",service="192.0.2.10"}} ' \
           f'{float(core[rs_counter(False, Kind.ESP, True)] + 40 * 84)}' in text


def test_zero_clears_the_kernel_share_too_and_counting_goes_on():
    d = running()
    rs = establish(d)
    kernel = FakeKernel()
    v = views_of(d)
    v.attach_fastpath(FakeFastPath(kernel))
    kernel.forward(rs, ESP, 10, 100)
    v.zero(None)
    assert all(sum(r["stats"].values()) == 0 for s in v.services() for r in s["servers"])
    kernel.forward(rs, ESP, 7, 100)
    row = next(r for r in v.services()[0]["servers"] if r["id"] == rs)
    assert row["stats"] == {"conns": 0, "inpkts": 7, "outpkts": 0, "inbytes": 700, "outbytes": 0}


def test_a_new_server_with_a_reused_id_does_not_inherit_the_kernel_counts():
    d = running()
    kernel = FakeKernel()
    v = views_of(d)
    v.attach_fastpath(FakeFastPath(kernel))
    (svc,) = d.services.values()
    gone = next(rs.id for rs in svc.servers.values() if rs.addr == ip_to_int("198.51.100.2"))
    kernel.forward(gone, ESP, 500, 100)
    reconcile.reconcile(d, parse(BASE.replace('[[service.server]]\naddress = "198.51.100.2"\n', "")))
    v.config_applied()
    reconcile.reconcile(d, parse(BASE.replace('address = "198.51.100.2"', 'address = "198.51.100.9"')))
    v.config_applied()
    new = next(rs.id for rs in svc.servers.values() if rs.addr == ip_to_int("198.51.100.9"))
    assert new == gone  # the id came back: the kernel's entry for it still holds the old 500
    kernel.forward(new, ESP, 2, 100)
    row = next(r for r in v.services()[0]["servers"] if r["id"] == new)
    assert row["stats"]["inpkts"] == 2


def test_without_a_fast_path_the_totals_are_the_cores():
    d = running()
    rs = establish(d)
    for seq in range(5):
        d.decide(craft.esp(CLIENT, VIP, 9, seq), 1.0)
    t = Counters(d).totals()
    assert list(t.servers[rs]) == list(d.rs_counters[rs])
    assert {i: list(a) for i, a in t.services.items()} == {i: list(a) for i, a in d.svc_counters.items()}


def test_rates_come_from_the_same_totals():
    d = running()
    now = [0.0]
    v = views_of(d, now)  # as the daemon: views first, then traffic
    kernel = FakeKernel()
    v.attach_fastpath(FakeFastPath(kernel))
    rs = establish(d)  # one new conversation, two IKE packets in
    v.tick(1.0)
    row = next(r for r in v.services()[0]["servers"] if r["id"] == rs)
    assert (row["rates"]["cps"], row["rates"]["inpps"]) == (0.5, 1.0)  # EWMA weight 1/2: (0 + 1/s) / 2
    kernel.forward(rs, ESP, 200, 100)
    v.tick(2.0)
    row = next(r for r in v.services()[0]["servers"] if r["id"] == rs)
    assert row["rates"]["inpps"] == 100.5
    assert row["rates"]["inbps"] == round((d.rs_counters[rs][rs_counter(False, Kind.IKE_INITIAL, True)]
                                           + d.rs_counters[rs][rs_counter(False, Kind.IKE, True)]) / 2 / 2
                                          + 200 * 100 / 2, 2)
    assert v.services()[0]["rates"]["inpps"] == 100.5  # the service: the sum of its servers
    v.tick(3.0)  # nothing more forwarded: the rate halves
    row = next(r for r in v.services()[0]["servers"] if r["id"] == rs)
    assert row["rates"]["inpps"] == 50.25
    v.zero(None)  # counters going down is a zeroing, not a negative rate
    v.tick(4.0)
    row = next(r for r in v.services()[0]["servers"] if r["id"] == rs)
    assert row["rates"]["inpps"] == round(50.25 / 2, 2)


class _NoKernel:
    """KernelRules' protocol without a kernel: every change accepted, no DR marks."""

    state = None

    def apply(self, director) -> dict[int, int]:
        return {}


def _config(n_services: int, vip_base: int, servers: int, weight: int) -> str:
    out = ["[daemon]\ncapacity = 256\n"]  # removing a service walks the table: keep it small
    for i in range(n_services):
        out.append(f'[[service]]\nvip = "192.0.{vip_base}.{i + 1}"\nscheduler = "rr"\n')
        for j in range(servers):
            out.append(f'[[service.server]]\naddress = "198.51.{vip_base}.{j + 1}"\nweight = {weight}\n')
    return "".join(out)


def _pairs(text: str) -> frozenset:
    """(service, server, weight) of every director_real_server_weight sample in a scrape."""
    out = set()
    for line in text.splitlines():
        if line.startswith("director_real_server_weight{"):
            labels, value = line.rsplit(" ", 1)
            out.add((labels, float(value)))
    return frozenset(out)


def test_a_scrape_racing_config_changes_sees_one_config_or_the_other():
    """The daemon's apply_config (under the views' lock) swaps two configs with different VIPs,
    servers and weights while the collector scrapes from another thread, as prometheus_client's
    HTTP thread does: every scrape shows exactly one of the two, never a mix."""
    a = parse(_config(8, 10, 4, 1))
    b = parse(_config(8, 20, 5, 3))
    dm = Daemon(a)
    dm.kernel = _NoKernel()
    views = dm.views
    dm.apply_config(b)
    want_b = _pairs(scrape(views))
    dm.apply_config(a)
    want_a = _pairs(scrape(views))
    assert len(want_a) == 32 and len(want_b) == 40
    seen, errors = [], []
    stop = threading.Event()

    def scraper():
        reg = CollectorRegistry(auto_describe=False)
        reg.register(Collector(views))
        while not stop.is_set():
            try:
                seen.append(_pairs(generate_latest(reg).decode()))
            except Exception as e:  # a dict changed size under the scrape
                errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as the interpreter allows
    t = threading.Thread(target=scraper)
    t.start()
    applied = 0
    try:
        while (len(seen) + len(errors) < 30 or applied < 30) and applied < 3000:
            dm.apply_config(b if applied % 2 == 0 else a)
            applied += 1
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert errors == []
    assert len(seen) >= 30 and applied >= 30, f"{len(seen)} scrapes, {applied} changes: the race was not run"
    mixed = [s for s in seen if s not in (want_a, want_b)]
    assert mixed == [], f"{len(mixed)} of {len(seen)} scrapes saw half a change"


def test_ingress_drops_add_the_kernel_to_the_core_in_the_api_and_the_metric():
    d = running(BASE.replace('scheduler = "rr"', 'scheduler = "rr"\ningress = { esp_pps = 1, burst = 1 }'))
    stranger = ip_to_int("203.0.113.99")
    for _ in range(3):  # the core: 1 within the limit (NO_ENTRY), 2 over it
        d.decide(craft.esp(stranger, VIP, 9), 1.0)

    class Kernel(FakeFastPath):
        def dp_stats(self) -> dict:
            drops = [0] * 128
            drops[75] = 40  # INGRESS_ESP_LIMITED in the programs
            return {"drops": drops}

    v = views_of(d)
    v.attach_fastpath(Kernel(FakeKernel()))
    assert v.drop_counts()[75] == 42 and v.drop_counts()[50] == 1
    assert 'director_drops_total{reason="ingress_esp_limited"} 42.0' in scrape(v)
