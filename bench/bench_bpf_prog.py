"""Micro-benchmark of the fast path programs alone: what one packet costs director_tc and
director_xdp, in the kernel, with everything hot (BPF_PROG_TEST_RUN).

Not a test: it prints numbers, and ratios against baselines measured in the same run. It uses the
BPF tests' namespace, maps and frames (tests/bpf/bpf_world.py, fastpath_cases.py): three real
servers, DR, NAT and TUN, one established client each.

Per hook (tc, XDP) and case, ``--calls`` calls of one run each (BPF_PROG_TEST_RUN reruns a program
on the packet it already rewrote, so only a single run is the same packet every time); the
kernel's duration of each call, median and 10th percentile:

  - not ours: a frame to an address that is no VIP (one map lookup, then pass): the floor, which
    also holds the test run's own overhead;
  - miss: ESP of a client with no entry (passed to the stack: the queue);
  - DR, NAT (raw ESP), NAT (ESP-in-UDP), TUN: a forwarded hit, each with the real server's next
    hop cached in ``servers`` (daemon.fastpath_fib = "cached", the default) and with the route
    and neighbour lookup per packet ("main").

"- floor" is the median minus the not-ours median: the program's own work for the case. The
programs in place cost more (cold cache lines, the redirect's transmit): bench_dataplane.py
--bpf-stats measures that under load.

    .venv/bin/python bench/bench_bpf_prog.py [--calls N]     (root, `make -C ebpf` first)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not
sys.path.insert(0, str(REPO / "tests" / "bpf"))  # the BPF tests' namespace, maps and frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000, help="calls (one run each) per case")
    args = ap.parse_args()

    from bpf_world import TC_ACT_OK, TC_ACT_REDIRECT, bench_world, prerequisites
    from director.lab import craft
    from fastpath_cases import C_UNKNOWN, C_NAT, NOT_VIP, VERDICT, VIP, esp_dr, esp_nat, esp_tun, eth, natt, setup_maps

    missing = prerequisites()
    if missing:
        sys.exit("needs: " + "; ".join(missing))
    cases = [  # (name, frame, cached?, expected verdict)
        ("not ours (floor)", eth(craft.esp(C_UNKNOWN, NOT_VIP, 0x1001)), None, TC_ACT_OK),
        ("miss (to the queue)", eth(craft.esp(C_UNKNOWN, VIP, 0x1001)), None, TC_ACT_OK),
    ]
    for name, frame in (("DR", esp_dr), ("NAT", esp_nat), ("NAT ESP-in-UDP", natt[C_NAT]), ("TUN", esp_tun)):
        for cached in (True, False):
            cases.append((f"{name}, {'next hop cached' if cached else 'route lookup'}", eth(frame), cached,
                          TC_ACT_REDIRECT))  # fmt: skip
    with bench_world() as world:
        print(f"the programs alone (BPF_PROG_TEST_RUN, {args.calls} calls of one run), ns per packet")
        print(f"   {'hook':<4} {'case':<34}{'median':>8}{'p10':>6}{'- floor':>9}{'x floor':>9}")
        for hook in ("tc", "xdp"):
            floor = None
            for name, frame, cached, verdict in cases:
                setup_maps(world, cached=bool(cached))
                runs = [world.run(hook, frame) for _ in range(args.calls)]
                rets = {r.retval for r in runs}
                if rets != {VERDICT[hook][verdict]}:
                    sys.exit(f"{hook} {name}: verdicts {rets}, want {VERDICT[hook][verdict]}: the case is wrong")
                d = sorted(r.duration for r in runs)
                med, p10 = statistics.median(d), d[len(d) // 10]
                floor = floor if floor is not None else med
                print(f"   {hook:<4} {name:<34}{med:8.0f}{p10:6d}{med - floor:9.0f}{med / floor:9.2f}", flush=True)


if __name__ == "__main__":
    main()
