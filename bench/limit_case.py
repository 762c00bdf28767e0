"""Group f's limit case: build bench/limit.bpf.c for one lab's real server, attach it, take it off.

The object is compiled in the benchmark's own run with the lab's values as constants (see the
comment at the top of limit.bpf.c), so the program has nothing to look up. Used by
bench/bench_dataplane.py (cases t2 and y2, and --headroom nic) and tests/bpf/test_bench_limit.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SRC = BENCH / "limit.bpf.c"
BUILD = BENCH / "build"
MODES = {"dr": 0, "tun": 1, "nat": 2}


def _mem(b: bytes) -> str:
    """Bytes as the unsigned integer they make in memory on this (little-endian) CPU."""
    return f"0x{int.from_bytes(b, 'little'):x}u"


def _compile(defines: list[str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["uname", "-m"], capture_output=True, text=True, check=True).stdout.strip()
    argv = ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", f"-I/usr/include/{arch}-linux-gnu",
            *defines, "-c", str(SRC), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cannot build the limit case ({' '.join(argv)}):\n{proc.stderr}")
    return out


def build(mode: str, ifindex: int, dmac: bytes, smac: bytes, rip: int, lan: int, out: Path | None = None) -> Path:
    """Compile the limit programs for ``mode`` ("dr", "tun", "nat"): redirect to ``ifindex`` with
    ``dmac``/``smac``, real server ``rip``, TUN outer source ``lan``. Returns the object's path."""
    return _compile([f"-DLIMIT_MODE={MODES[mode]}", f"-DLIMIT_IFINDEX={ifindex}",
                     f"-DLIMIT_D0={_mem(dmac[:4])}", f"-DLIMIT_D1={_mem(dmac[4:])}",
                     f"-DLIMIT_S0={_mem(smac[:2])}", f"-DLIMIT_S1={_mem(smac[2:])}",
                     f"-DLIMIT_RIP={_mem(rip.to_bytes(4, 'big'))}", f"-DLIMIT_LAN={_mem(lan.to_bytes(4, 'big'))}"],
                    out or BUILD / f"limit-{mode}.o")  # fmt: skip


def build_pass(out: Path | None = None) -> Path:
    """The pass-through XDP program of --headroom nic."""
    return _compile(["-DLIMIT_PASS"], out or BUILD / "limit-pass.o")


def attach(lab, hook: str, obj: Path, dev: str = "eth0") -> None:
    """The limit program on the director's ``dev``: tc clsact ingress, or native XDP."""
    if hook == "tc":
        lab.run("director", ["tc", "qdisc", "replace", "dev", dev, "clsact"])
        lab.run("director", ["tc", "filter", "add", "dev", dev, "ingress", "bpf", "direct-action", "obj", str(obj),
                             "sec", "tc"])  # fmt: skip
    else:
        lab.run("director", ["ip", "link", "set", "dev", dev, "xdpdrv", "obj", str(obj), "sec", "xdp"])


def detach(lab, hook: str, dev: str = "eth0") -> None:
    if hook == "tc":
        lab.run("director", ["tc", "qdisc", "del", "dev", dev, "clsact"], check=False)
    else:
        lab.run("director", ["ip", "link", "set", "dev", dev, "xdpdrv", "off"], check=False)


def headroom_on(lab, obj: Path, port: str = "c1-eth0") -> None:
    """Generic XDP (a pass-through) on the generator's switch port: the kernel then gives every
    frame XDP_PACKET_HEADROOM before the bridge forwards it (netif_receive_generic_xdp expands the
    head when it has less), as a NIC driver would: the director sees NIC-like headroom."""
    lab.run("sw", ["ip", "link", "set", "dev", port, "xdpgeneric", "obj", str(obj), "sec", "xdp"])


def headroom_off(lab, port: str = "c1-eth0") -> None:
    lab.run("sw", ["ip", "link", "set", "dev", port, "xdpgeneric", "off"], check=False)
