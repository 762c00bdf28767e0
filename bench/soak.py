"""Soak: a million mutated packets at a running daemon in the lab; it must stay up and bounded.

    .venv/bin/python bench/soak.py [--packets 1000000] [--dataplane ebpf|nfqueue] [--mode dr]

From c2's namespace (raw IP_HDRINCL socket, sources: c2 itself and spoofed 100.64.0.0/10
addresses that route nowhere), sends mutations of valid IKE / NAT-T / ESP / AH packets plus random
bytes to the VIP, while c1 is an established client. Reports the daemon's RSS before and after,
what it decided and dropped, and checks that c1's ESP still reaches its real server. Bounded:
stops after --packets or --seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from director.lab import craft  # noqa: E402
from director.lab.client import LabClient  # noqa: E402
from director.lab.director_proc import DirectorProcess  # noqa: E402
from director.lab.netns import Lab  # noqa: E402
from director.packet import ip_to_int  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mutants(vip: int, src: int, rng: random.Random, n: int) -> list[bytes]:
    seeds = [craft.ike(src, vip, 0x1111), craft.ike(src, vip, 0x1111, 0x2222),
             craft.ike(src, vip, 0x1111, 0x2222, v1=True, natt=True, sport=4500),
             craft.esp(src, vip, 0x3333), craft.esp_in_udp(src, vip, 0x4444),
             craft.keepalive(src, vip), craft.ah(src, vip, 0x5555)]
    out = []
    for _ in range(n):
        if rng.random() < 0.1:  # random bytes behind a valid IPv4 header to the VIP
            body = rng.randbytes(rng.randint(0, 80))
            out.append(craft.build_ipv4(src, vip, rng.choice((17, 50, 51)), body))
            continue
        p = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(20, len(p))  # keep the IP header so the kernel delivers it to the VIP
            p[i] = rng.randrange(256)
        if rng.random() < 0.2:
            p = p[: rng.randint(20, len(p))]
            p[2:4] = len(p).to_bytes(2, "big")
        out.append(bytes(p))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--dataplane", default="ebpf", choices=("ebpf", "nfqueue"))
    ap.add_argument("--mode", default="dr", choices=("dr", "tun", "nat"))
    args = ap.parse_args()
    rng = random.Random(1)
    with Lab(args.mode) as lab:
        lab.start_responders()
        d = DirectorProcess(lab, dataplane=args.dataplane).start()
        try:
            c1 = LabClient(lab, "c1")
            c1.ikev2_connect()
            time.sleep(0.2)
            before = d.connections()
            vip = ip_to_int(lab.vip)
            pool = []
            for k in range(8):  # 8 pools of 8192 mutants, each from its own source
                src = ip_to_int(lab.client_addrs["c2"]) if k == 0 else 0x64400000 | rng.getrandbits(22)
                pool += mutants(vip, src, rng, 8192)
            raw = lab.socket("c2", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            rss0 = rss_kib(d.proc.pid)
            sent = errors = 0
            t0 = time.monotonic()
            while sent < args.packets and time.monotonic() - t0 < args.seconds:
                for p in pool:
                    try:
                        raw.sendto(p, (lab.vip, 0))
                    except OSError:
                        errors += 1  # the kernel refuses some mutants (e.g. a bad header length)
                    sent += 1
                    if sent >= args.packets:
                        break
            elapsed = time.monotonic() - t0
            time.sleep(1.0)
            alive = d.proc.poll() is None
            st = d.status()
            rss1 = rss_kib(d.proc.pid)
            c1.send_esp(0x5050)
            rs = next(c["rs_address"] for c in before)
            lab.wait_received(lab.rs_addrs.index(rs), lambda r: r["kind"] == "esp" and r["spi"] == 0x5050, 3.0)
            unchanged = [c["spi_i"] for c in d.connections() if c["client"] == lab.client_addrs["c1"]] == \
                [c["spi_i"] for c in before]
            drops = sum(st["drops"].values())
            print(f"soak ({args.mode}, {args.dataplane}): {sent} packets sent in {elapsed:.1f} s "
                  f"({sent / elapsed:,.0f} pkt/s; {errors} refused by the sender's kernel)")
            print(f"  daemon alive: {alive}; decided in user space: {st['stats']['packets']}; "
                  f"drops by reason: {drops} {st['drops']}")
            if "fastpath" in st:
                print(f"  fast path: drops {st['fastpath']['drops']}, passed {st['fastpath']['passed']}")
            print(f"  table: {st['entries']} entries ({st['init']} INIT) of capacity; "
                  f"internal errors {st['stats']['internal_errors']}")
            print(f"  daemon RSS: {rss0} KiB before, {rss1} KiB after ({rss1 - rss0:+d} KiB)")
            print(f"  established client c1: entry unchanged {unchanged}, ESP still reaches {rs}: True")
            return 0 if alive and unchanged and st["stats"]["internal_errors"] == 0 else 1
        finally:
            d.stop()


if __name__ == "__main__":
    sys.exit(main())
