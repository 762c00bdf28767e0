"""Micro-benchmark of SPI label decoding: what naming a real server from an SPI costs.

Not a test: it prints numbers, and ratios against baselines measured in the same run.

  a  Python (director/spi_label.py): ``decode_ike`` and ``decode_esp`` per call, against a plain
     dict lookup of the SPI (what a table hit costs at least).
  b  C (ebpf/include/spi_label.h) alone in the kernel, through BPF_PROG_TEST_RUN of
     ebpf/build/test_spi_label.o with ``repeat``: ns per run with labels off (the probe's fixed
     cost: frame, map lookup, early return), with 3 labelled servers, and with 16 (every slot
     scanned: the worst case). The difference to "labels off" is the decode's cost.
  c  The fast path itself (director_tc.o and director_xdp.o, the BPF tests' namespace and maps,
     tests/bpf/bpf_world.py): ns per packet of raw ESP, DR, forwarded in the kernel, for
       - a ``clients`` hit (the baseline: what every established client's ESP costs),
       - a labelled miss: no entry, the SPI's label names the server (3 servers, first slot),
       - the same with 16 labelled servers, the SPI the last slot's (the worst decode),
     and passed to the stack (the queue) for
       - a miss of a service without labels (one ``spi_labels`` lookup more than before labels),
       - a miss of a labelled service whose SPI is in no server's range.
     BPF_PROG_TEST_RUN reruns a program on the same packet, rewrites included: each call runs
     ``--burst`` times (250) on a frame with TTL 255, so every run forwards (the DR rewrite
     decrements the TTL); ``--calls`` calls, best and median of the per-run means. Ratios are
     against the hit of the same hook.

    .venv/bin/python bench/bench_spi_label.py [--repeat N] [--calls N] [--only python,c,fastpath]
    (root, `make -C ebpf` first)
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not
sys.path.insert(0, str(REPO / "tests" / "bpf"))  # section c: the BPF tests' namespace and maps

from director.dataplane import libbpf as L  # noqa: E402
from director.dataplane.bpf_spi_label import spi_label_cfg  # noqa: E402
from director.packet import FLAG_INITIATOR, Kind  # noqa: E402
from director.spi_label import ServerLabel, SpiLabels  # noqa: E402

OBJ = REPO / "ebpf" / "build" / "test_spi_label.o"
PROBE = struct.Struct("!14xQQBBxxI")
MASK = 0x00000000FF000000


def labels(n: int) -> SpiLabels:
    return SpiLabels.build(MASK, {rs: ServerLabel((0x40 + rs) << 24, (0x40 + rs) << 24, ((0x40 + rs) << 24) | 0xFFFFFF)
                                  for rs in range(n)})  # fmt: skip


def per_call(fn, args: list, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for a in args:
            fn(*a)
        best = min(best, (time.perf_counter() - t0) / len(args))
    return best * 1e9


def python_section(n: int = 200_000) -> None:
    rng = random.Random(1)
    sl = labels(3)
    ike = [((rng.getrandbits(64) & ~MASK) | (0x41 << 24), (rng.getrandbits(64) & ~MASK) | (0x42 << 24), 2,
            FLAG_INITIATOR) for _ in range(n)]  # fmt: skip
    esp = [(0x42000000 | rng.getrandbits(24),) for _ in range(n)]
    table = {s[0]: 1 for s in esp}
    print("a  Python, ns per call (best of 5)")
    print(f"   dict lookup of the SPI     {per_call(table.get, esp):8.1f}")
    print(f"   decode_ike (IKEv2)         {per_call(sl.decode_ike, ike):8.1f}")
    print(f"   decode_esp (3 ranges)      {per_call(sl.decode_esp, esp):8.1f}")


def c_section(repeat: int) -> None:
    obj = L.BpfObject(OBJ)
    obj.load()
    try:
        prog, cfg = obj.prog_fd("spi_label_probe"), obj.map_fd("spi_label_test_cfg")
        # the last slot's label and range: a full scan when 16 servers are configured
        frame = PROBE.pack(0x1111111100000000, 0x222222224F000000, 2, FLAG_INITIATOR, 0x4FABCDEF)
        print(f"b  C in the kernel (BPF_PROG_TEST_RUN, repeat {repeat}), ns per run (best of 5)")
        base = None
        for name, value in (("labels off", spi_label_cfg(None)), ("3 servers", spi_label_cfg(labels(3))),
                            ("16 servers", spi_label_cfg(labels(16)))):  # fmt: skip
            L.map_update(cfg, struct.pack("=I", 0), value)
            best = min(L.prog_test_run(prog, frame, repeat=repeat).duration for _ in range(5))
            base = best if base is None else base
            print(f"   {name:<12} {best:6d}   (+{best - base} over labels off)")
    finally:
        obj.close()


def fastpath_section(calls: int, burst: int) -> None:
    import statistics

    from bpf_world import bench_world, prerequisites
    from director.dataplane import bpf_structs as S
    from director.lab import craft
    from fastpath_cases import C_DR, RS, VIP_LABEL, VIP_NOAH, eth, patch, setup_maps

    missing = prerequisites()
    if missing:
        sys.exit("section c needs: " + "; ".join(missing))
    new_client = 0xCB00714D  # 203.0.113.77: no `clients` entry
    last_rs = 200  # the 16-server config's last slot (slots are sorted by real server id)

    def frame(client: int, vip: int, spi: int) -> bytes:
        return eth(patch(craft.esp(client, vip, spi, size=64), 8, b"\xff"))  # TTL 255

    cases = [  # (name, frame, 16 servers?, expected verdict: forwarded or passed)
        ("clients hit (baseline)", frame(C_DR, VIP_LABEL, 0x42000001), False, True),
        ("labelled miss, 3 servers", frame(new_client, VIP_LABEL, 0x41000001), False, True),
        ("labelled miss, 16 servers, last", frame(new_client, VIP_LABEL, 0x4F000001), True, True),
        ("miss, service without labels", frame(new_client, VIP_NOAH, 0x41000001), False, False),
        ("miss, labelled, SPI in no range", frame(new_client, VIP_LABEL, 0x7F000001), False, False),
    ]
    sixteen = SpiLabels.build(0xFF000000, {
        **{100 + i: ServerLabel(i << 24, (0x40 | i) << 24, ((0x40 | i) << 24) | 0xFFFFFF) for i in range(15)},
        last_rs: ServerLabel(15 << 24, 0x4F000000, 0x4FFFFFFF),
    })  # fmt: skip
    with bench_world() as world:
        print(f"c  the fast path (BPF_PROG_TEST_RUN, {calls} calls x {burst} runs), ns per packet: best, median")
        for hook in ("tc", "xdp"):
            base = None
            for name, f, big, forwards in cases:
                setup_maps(world)
                if big:
                    world.put("spi_labels", S.u32(3), spi_label_cfg(sixteen))
                    world.put("servers", S.u32(last_rs), S.server_val(RS[1][1], S.METHOD_DR))
                runs = [world.run_repeat(hook, f, burst) for _ in range(calls)]
                ret = {r.retval for r in runs}
                fwd = world.stats()[f"fwd_packets[{int(Kind.ESP)}]"]
                if forwards != (fwd == calls * burst):
                    sys.exit(f"{hook} {name}: forwarded {fwd} of {calls * burst} (verdicts {ret}); the case is wrong")
                d = [r.duration for r in runs]
                best, med = min(d), statistics.median(d)
                base = base or (best, med)
                print(f"   {hook:<3} {name:<34} {best:6d} {med:8.0f}   x{best / base[0]:.2f} x{med / base[1]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="section b: runs per measurement")
    ap.add_argument("--calls", type=int, default=2000, help="section c: calls per case")
    ap.add_argument("--burst", type=int, default=250, help="section c: runs per call (< 255: TTL)")
    ap.add_argument("--only", default="python,c,fastpath", help="sections, comma-separated")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not 1 <= args.burst <= 253:
        sys.exit("--burst: 1..253 (every run must find TTL > 1 to forward)")
    if "python" in only:
        python_section()
    if "c" in only:
        if not OBJ.is_file():
            sys.exit(f"{OBJ} missing: run `make -C ebpf`")
        c_section(args.repeat)
    if "fastpath" in only:
        fastpath_section(args.calls, args.burst)


if __name__ == "__main__":
    main()
