"""Micro-benchmarks of the pure decision core: classify, Director.decide and the connection table.

Not tests: it prints numbers, and ratios against baselines measured in the same run (a ratio is
what compares across machines; an absolute rate only describes this one). The targets checked
here (docs/performance.md): at least 20k new ISAKMP entries/s, a table of 1,000,000 entries at
300 bytes/entry or less, O(1) lookup, and expiry cost proportional to what expires.

    .venv/bin/python bench/bench_core.py [--quick] [--json out.json] [--repeats N] [--no-naive]

Sections:
  a  parse + classify + lookup on a realistic NFQUEUE-only mix through ``Director.decide``, with
     baselines: an empty loop calling a no-op (the interpreter floor), ``classify`` alone, a plain
     ``dict`` lookup keyed by a bytes slice of the packet, and classify + dict lookup.
  b  new ISAKMP entries/s (initial IKE from distinct clients, scheduled and created), handshakes/s,
     and new entries/s when the table is full (each one reclaims the oldest INIT entry).
  c  the table at 1,000,000 entries: bytes/entry (tracemalloc and VmRSS), fill time, lookups at
     1M against a small table, expiry per expired entry, and an ``expire()`` with nothing due.
  c' for comparison only (not our code): a naive dict-of-slotted-objects table: bytes/entry, and
     its lookups interleaved with ours.
  s  ``scheduler.pick`` alone for each of the twelve schedulers, 3 and 10 real servers with
     active/inactive counts set, distinct clients and source ports; and mh with one of 10 servers
     down (its clients' fallback probes) next to mh with all up.

Timing: every measurement runs ``--repeats`` times; the table shows the best (least disturbed by
noisy neighbours) and the median, and rates and ratios use the best. The garbage collector stays
enabled in timed loops, as in the daemon. Every input packet is built before the timed loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from director.conntrack import Table  # noqa: E402
from director.core import Action, Director, Verdict  # noqa: E402
from director.isakmp_state import State  # noqa: E402
from director.lab import craft  # noqa: E402
from director.packet import INFORMATIONAL, Kind, PacketError, classify, ip_to_int  # noqa: E402
from director.schedulers import SCHEDULERS, RealServer, make_scheduler  # noqa: E402
from director.service import Method, Service  # noqa: E402

VIP = ip_to_int("192.0.2.10")
RIPS = [ip_to_int(a) for a in ("198.51.100.11", "198.51.100.12", "198.51.100.13")]
CLIENT_BASE = ip_to_int("100.64.0.0")  # RFC 6598 space: 4M distinct client addresses
SVC = 1

TARGET_ENTRIES_PER_S = 20_000
TARGET_BYTES_PER_ENTRY = 300

# the NFQUEUE-only mix (fractions of the packet list)
MIX = {
    "esp": 0.425,  # raw ESP of established clients
    "esp_udp": 0.425,  # ESP-in-UDP of established NAT-T clients
    "ike": 0.10,  # non-initial IKE (INFORMATIONAL) of established clients
    "ike_initial": 0.03,  # IKE_SA_INIT from new clients
    "keepalive": 0.01,  # NAT-keepalives of NAT-T clients
    "malformed": 0.01,  # truncated, lying lengths, zero SPIs, garbage
}

CROWD = (0, 10, 100, 1000)  # INIT entries newer than a client's ESTABLISHED one (section a)

SIZES = {
    # established clients, mix list length, new entries (b), handshakes (b), table entries (c),
    # entries expiring per tick (c), small table for the O(1) comparison (c: table / 128, so that
    # its indexes have the same load factor as the big table's), lookups sampled (c)
    "full": dict(clients=10_000, mix=100_000, entries=200_000, handshakes=100_000, table=1_000_000,
                 k=10_000, small=7_812, lookups=100_000, repeats=5),
    "quick": dict(clients=1_000, mix=10_000, entries=20_000, handshakes=10_000, table=100_000,
                  k=1_000, small=781, lookups=10_000, repeats=3),
}  # fmt: skip


# -- measuring -------------------------------------------------------------------------------------


class Timing:
    """Seconds per repeat of a loop of ``n`` operations; best and median per operation."""

    def __init__(self, n: int, times: list[float]) -> None:
        self.n = n
        self.times = times

    @property
    def best(self) -> float:
        return min(self.times) / self.n

    @property
    def median(self) -> float:
        return statistics.median(self.times) / self.n

    @property
    def rate(self) -> float:
        return 1.0 / self.best

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "repeats": len(self.times),
            "best_ns": self.best * 1e9,
            "median_ns": self.median * 1e9,
            "rate_per_s": self.rate,
            "times_s": self.times,
        }


Spec = tuple[Callable[..., object], int, Callable[[int], tuple]]  # loop, operations, args(repeat)


def measure_many(specs: dict[str, Spec], repeats: int) -> dict[str, Timing]:
    """Run every ``loop(*args(r))``, repeats interleaved (r = 0 for all, then 1, ...).

    Interleaving puts a noisy spell on every measurement alike, so ratios between them hold up.
    ``args`` builds fresh state and is not timed.
    """
    times: dict[str, list[float]] = {key: [] for key in specs}
    for r in range(repeats):
        for key, (loop, _, args) in specs.items():
            a = args(r)
            gc.collect()
            t0 = time.perf_counter()
            loop(*a)
            times[key].append(time.perf_counter() - t0)
    return {key: Timing(n, times[key]) for key, (_, n, _) in specs.items()}


def measure(loop: Callable[..., object], n: int, repeats: int, args: Callable[[int], tuple]) -> Timing:
    return measure_many({"": (loop, n, args)}, repeats)[""]


def once(fn: Callable[[], object], collect: bool = True) -> tuple[float, object]:
    if collect:
        gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def vm_rss() -> int | None:
    """Resident set size in bytes from /proc/self/status (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def code_state() -> dict[str, Any]:
    """Which code ran: the commit, the files under director/ that differ from it, and digests of
    the decision-core sources as they were when this run imported them (read-only git calls)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {}
    for name in ("packet", "core", "conntrack", "isakmp_state"):
        data = (root / "director" / f"{name}.py").read_bytes()
        out[f"{name}.py"] = hashlib.sha256(data).hexdigest()[:12]
    try:
        git = ["git", "-C", str(root)]
        out["commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "director"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.split("\n")  # fmt: skip
        out["uncommitted"] = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.SubprocessError):
        out["commit"] = "unknown"
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


# -- the loops (module-level functions: locals only, nothing global in the timed body) -------------


def loop_noop(f, pkts, now):
    for p in pkts:
        f(p, now)


def loop_decide(decide, pkts, now):
    for p in pkts:
        decide(p, now)


def loop_classify(classify, pkts, error=PacketError):
    for p in pkts:
        try:
            classify(p)
        except error:
            pass


def loop_dict_slice(get, pkts):
    for p in pkts:
        get(p[12:20])


def loop_classify_dict(classify, get, pkts, error=PacketError):
    for p in pkts:
        try:
            c = classify(p)
        except error:
            continue
        get(c.src)


def loop_pairs(decide, pairs, now):
    for a, b in pairs:
        decide(a, now)
        decide(b, now)


def loop_keys_noop(f, keys):
    for c, spi in keys:
        f(SVC, c, spi)


def loop_keys(lookup, keys):
    for c, spi in keys:
        lookup(SVC, c, spi)


def loop_clients(head, clients):
    for c in clients:
        head(SVC, c)


def loop_naive_lookup(get, keys):
    for c, spi in keys:
        get((SVC, c, spi))


def loop_create(create, clients, spis, nows, rs_of):
    for i in range(len(clients)):
        create(SVC, clients[i], 500, spis[i], rs_of[i], nows[i])


def loop_touch(touch, slots, now):
    for s in slots:
        touch(s, now)


def loop_verdict(V, pkts, addr, fwd=Action.FORWARD, kind=Kind.ESP):
    for _ in pkts:
        V(fwd, kind, 0, SVC, 0, addr, 0)


def loop_forward(forward, svc, rs, pkts, kind=Kind.ESP):
    for _ in pkts:
        forward(svc, kind, rs)


def loop_enum(K, pkts):
    for _ in pkts:
        K.ESP


def loop_pick(pick, clients):
    for c in clients:
        pick(c, VIP)


def loop_pick_port(pick, clients):
    for c in clients:
        pick(c, VIP, c & 0xFFFF)


def _noop(*_a):
    return None


# -- report ----------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def out(self, line: str = "") -> None:
        print(line, flush=True)

    def section(self, title: str) -> None:
        self.out()
        self.out(f"== {title}")

    def rate(self, key: str, label: str, t: Timing, unit: str = "op", base: Timing | None = None,
             base_name: str = "") -> None:
        ratio = f"{t.best / base.best:6.2f}x {base_name}" if base else ""
        self.out(
            f"  {label:<50} {t.best * 1e9:9.0f} {t.median * 1e9:9.0f} ns/{unit:<5} "
            f"{t.rate:>11,.0f} {unit}/s  {ratio}"
        )  # fmt: skip
        self.results[key] = dict(t.as_dict(), unit=unit)

    def value(self, key: str, label: str, value: float, unit: str, fmt: str = ",.1f", note: str = "") -> None:
        self.out(f"  {label:<50} {value:>{'19' + fmt}} {unit:<10} {note}")
        self.results[key] = {"value": value, "unit": unit}

    def ratio(self, key: str, label: str, value: float, note: str = "") -> None:
        self.out(f"  {label:<50} {value:>19.2f}x          {note}")
        self.results[key] = {"ratio": value}

    def header(self) -> None:
        self.out(f"  {'':<50} {'best':>9} {'median':>9}")


# -- setup -----------------------------------------------------------------------------------------


def make_director(capacity: int, scheduler: str = "wlc") -> Director:
    """One service (DR), three real servers: the decision-core demo's setup."""
    d = Director(capacity=capacity)
    servers = {i: RealServer(id=i, addr=a, weight=1) for i, a in enumerate(RIPS)}
    d.add_service(Service(id=SVC, vip=VIP, scheduler_name=scheduler, method=Method.DR, servers=servers))
    return d


class Client:
    __slots__ = ("ip", "natt", "sport", "spi_i", "spi_r", "esp", "ike", "keepalive")


def establish_clients(d: Director, n: int, rng: random.Random, now: float) -> list[Client]:
    """n clients handshaken through ``decide``: even ones raw ESP on 500, odd ones NAT-T on 4500."""
    clients = []
    for i in range(n):
        c = Client()
        c.ip = CLIENT_BASE + i
        c.natt = bool(i & 1)
        c.spi_i, c.spi_r = rng.getrandbits(64) | 1, rng.getrandbits(64) | 1
        esp_spi = rng.getrandbits(32) | 1
        if c.natt:  # IKE_SA_INIT via the NAT from port P, IKE_AUTH floats to 4500 from port P2
            p = 1024 + (i % 30_000) * 2
            c.sport = p + 1
            first = craft.ike(c.ip, VIP, c.spi_i, sport=p)
            second = craft.ike(c.ip, VIP, c.spi_i, c.spi_r, sport=c.sport, natt=True)
            c.esp = craft.esp_in_udp(c.ip, VIP, esp_spi, sport=c.sport)
            c.ike = craft.ike(c.ip, VIP, c.spi_i, c.spi_r, sport=c.sport, natt=True, exchange=INFORMATIONAL)
            c.keepalive = craft.keepalive(c.ip, VIP, sport=c.sport)
        else:
            c.sport = 500
            first = craft.ike(c.ip, VIP, c.spi_i)
            second = craft.ike(c.ip, VIP, c.spi_i, c.spi_r)
            c.esp = craft.esp(c.ip, VIP, esp_spi)
            c.ike = craft.ike(c.ip, VIP, c.spi_i, c.spi_r, exchange=INFORMATIONAL)
            c.keepalive = None
        v1, v2 = d.decide(first, now), d.decide(second, now)
        if v1.action != Action.FORWARD or v2.action != Action.FORWARD or v1.rs != v2.rs:
            raise RuntimeError(f"setup: handshake of client {i} failed: {v1} {v2}")
        clients.append(c)
    if d.table.n_established != n:
        raise RuntimeError(f"setup: {d.table.n_established} established, expected {n}")
    return clients


def malformed_packets(rng: random.Random) -> list[bytes]:
    good_ike = craft.ike(CLIENT_BASE + 7, VIP, 0x1234)
    good_esp = craft.esp(CLIENT_BASE + 7, VIP, 0x99)
    bad = [
        good_ike[:30],  # truncated IKE (IP total length says more)
        good_ike[:28] + b"\x00" * 10,  # IKE header cut short (a truncated copy)
        craft.esp(CLIENT_BASE + 7, VIP, 0),  # zero SPI
        craft.ike(CLIENT_BASE + 7, VIP, 0),  # zero initiator SPI
        b"\x45" + b"\x00" * 5,  # truncated IP
        b"",
        b"\x60" + good_esp[1:],  # IPv6 version nibble
        good_esp[:22],  # truncated ESP
    ]
    bad += [rng.randbytes(rng.randrange(1, 120)) for _ in range(8)]  # garbage
    return bad


def build_mix(clients: list[Client], length: int, fresh_ip: int, rng: random.Random,
              bad: list[bytes]) -> tuple[list[bytes], int]:
    """A shuffled list with the MIX proportions; initial IKE from clients fresh_ip, fresh_ip+1, ..."""
    raw = [c for c in clients if not c.natt]
    natt = [c for c in clients if c.natt]
    counts = {k: round(f * length) for k, f in MIX.items()}
    counts["esp"] += length - sum(counts.values())
    pkts: list[bytes] = []
    pkts += [rng.choice(raw).esp for _ in range(counts["esp"])]
    pkts += [rng.choice(natt).esp for _ in range(counts["esp_udp"])]
    pkts += [rng.choice(clients).ike for _ in range(counts["ike"])]
    pkts += [rng.choice(natt).keepalive for _ in range(counts["keepalive"])]
    pkts += [rng.choice(bad) for _ in range(counts["malformed"])]
    for j in range(counts["ike_initial"]):
        pkts.append(craft.ike(fresh_ip + j, VIP, rng.getrandbits(64) | 1))
    rng.shuffle(pkts)
    return pkts, counts["ike_initial"]


# -- section a -------------------------------------------------------------------------------------


def section_a(rep: Report, z: dict, repeats: int, rng: random.Random) -> None:
    rep.section(f"a. parse + classify + lookup, realistic mix ({z['clients']:,} established clients, "
                f"{z['mix']:,} packets per list)")  # fmt: skip
    n_lists = repeats + 1  # one extra list for the untimed sanity pass
    capacity = 2 * z["clients"] + n_lists * int(MIX["ike_initial"] * z["mix"] + 1) + 2 * sum(CROWD) + 1024
    d = make_director(capacity)
    t_setup, clients = once(lambda: establish_clients(d, z["clients"], rng, 0.0))
    bad = malformed_packets(rng)
    fresh = CLIENT_BASE + z["clients"] + 1000
    lists = []
    for _ in range(n_lists):
        pkts, n_new = build_mix(clients, z["mix"], fresh, rng, bad)
        fresh += n_new
        lists.append(pkts)
    n = z["mix"]

    # untimed sanity pass on the spare list: what the director decides for this mix
    verdicts = Counter(d.decide(p, 1.0).action.name for p in lists[-1])
    share = ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in verdicts.most_common())
    rep.out(f"  setup: {z['clients']:,} handshakes in {t_setup:.2f} s; verdicts on the mix: {share}")
    rep.results["a.verdicts"] = dict(verdicts)

    only_esp = [rng.choice(clients).esp for _ in range(n)]
    only_ike = [rng.choice(clients).ike for _ in range(n)]
    keys = {c.ip.to_bytes(4, "big") + VIP.to_bytes(4, "big"): i % 3 for i, c in enumerate(clients)}
    by_src = {c.ip: i % 3 for i, c in enumerate(clients)}
    same = lists[0]

    clock = iter(range(1, 1 << 30))  # now = 1 s + 1 ms per timed loop: never goes back

    def now() -> float:
        return 1.0 + next(clock) * 0.001

    # the baselines and the decides, repeats interleaved so that a noisy spell hits them all alike;
    # each decide(mix) repeat gets its own list: its initial IKE comes from never-seen clients
    specs = {
        "floor": (loop_noop, n, lambda r: (_noop, same, 1.0)),
        "classify": (loop_classify, n, lambda r: (classify, same)),
        "dict": (loop_dict_slice, n, lambda r: (keys.get, same)),
        "classify_dict": (loop_classify_dict, n, lambda r: (classify, by_src.get, same)),
        "decide_mix": (loop_decide, n, lambda r: (d.decide, lists[r], now())),
        "decide_esp": (loop_decide, n, lambda r: (d.decide, only_esp, now())),
        "decide_ike": (loop_decide, n, lambda r: (d.decide, only_ike, now())),
    }
    m = measure_many(specs, repeats)
    floor, cls, dct, cd, mix, esp, ike = m.values()
    rep.header()
    rep.rate("a.floor", "(i) baseline: empty loop calling a no-op", floor, "pkt")
    rep.rate("a.classify", "(ii) baseline: classify() alone", cls, "pkt", floor, "floor")
    rep.rate("a.dict", "(iii) baseline: dict.get(pkt[12:20])", dct, "pkt", floor, "floor")
    rep.rate("a.classify_dict", "(iv) baseline: classify() + dict.get(src)", cd, "pkt", floor, "floor")
    rep.rate("a.decide_mix", "Director.decide, realistic mix", mix, "pkt", floor, "floor")
    rep.rate("a.decide_esp", "Director.decide, ESP only (raw + in UDP, 50/50)", esp, "pkt", floor, "floor")
    rep.rate("a.decide_ike", "Director.decide, IKE only (non-initial, established)", ike, "pkt", floor,
             "floor")  # fmt: skip
    rep.out("  ratios (cost per packet, best of each):")
    rep.ratio("a.ratio_decide_floor", "decide(mix) / interpreter floor", mix.best / floor.best)
    rep.ratio("a.ratio_decide_classify", "decide(mix) / classify alone", mix.best / cls.best)
    rep.ratio("a.ratio_decide_dict", "decide(mix) / dict.get(slice)", mix.best / dct.best)
    rep.ratio("a.ratio_decide_classify_dict", "decide(mix) / classify + dict.get", mix.best / cd.best)
    rep.ratio("a.ratio_esp_classify", "decide(ESP) / classify alone", esp.best / cls.best)
    rep.ratio("a.ratio_ike_classify", "decide(IKE) / classify alone", ike.best / cls.best)

    # where one raw ESP packet's time goes: decide's parts, each alone (a yardstick for fixes)
    raw = [c for c in clients if not c.natt]
    picks = [rng.choice(raw) for _ in range(n)]
    raw_esp = [c.esp for c in picks]
    ips = [c.ip for c in picks]
    slots = [d.table.client_head(SVC, ip) for ip in ips]
    svc, rs0 = d.services[SVC], d.services[SVC].servers[0]
    labels = {
        "decide": "  decide(raw ESP)",
        "classify": "    classify(raw ESP)",
        "lookup": "    table.established_of_client",
        "touch": "    table.touch (refresh the entry)",
        "forward": "    Director._forward (builds the Verdict)",
        "verdict": "    Verdict(...) construction alone",
        "enum": "    one enum attribute load (Kind.ESP)",
    }
    parts = measure_many({
        "decide": (loop_decide, n, lambda r: (d.decide, raw_esp, now())),
        "classify": (loop_classify, n, lambda r: (classify, raw_esp)),
        "lookup": (loop_clients, n, lambda r: (d.table.established_of_client, ips)),
        "touch": (loop_touch, n, lambda r: (d.table.touch, slots, now())),
        "forward": (loop_forward, n, lambda r: (d._forward, svc, rs0, raw_esp)),
        "verdict": (loop_verdict, n, lambda r: (Verdict, raw_esp, rs0.addr)),
        "enum": (loop_enum, n, lambda r: (Kind, raw_esp)),
    }, repeats)  # fmt: skip
    rep.out("  one raw ESP packet: decide, and its parts each alone (each includes the loop floor):")
    for key, t in parts.items():
        if key == "decide":
            rep.rate("a.esp_raw_decide", labels[key], t, "pkt", floor, "floor")
        else:
            rep.rate(f"a.esp_part_{key}", labels[key], t, "pkt", parts["decide"], "decide")

    # a client's ESP when the client also has k INIT entries newer than its ESTABLISHED one (initial
    # IKE with fresh cookies from its address: retries, or a spoofer): the ESP lookup walks the
    # client's entries newest first, so its cost grows with k
    rep.out("  raw ESP of a client that also has k newer INIT entries (initial IKE, fresh cookies, its IP):")
    victim_ip = CLIENT_BASE + 0x300000
    crowd_specs: dict[str, Spec] = {}
    for j, k in enumerate(CROWD):
        ip = victim_ip + j
        spi_i = rng.getrandbits(64) | 1
        d.decide(craft.ike(ip, VIP, spi_i), now())
        d.decide(craft.ike(ip, VIP, spi_i, rng.getrandbits(64) | 1), now())
        for _ in range(k):
            if d.decide(craft.ike(ip, VIP, rng.getrandbits(64) | 1), now()).action != Action.FORWARD:
                raise RuntimeError("section a: an initial IKE packet was not forwarded")
        m = max(200, n // (1 + k))
        pkts = [craft.esp(ip, VIP, 0x1000 + j)] * m
        crowd_specs[str(k)] = (loop_decide, m, lambda r, pkts=pkts: (d.decide, pkts, now()))
    crowd = measure_many(crowd_specs, repeats)
    k0 = crowd[str(CROWD[0])]
    for k in CROWD:
        rep.rate(f"a.esp_behind_{k}_init", f"    decide(raw ESP), k = {k:,}", crowd[str(k)], "pkt", k0, f"k = {CROWD[0]}")
    kmax = CROWD[-1]
    step = (crowd[str(kmax)].best - k0.best) / kmax
    rep.value("a.esp_walk_ns_per_init", "    cost per newer INIT entry walked", step * 1e9, "ns", ",.0f",
              "(O(k) per ESP packet)")  # fmt: skip


# -- section b -------------------------------------------------------------------------------------


def section_b(rep: Report, z: dict, repeats: int, rng: random.Random) -> None:
    n = z["entries"]
    capacity = n + n // 2
    rep.section(f"b. new ISAKMP entries: initial IKE from {n:,} distinct clients "
                f"(capacity {capacity:,}, wlc, 3 real servers)")  # fmt: skip
    base = CLIENT_BASE + 0x100000
    initials = [craft.ike(base + i, VIP, rng.getrandbits(64) | 1) for i in range(n)]
    reps_b = max(2, repeats - 2)  # a fresh Director per repeat

    def fresh(r: int) -> tuple:
        return make_director(capacity).decide, initials, 1.0

    rep.header()
    t_new = measure(loop_decide, n, reps_b, fresh)
    rep.rate("b.new_entries", "new entries: decide(initial IKE), table 0 -> N", t_new, "entry")
    d = make_director(capacity)
    loop_decide(d.decide, initials, 1.0)
    made = len(d.table)
    if made != n or d.table.n_init != n:
        raise RuntimeError(f"section b: {made} entries after {n} initial packets")
    # the same, split: the first and last quarter of the fill (flat if creation is O(1))
    q = n // 4

    def last_quarter(r: int) -> tuple:
        dd = make_director(capacity)
        loop_decide(dd.decide, initials[: n - q], 1.0)
        return dd.decide, initials[n - q :], 1.0

    quarters = measure_many({
        "first": (loop_decide, q, lambda r: (make_director(capacity).decide, initials[:q], 1.0)),
        "last": (loop_decide, q, last_quarter),
    }, reps_b)  # fmt: skip
    first_q, last_q = quarters["first"], quarters["last"]
    rep.rate("b.new_first_quarter", "  first quarter of the fill", first_q, "entry")
    rep.rate("b.new_last_quarter", "  last quarter of the fill", last_q, "entry", first_q, "first quarter")

    # breakdown: the parts of one new entry, each alone
    sched = d.services[SVC].scheduler
    clients = list(range(base, base + n))
    pick = measure(loop_pick, n, repeats, lambda r: (sched.pick, clients))
    rep.rate("b.pick", "  part: scheduler.pick (wlc, 3 servers) alone", pick, "entry")
    cls = measure(loop_classify, n, repeats, lambda r: (classify, initials))
    rep.rate("b.classify", "  part: classify(initial IKE) alone", cls, "entry")
    spis = [rng.getrandbits(64) | 1 for _ in range(n)]
    nows = [1.0] * n
    rs_of = [i % 3 for i in range(n)]
    create = measure(loop_create, n, reps_b, lambda r: (Table(capacity).create, clients, spis, nows, rs_of))
    rep.rate("b.table_create", "  part: Table.create alone", create, "entry")

    # handshakes: initial, then the initiator's second message (responder SPI echoed)
    m = z["handshakes"]
    hbase = CLIENT_BASE + 0x200000
    pairs = []
    for i in range(m):
        spi_i, spi_r = rng.getrandbits(64) | 1, rng.getrandbits(64) | 1
        pairs.append((craft.ike(hbase + i, VIP, spi_i), craft.ike(hbase + i, VIP, spi_i, spi_r)))
    hs = measure(loop_pairs, m, reps_b, lambda r: (make_director(m + m // 2).decide, pairs, 1.0))
    rep.rate("b.handshakes", f"handshakes ({m:,}): initial + second, to ESTABLISHED", hs, "hs")
    dh = make_director(m + m // 2)
    loop_pairs(dh.decide, pairs, 1.0)
    if dh.table.n_established != m:
        raise RuntimeError(f"section b: {dh.table.n_established} established after {m} handshakes")

    # a flood into a full table: every new entry first reclaims the oldest INIT one (drop-entry)
    cap_full = n // 4

    def full(r: int) -> tuple:
        dd = make_director(cap_full)
        loop_decide(dd.decide, initials[:cap_full], 1.0)
        return dd.decide, initials[cap_full : 2 * cap_full], 2.0

    fl = measure(loop_decide, cap_full, reps_b, full)
    rep.rate("b.new_when_full", f"new entries into a full table ({cap_full:,}, reclaim INIT)", fl, "entry",
             t_new, "table 0 -> N")  # fmt: skip
    rep.out("  against the target:")
    ok = t_new.rate >= TARGET_ENTRIES_PER_S
    rep.ratio("b.ratio_target", f"new entries/s / {TARGET_ENTRIES_PER_S:,} (target)",
              t_new.rate / TARGET_ENTRIES_PER_S, "MET" if ok else "MISSED")  # fmt: skip
    rep.ratio("b.ratio_new_classify", "new entry / classify alone", t_new.best / cls.best)
    rep.ratio("b.ratio_new_create", "new entry / Table.create alone", t_new.best / create.best)


# -- section c -------------------------------------------------------------------------------------


class Layout:
    """The inputs that fill a table with n entries so that exactly k INIT entries are due per tick.

    Entry i: client CLIENT_BASE + i (so every key is distinct) and a random initiator cookie.
    Even entries are created at now_i = i / (2k) s and established at once; odd ones are created
    at ``init_t0`` + i / (2k) s and stay INIT. Between the two, ``expire(init_t0 - 1)`` runs: the
    lazy wheel refiles the established entries out of the INIT-timeout buckets they were filed
    in, so that later every INIT-timeout bucket holds exactly k INIT entries and nothing else.
    With the default timeouts (INIT 30 s, ESTABLISHED 4.5 h) and 1 s ticks, the INIT entries
    created in second s after ``init_t0`` are due in tick init_t0 + s + 31.
    """

    def __init__(self, n: int, k: int, rng: random.Random) -> None:
        self.n, self.k = n, k
        self.clients = list(range(CLIENT_BASE, CLIENT_BASE + n))
        self.spis = [rng.getrandbits(64) | 1 for _ in range(n)]
        self.span = (n - 1) / (2 * k)  # simulated seconds each half of the fill covers
        self.init_t0 = float(int(self.span) + 40)
        self.nows = [i / (2 * k) + (self.init_t0 if i & 1 else 0.0) for i in range(n)]
        self.rs_of = [i % 3 for i in range(n)]

    def fill(self, t: Table, chunk: int = 8192) -> tuple[float, float]:
        """Fill ``t``; returns (seconds in create, seconds in establish).

        In chunks, so that the harness holds only a few thousand slot numbers at a time (they
        would otherwise show in the tracemalloc peak); the refiling expire() is untimed.
        """
        create, establish = t.create, t.establish
        clients, spis, nows, rs_of = self.clients, self.spis, self.nows, self.rs_of
        t_create = t_establish = 0.0
        for lo in range(0, self.n, 2 * chunk):
            ev = slice(lo, min(lo + 2 * chunk, self.n), 2)
            t0 = time.perf_counter()
            est = [create(SVC, c, 500, spi, rs, now) for c, spi, rs, now in
                   zip(clients[ev], spis[ev], rs_of[ev], nows[ev])]  # fmt: skip
            t1 = time.perf_counter()
            for s, spi, now in zip(est, spis[ev], nows[ev]):
                establish(s, spi ^ 0x5A5A5A5A5A5A5A5A | 1, now)
            t_create += t1 - t0
            t_establish += time.perf_counter() - t1
        if t.expire(self.init_t0 - 1.0) != 0:
            raise RuntimeError("section c: an ESTABLISHED entry expired during the fill")
        for lo in range(1, self.n, 2 * chunk):
            od = slice(lo, min(lo + 2 * chunk, self.n), 2)
            t0 = time.perf_counter()
            for c, spi, rs, now in zip(clients[od], spis[od], rs_of[od], nows[od]):
                create(SVC, c, 500, spi, rs, now)
            t_create += time.perf_counter() - t0
        return t_create, t_establish


def rss_probe(n: int, k: int, seed: int) -> dict[str, int | None]:
    """In a fresh interpreter (nothing freed before, so no reused heap): VmRSS around a fill."""
    lay = Layout(n, k, random.Random(seed))
    gc.collect()
    rss0 = vm_rss()
    t = Table(capacity=n)
    rss1 = vm_rss()
    lay.fill(t)
    gc.collect()
    rss2 = vm_rss()
    if len(t) != n:
        raise RuntimeError("rss probe: table not full")
    return {"before": rss0, "constructed": rss1, "filled": rss2}


def rss_in_subprocess(n: int, k: int, seed: int) -> dict[str, int | None] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-probe", f"{n},{k},{seed}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        print(f"  (RSS cross-check failed: {e})")
        return None


def probe_lengths(index, keys: list[bytes]) -> float:
    """Mean buckets visited by a successful find in an open-addressing index (read only)."""
    mask, slots, kb, k = index.mask, index.slots, index.keys, index.klen
    total = 0
    for key in keys:
        b = hash(key) & mask
        probes = 1
        while slots[b] >= 0 and kb[b * k : b * k + k] != key:
            b = (b + 1) & mask
            probes += 1
        total += probes
    return total / len(keys)


def fresh_int(x: int) -> int:
    return int.from_bytes(x.to_bytes(8, "big"), "big")  # a new object, never the stored one


def fresh_keys(lay: Layout, idx: list[int]) -> list[tuple[int, int]]:
    """(client, cookie) of entries ``idx`` as new objects, allocated in the order they are used.

    A packet's fields are new, cache-hot ints; reusing the ints the fill made (scattered over
    the heap in fill order) would add the harness's own cache misses to every lookup at 1M.
    """
    return [(fresh_int(lay.clients[i]), fresh_int(lay.spis[i])) for i in idx]


def lookup_specs(name: str, t: Table, lay: Layout, z: dict, rng: random.Random) -> dict[str, Spec]:
    m = min(z["lookups"], lay.n)
    idx = rng.sample(range(lay.n), m)
    hits = fresh_keys(lay, idx)
    misses = [(CLIENT_BASE + lay.n + 17 + j, rng.getrandbits(64) | 1) for j in range(m)]
    clients = [fresh_int(c) for c, _ in hits]
    for i, c in zip(idx[:50], clients[:50]):  # sanity: lookups find what was put in
        if t.lookup(SVC, c, lay.spis[i]) != t.client_head(SVC, c) or t.lookup(SVC, c, lay.spis[i]) < 0:
            raise RuntimeError("section c: lookup does not find an entry it holds")
    return {
        f"{name}.floor": (loop_keys_noop, m, lambda r: (_noop, hits)),
        f"{name}.hit": (loop_keys, m, lambda r: (t.lookup, hits)),
        f"{name}.miss": (loop_keys, m, lambda r: (t.lookup, misses)),
        f"{name}.client": (loop_clients, m, lambda r: (t.client_head, clients)),
    }


def expire_due(tables: dict[str, tuple[Table, Layout]]) -> dict[str, Timing]:
    """Expiry with entries due (see Layout), the tables' steps interleaved; per expired entry."""
    steps = 5
    for t, lay in tables.values():
        if t.expire(lay.init_t0 + 29.5) != 0:  # nothing due yet: the wheel up to just before the first
            raise RuntimeError("section c: entries expired before their time")
        if int(lay.span) < steps + 30 + 2:
            raise RuntimeError("section c: the layout spans too few ticks")
    one: dict[str, list[float]] = {name: [] for name in tables}
    ten: dict[str, list[float]] = {name: [] for name in tables}
    for j in range(steps):  # one tick each: k INIT entries due
        for name, (t, lay) in tables.items():
            tick = lay.init_t0 + 31 + j
            dt, gone = once(lambda: t.expire(tick), collect=False)
            if gone != lay.k:
                raise RuntimeError(f"section c: expected {lay.k} due at tick {tick}, {gone} expired")
            one[name].append(dt / gone)
    for j in range(3):  # ten ticks at once: 10 k due, the same cost per entry if proportional
        for name, (t, lay) in tables.items():
            tick = lay.init_t0 + 31 + steps + 10 * j + 9
            dt, gone = once(lambda: t.expire(tick), collect=False)
            if gone != 10 * lay.k:
                raise RuntimeError(f"section c: expected {10 * lay.k} due by tick {tick}, {gone} expired")
            ten[name].append(dt / gone)
    for t, lay in tables.values():  # drain the rest of the INIT entries; then nothing is due for hours
        t.expire(lay.init_t0 + 31 + int(lay.span) + 2)
        if t.n_init != 0:
            raise RuntimeError(f"section c: {t.n_init} INIT entries left after their timeout")
    out = {}
    for name in tables:
        out[f"{name}.one_tick"] = Timing(1, one[name])
        out[f"{name}.ten_ticks"] = Timing(1, ten[name])
    return out


def expire_idle(tables: dict[str, tuple[Table, Layout]], repeats: int) -> dict[str, Timing]:
    """expire() with nothing due, one empty tick per call, tables interleaved; then the same tick."""
    start = max(int(lay.init_t0 + lay.span) + 40 for _, lay in tables.values())
    calls = max(50, min(500, (3800 - start) // repeats))  # stay clear of the ESTABLISHED buckets
    times: dict[str, list[float]] = {name: [] for name in tables}
    for r in range(repeats):
        for name, (t, _) in tables.items():
            ticks = [float(start + r * calls + i) for i in range(calls)]
            gc.collect()
            t0 = time.perf_counter()
            for now in ticks:
                if t.expire(now):
                    raise RuntimeError("section c: an entry expired in an empty tick")
            times[name].append(time.perf_counter() - t0)
    out = {f"{name}.empty_tick": Timing(calls, times[name]) for name in tables}
    for name, (t, _) in tables.items():
        now = float(start + repeats * calls)
        out[f"{name}.same_tick"] = measure(lambda e, reps: [e(now) for _ in range(reps)], calls, repeats,
                                           lambda r: (t.expire, calls))  # fmt: skip
    return out


def expire_refile(t: Table, lay: Layout, repeats: int) -> Timing | None:
    """The lazy wheel's revolution: a bucket of ESTABLISHED entries due in 4.5 h comes round.

    Every wheel_size ticks each bucket is visited; its entries that are not due are refiled and
    none expires. Timed over ``repeats`` consecutive buckets; per refiled entry.
    """
    est = t.timeouts(SVC).established
    per_tick = Counter(int(lay.nows[i] + est) + 1 for i in range(0, lay.n, 2))
    first = int(lay.nows[0] + est) + 1
    bucket_tick = first & t._wheel_mask  # the first time that bucket comes round
    if bucket_tick <= t._now_tick + 1:
        return None
    t.expire(bucket_tick - 1.0)
    n_est, times = t.n_established, []
    for j in range(repeats):
        dt, gone = once(lambda: t.expire(float(bucket_tick + j)), collect=False)
        if gone or t.n_established != n_est:
            raise RuntimeError("section c: an ESTABLISHED entry expired early")
        times.append(dt / max(1, per_tick[first + j]))
    return Timing(1, times)


def section_c(rep: Report, z: dict, repeats: int, rng: random.Random, naive: bool, seed: int) -> None:
    n, k = z["table"], z["k"]
    rep.section(f"c. the table at {n:,} entries (half ESTABLISHED), {k:,} INIT entries due per 1 s tick")
    lay = Layout(n, k, rng)
    gc.collect()

    # 1. timing pass (no tracing): construct, fill (timed), then lookups and expiry on this table
    t0 = time.perf_counter()
    t = Table(capacity=n)
    t_construct = time.perf_counter() - t0
    gc.collect()
    t_create, t_establish = lay.fill(t)
    if len(t) != n or t.n_established != n // 2 + n % 2:
        raise RuntimeError(f"section c: {len(t)} entries, {t.n_established} established after the fill")
    rep.out(f"  {'':<50} {'value':>19} unit")
    rep.value("c.construct_s", f"construct Table(capacity={n:,})", t_construct, "s", ",.3f")
    rep.value("c.fill_create_s", f"fill: {n:,} x create", t_create, "s", ",.2f",
              f"= {n / t_create:,.0f} entries/s")  # fmt: skip
    rep.value("c.fill_establish_s", f"fill: {n // 2:,} x establish", t_establish, "s", ",.2f",
              f"= {(n // 2) / t_establish:,.0f} /s")  # fmt: skip

    # 2. lookups at n against a small table of the same layout, repeats interleaved
    ns = z["small"]
    small_lay = Layout(ns, max(1, ns // 100), random.Random(seed + 1))
    st = Table(capacity=ns)
    small_lay.fill(st)
    lk = measure_many({**lookup_specs("big", t, lay, z, rng), **lookup_specs("small", st, small_lay, z, rng)},
                      repeats)  # fmt: skip
    sample = [struct_key(lay.clients[i], lay.spis[i]) for i in rng.sample(range(n), min(20_000, n))]
    probes = probe_lengths(t._by_cookie, sample)
    load = t._by_cookie.size / (t._by_cookie.mask + 1)
    rep.header()
    rep.rate("c.lookup_floor", "baseline: empty loop calling a no-op(svc, c, spi)", lk["big.floor"], "op")
    rep.rate("c.lookup_hit", f"lookup(svc, client, cookie), hit, at {n:,}", lk["big.hit"], "op",
             lk["big.floor"], "floor")  # fmt: skip
    rep.rate("c.lookup_hit_small", f"lookup, hit, at {ns:,}", lk["small.hit"], "op", lk["small.floor"], "floor")
    rep.rate("c.lookup_miss", f"lookup, miss, at {n:,}", lk["big.miss"], "op", lk["big.floor"], "floor")
    rep.rate("c.lookup_miss_small", f"lookup, miss, at {ns:,}", lk["small.miss"], "op", lk["small.floor"],
             "floor")  # fmt: skip
    rep.rate("c.client_head", f"client_head(svc, client) (raw ESP path), at {n:,}", lk["big.client"], "op",
             lk["big.floor"], "floor")  # fmt: skip
    rep.ratio("c.ratio_lookup_big_small", f"lookup hit at {n:,} / at {ns:,}",
              lk["big.hit"].best / lk["small.hit"].best, "O(1): ~1, plus cache misses")  # fmt: skip
    rep.ratio("c.ratio_lookup_miss_big_small", f"lookup miss at {n:,} / at {ns:,}",
              lk["big.miss"].best / lk["small.miss"].best)  # fmt: skip
    small_load = st._by_cookie.size / (st._by_cookie.mask + 1)
    rep.value("c.cookie_index_load", "cookie index load factor", load, "", ",.3f", f"(small table: {small_load:.3f})")
    rep.value("c.cookie_index_probes", "cookie index: mean buckets per successful find", probes, "", ",.2f",
              f"(linear probing theory at this load: {0.5 * (1 + 1 / (1 - load)):.2f})")  # fmt: skip

    naive_timing = None
    if naive:  # c': the naive design's lookups, interleaved with ours (printed in c')
        t_naive_fill, maps = once(lambda: naive_fill(lay))
        m = min(z["lookups"], n)
        hits = fresh_keys(lay, rng.sample(range(n), m))
        naive_timing = (t_naive_fill, measure_many({
            "ours": (loop_keys, m, lambda r: (t.lookup, hits)),
            "naive": (loop_naive_lookup, m, lambda r: (maps[0].get, hits)),
        }, repeats))  # fmt: skip
        del maps
        gc.collect()

    # 3. expiry
    tables = {"big": (t, lay), "small": (st, small_lay)}
    ex = {**expire_due(tables), **expire_idle(tables, repeats)}
    refile = expire_refile(t, lay, repeats)
    rep.header()
    one = ex["big.one_tick"]
    rep.rate("c.expire_one_tick", f"expire(), one tick, {k:,} due: per expired entry", one, "entry")
    rep.rate("c.expire_ten_ticks", f"expire(), ten ticks, {10 * k:,} due: per expired entry",
             ex["big.ten_ticks"], "entry", one, "one tick")  # fmt: skip
    rep.rate("c.expire_small", f"expire(), table of {ns:,}, one tick, {small_lay.k:,} due: per entry",
             ex["small.one_tick"], "entry", one, f"at {n:,}")  # fmt: skip
    rep.rate("c.expire_empty_tick", f"expire(), nothing due, one empty tick, at {n:,}", ex["big.empty_tick"],
             "call")  # fmt: skip
    rep.rate("c.expire_empty_tick_small", f"expire(), nothing due, one empty tick, at {ns:,}",
             ex["small.empty_tick"], "call", ex["big.empty_tick"], f"at {n:,}")  # fmt: skip
    rep.rate("c.expire_same_tick", f"expire(), same tick again, at {n:,}", ex["big.same_tick"], "call")
    if refile is not None:
        rep.rate("c.expire_refile", f"expire(), {k:,} ESTABLISHED not yet due: per refile", refile, "entry",
                 one, "expiry")  # fmt: skip
    rep.ratio("c.ratio_expire_ten_one", "per-entry expiry cost, 10 ticks / 1 tick",
              ex["big.ten_ticks"].best / one.best, "proportional: ~1")  # fmt: skip
    rep.ratio("c.ratio_expire_big_small", f"per-entry expiry cost at {n:,} / at {ns:,}",
              one.best / ex["small.one_tick"].best, "~1, plus cache misses")  # fmt: skip
    rep.ratio("c.ratio_expire_empty_big_small", f"empty-tick expire() at {n:,} / at {ns:,}",
              ex["big.empty_tick"].best / ex["small.empty_tick"].best, "no table scan: ~1")  # fmt: skip
    del t, st
    gc.collect()

    # 4. tracemalloc pass: the table object only (tracing starts just before it is constructed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = Table(capacity=n)
    after_construct = tracemalloc.get_traced_memory()[0] - base
    lay.fill(t)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    current -= base
    peak -= base
    bpe = current / n
    rep.value("c.tracemalloc_construct_bytes_per_entry", "tracemalloc: after construct / capacity",
              after_construct / n, "B/entry")  # fmt: skip
    rep.value("c.tracemalloc_bytes_per_entry", f"tracemalloc: current after fill / {n:,}", bpe, "B/entry", ",.1f",
              "MET (<= 300)" if bpe <= TARGET_BYTES_PER_ENTRY else "MISSED (> 300)")  # fmt: skip
    rep.value("c.tracemalloc_peak_bytes_per_entry", "tracemalloc: peak during construct+fill / entries",
              peak / n, "B/entry")  # fmt: skip
    rep.value("c.table_mib", "table size (tracemalloc current)", current / 2**20, "MiB")
    rep.ratio("c.ratio_target_bytes", f"bytes/entry / {TARGET_BYTES_PER_ENTRY} (target)",
              bpe / TARGET_BYTES_PER_ENTRY, "MET" if bpe <= TARGET_BYTES_PER_ENTRY else "MISSED")  # fmt: skip
    del t
    gc.collect()
    # 5. cross-check: VmRSS around construct and fill, in a fresh interpreter
    rss = rss_in_subprocess(n, k, seed)
    if rss and None not in rss.values():
        rep.value("c.rss_construct_bytes_per_entry", "VmRSS delta after construct / capacity",
                  (rss["constructed"] - rss["before"]) / n, "B/entry", ",.1f",
                  "(every column and index is written at construction)")  # fmt: skip
        rep.value("c.rss_bytes_per_entry", "VmRSS delta after fill / entries", (rss["filled"] - rss["before"]) / n,
                  "B/entry", ",.1f", "(fresh interpreter)")  # fmt: skip

    if naive:
        section_c_naive(rep, lay, bpe, naive_timing)


def struct_key(client: int, spi: int) -> bytes:
    from director.conntrack import _COOKIE_KEY

    return _COOKIE_KEY.pack(SVC, client >> 64, client & ((1 << 64) - 1), spi)


class NaiveEntry:
    """What a first design might hold per conversation (comparison only, not our code)."""

    __slots__ = ("svc", "client", "cport", "spi_i", "spi_r", "state", "rs", "flags", "retrans",
                 "created", "expires")  # fmt: skip

    def __init__(self, svc, client, cport, spi_i, rs, now, expires):
        self.svc, self.client, self.cport, self.spi_i, self.spi_r = svc, client, cport, spi_i, 0
        self.state, self.rs, self.flags, self.retrans = State.INIT, rs, 0, 0
        self.created, self.expires = now, expires


def naive_fill(lay: Layout) -> tuple[dict, dict, dict]:
    by_cookie, by_client, by_natt = {}, {}, {}
    for i in range(lay.n):
        c, spi, now = lay.clients[i], lay.spis[i], lay.nows[i]
        e = NaiveEntry(SVC, c, 500, spi, lay.rs_of[i], now, now + 30.0)
        if not i & 1:
            e.state, e.spi_r, e.expires = State.ESTABLISHED, spi ^ 0x5A5A5A5A5A5A5A5A | 1, now + 16200.0
        by_cookie[(SVC, c, spi)] = e
        by_client[(SVC, c)] = e
        by_natt[(SVC, c, 500)] = e
    return by_cookie, by_client, by_natt


def section_c_naive(rep: Report, lay: Layout, ours: float, timing: tuple[float, dict[str, Timing]] | None) -> None:
    rep.section(f"c'. COMPARISON ONLY, not our code: a naive table of {lay.n:,} slotted objects in three dicts")
    rep.out("  (dict (svc, client, cookie) -> object, plus dicts by (svc, client) and (svc, client, port);")
    rep.out("   no timer wheel or FIFO lists, so it holds less than ours; key ints shared with the objects)")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    maps = naive_fill(lay)
    current = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del maps
    gc.collect()
    bpe = current / lay.n
    rep.value("c_naive.tracemalloc_bytes_per_entry", "naive: tracemalloc current / entries", bpe, "B/entry")
    rep.ratio("c_naive.ratio_naive_ours", "naive bytes/entry / ours", bpe / ours)
    if timing is None:
        return
    t_fill, lk = timing
    rep.value("c_naive.fill_s", "naive: fill (untraced)", t_fill, "s", ",.2f", f"= {lay.n / t_fill:,.0f} entries/s")
    rep.header()
    rep.rate("c_naive.lookup_hit_ours", f"ours: lookup(svc, client, cookie), hit, at {lay.n:,}", lk["ours"], "op")
    rep.rate("c_naive.lookup_hit", f"naive: dict.get((svc, client, cookie)), hit, at {lay.n:,}", lk["naive"], "op",
             lk["ours"], "ours")  # fmt: skip
    rep.ratio("c_naive.ratio_ours_naive_lookup", "our lookup / naive dict lookup", lk["ours"].best / lk["naive"].best)


# -- main ------------------------------------------------------------------------------------------


def section_s(rep: Report, z: dict, repeats: int, rng: random.Random) -> None:
    """Each scheduler's pick alone: the part of a new entry that the scheduler costs."""
    n = z["clients"] * 20
    clients = [CLIENT_BASE + i for i in range(n)]
    rep.out()
    rep.out(f"s. scheduler.pick alone, {n:,} distinct clients (ns per pick; ratio against wlc)")

    def servers(k: int) -> list[RealServer]:
        out = []
        for i in range(k):
            rs = RealServer(id=i, addr=RIPS[0] + i, weight=1 + i % 3)
            rs.active, rs.inactive = rng.randrange(1000), rng.randrange(100)
            out.append(rs)
        return out

    for k in (3, 10):
        srv = servers(k)
        specs: dict[str, Spec] = {}
        for name in sorted(SCHEDULERS):
            sch = make_scheduler(name, **({"table_size": 65537} if name == "mh" else {}))
            sch.update(srv)
            specs[name] = (loop_pick_port, n, lambda r, sch=sch: (sch.pick, clients))
        down = [RealServer(id=i, addr=r.addr, weight=r.weight) for i, r in enumerate(srv)]
        sch = make_scheduler("mh")
        sch.update(down)
        down[0].up = False  # its clients (about 1/k of them) probe further slots
        specs["mh, one server down"] = (loop_pick_port, n, lambda r, sch=sch: (sch.pick, clients))
        sch_port = make_scheduler("mh", port=True)
        sch_port.update(srv)
        specs["mh, port"] = (loop_pick_port, n, lambda r, sch=sch_port: (sch.pick, clients))
        got = measure_many(specs, repeats)
        for name, t in got.items():
            rep.rate(f"s.pick.{k}.{name}", f"{name} ({k} servers)", t, "pick", got["wlc"], "wlc")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes ~10x smaller (a smoke run, ~20 s)")
    ap.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    ap.add_argument("--repeats", type=int, help="repeats per measurement (default 5, quick 3)")
    ap.add_argument("--no-naive", action="store_true", help="skip c' (the naive-table comparison)")
    ap.add_argument("--sections", default="abcs", help="which sections to run (default abcs)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--rss-probe", metavar="N,K,SEED", help=argparse.SUPPRESS)  # internal: section c
    args = ap.parse_args(argv)
    if args.rss_probe:
        n, k, seed = (int(x) for x in args.rss_probe.split(","))
        print(json.dumps(rss_probe(n, k, seed)))
        return 0
    mode = "quick" if args.quick else "full"
    z = dict(SIZES[mode])
    repeats = args.repeats or z["repeats"]
    if repeats < 1:
        ap.error("--repeats: must be >= 1")
    rng = random.Random(args.seed)
    rep = Report()
    mach = machine()
    rep.out(f"vpn-director decision-core micro-benchmarks ({mode}; best and median of {repeats} repeats)")
    rep.out(f"machine: {mach['nproc']} CPU, {mach['cpu']}; {mach['implementation']} {mach['python']}; "
            f"{mach['platform']}")  # fmt: skip
    code = code_state()
    dirty = ", ".join(code.get("uncommitted", [])) or "none"
    rep.out(f"code: commit {code['commit']}; uncommitted changes under director/: {dirty}")
    load_start = loadavg()
    rep.out(f"load average at start: {load_start} (other work on this machine skews absolute numbers)")
    t0, c0 = time.perf_counter(), time.process_time()
    elapsed: dict[str, float] = {}
    for key, run in (
        ("a", lambda: section_a(rep, z, repeats, rng)),
        ("b", lambda: section_b(rep, z, repeats, rng)),
        ("c", lambda: section_c(rep, z, repeats, rng, naive=not args.no_naive, seed=args.seed)),
        ("s", lambda: section_s(rep, z, repeats, rng)),
    ):
        if key in args.sections:
            s0 = time.perf_counter()
            run()
            elapsed[key] = time.perf_counter() - s0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep.out()
    per = ", ".join(f"{k} {v:.1f} s" for k, v in elapsed.items())
    load_end = loadavg()
    rep.out(f"done in {wall:.1f} s wall ({per}), {cpu:.1f} s CPU; load average at end: {load_end}")
    if args.json:
        doc = {
            "mode": mode,
            "repeats": repeats,
            "sizes": z,
            "machine": mach,
            "code": code,
            "seed": args.seed,
            "elapsed_s": wall,
            "elapsed_by_section_s": elapsed,
            "cpu_s": cpu,
            "loadavg": {"start": load_start, "end": load_end},
            "targets": {"entries_per_s": TARGET_ENTRIES_PER_S, "bytes_per_entry": TARGET_BYTES_PER_ENTRY},
            "results": rep.results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
