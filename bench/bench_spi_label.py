"""Micro-benchmark of SPI label decoding: what naming a real server from an SPI costs, alone.

Not a test: it prints numbers. The fast path does not call the decoders yet, so this measures the
decode in isolation, against baselines in the same run:

  a  Python (director/spi_label.py): ``decode_ike`` and ``decode_esp`` per call, against a plain
     dict lookup of the SPI (what a table hit costs at least).
  b  C (ebpf/include/spi_label.h) in the kernel, through BPF_PROG_TEST_RUN of
     ebpf/build/test_spi_label.o with ``repeat``: ns per run with labels off (the probe's fixed
     cost: frame, map lookup, early return), with 3 labelled servers, and with 16 (every slot
     scanned: the worst case). The difference to "labels off" is the decode's cost.

    .venv/bin/python bench/bench_spi_label.py [--repeat N]   (root, `make -C ebpf` first)
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

from director.dataplane import libbpf as L  # noqa: E402
from director.dataplane.bpf_spi_label import spi_label_cfg  # noqa: E402
from director.packet import FLAG_INITIATOR  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000)
    args = ap.parse_args()
    python_section()
    if not OBJ.is_file():
        sys.exit(f"{OBJ} missing: run `make -C ebpf`")
    c_section(args.repeat)


if __name__ == "__main__":
    main()
