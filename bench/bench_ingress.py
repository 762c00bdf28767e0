"""Micro-benchmark of the per-source ingress limits: what the check costs a packet, alone.

Not a test: it prints numbers. Against baselines in the same run:

  a  Python (director/ingress.py): ``SourceLimiter.take`` per call (within the limit, and over it),
     and ``Director.decide`` of ESP with no entry, without an ``ingress`` table and with one
     (within the limit: the check's cost on top of the NO_ENTRY decision).
  b  C (ebpf/include/ingress.h) in the kernel, through BPF_PROG_TEST_RUN of director_xdp.o and
     director_tc.o with ``repeat`` on one frame, ns per run: ESP of a source with no entry with
     no ingress_cfg for its VIP (the miss alone), with a limit it stays within (lookup + bucket
     update), and with a limit it is over (the drop); and the same for a non-initial IKE packet.

    .venv/bin/python bench/bench_ingress.py [--repeat N]   (root, `make -C ebpf` first)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

from director.core import Director  # noqa: E402
from director.dataplane import bpf_structs as S  # noqa: E402
from director.dataplane import libbpf as L  # noqa: E402
from director.ingress import NS, SourceLimiter  # noqa: E402
from director.lab import craft  # noqa: E402
from director.packet import ip_to_int  # noqa: E402
from director.schedulers import RealServer  # noqa: E402
from director.service import Service  # noqa: E402

VIP, RIP, SRC = ip_to_int("192.0.2.10"), ip_to_int("198.51.100.1"), ip_to_int("203.0.113.99")
ETH = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
OBJS = {"xdp": ("director_xdp.o", "director_xdp"), "tc": ("director_tc.o", "director_tc")}


def best_ns(fn, n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e9


def python_section(n: int = 200_000) -> None:
    within = SourceLimiter(1_000_000, 1_000_000 * NS, key=0)
    over = SourceLimiter(1, NS, key=0)

    def take_within(k: int) -> None:
        for i in range(k):
            within.take(SRC, i)

    def take_over(k: int) -> None:
        for i in range(k):
            over.take(SRC, i)

    esp = craft.esp(SRC, VIP, 0x1234)

    def director(ingress: tuple) -> Director:
        d = Director(capacity=1024)
        d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", servers={0: RealServer(id=0, addr=RIP)},
                              ingress=ingress))
        return d

    def decide(d: Director):
        def run(k: int) -> None:
            t = 0.0
            for _ in range(k):
                t += 1e-6  # 1 us apart: 10^6/s, within the 10^6/s limit below
                d.decide(esp, t)
        return run

    print("a  Python, ns per call (best of 5)")
    print(f"   SourceLimiter.take, within    {best_ns(take_within, n):8.1f}")
    print(f"   SourceLimiter.take, over      {best_ns(take_over, n):8.1f}")
    plain = best_ns(decide(director(())), n)
    limited = best_ns(decide(director((1_000_000, 0, 0, 1_000_000))), n)
    print(f"   decide ESP no entry, no limit {plain:8.1f}")
    print(f"   decide ESP no entry, limit    {limited:8.1f}   (+{limited - plain:.1f})")


def c_section(repeat: int) -> None:
    esp = ETH + craft.esp(SRC, VIP, 0x1234)
    ike = ETH + craft.ike(SRC, VIP, 0x1111, 0x2222)
    print(f"b  C in the kernel (BPF_PROG_TEST_RUN, repeat {repeat}), ns per run (best of 5)")
    for hook, (name, prog_name) in OBJS.items():
        obj = L.BpfObject(REPO / "ebpf" / "build" / name)
        obj.load()
        try:
            prog = obj.prog_fd(prog_name)
            L.map_update(obj.map_fd("vips"), S.addr(VIP), S.vip_val(1, S.VIP_F_AH))
            cfg, src = obj.map_fd("ingress_cfg"), obj.map_fd("ingress_src")
            for label, frame, cls in (("ESP, no entry", esp, 0), ("IKE", ike, 2)):
                base = None
                for case, value in (("no limit", None), ("within", 1_000_000), ("over", 1)):
                    for k in list(L.map_keys(src, S.INGRESS_KEY.size)):
                        L.map_delete(src, k)
                    if value is None:
                        L.map_delete(cfg, S.addr(VIP))
                    else:
                        rates = [0, 0, 0]
                        rates[cls] = value
                        L.map_update(cfg, S.addr(VIP), S.ingress_cfg(*rates, value))
                    best = min(L.prog_test_run(prog, frame, repeat=repeat).duration for _ in range(5))
                    base = best if base is None else base
                    print(f"   {hook:<3} {label:<14} {case:<9} {best:6d}   (+{best - base} over no limit)")
        finally:
            obj.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=100_000)  # "within": under the 10^6 burst per run
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer calls")
    args = ap.parse_args()
    python_section(20_000 if args.quick else 200_000)
    for name, _ in OBJS.values():
        if not (REPO / "ebpf" / "build" / name).is_file():
            sys.exit(f"ebpf/build/{name} missing: run `make -C ebpf`")
    c_section(min(args.repeat, 100_000))


if __name__ == "__main__":
    main()
