"""The lab demo: real packets through the real daemon in a namespace lab, per forwarding mode.

For each mode: build the lab, start the real servers' responders and the daemon, have three
clients (c3 behind a NAT) run IKEv2 / IKEv1 handshakes and send ESP, AH and NAT-T traffic, let a
stranger send ESP, then print the director's connection table and what each real server received.
Then the same lab with real strongSwan peers (director.lab.strongswan_demo): charon road warriors
and responders, ``swanctl --list-sas`` beside the director's table, pings inside the tunnels.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import Lab


def _table(d: DirectorProcess, out: TextIO) -> None:
    out.write(f"  {'state':<12}{'client':<20}{'initiator SPI':<18}{'responder SPI':<18}{'real server':<14}expires\n")
    for c in sorted(d.connections(), key=lambda c: c["client"]):
        out.write(
            f"  {c['state']:<12}{c['client'] + ':' + str(c['port']):<20}{c['spi_i']:<18}{c['spi_r']:<18}"
            f"{c['rs_address']:<14}{c['expires_in']:.0f}s\n"
        )


def fastpath_line(status: dict) -> str:
    """What the eBPF fast path did, from the daemon's status (empty without a fast path)."""
    fp = status.get("fastpath")
    if fp is None:
        return ""
    return (f"  eBPF fast path: forwarded in the kernel {fp['forwarded'] or 0}, passed up {fp['passed'] or 0}, "
            f"clients in the map {fp['clients']}\n")


def run_mode(mode: str, scheduler: str, out: TextIO, dataplane: str = "auto") -> bool:
    out.write(f"\n=== {mode.upper()} mode: lab up (3 clients, c3 behind NAT; director; 3 real servers)\n")
    t0 = time.monotonic()
    with Lab(mode) as lab:
        lab.start_responders()
        d = DirectorProcess(lab, scheduler=scheduler, dataplane=dataplane).start()
        try:
            names = {lab.client_addrs["c1"]: "c1", lab.client_addrs["c2"]: "c2", lab.nat_public: "c3 (via NAT)"}
            c1, c2, c3 = (LabClient(lab, r) for r in ("c1", "c2", "c3"))
            c2.send_esp(0x5555)  # before any IKE: nothing to follow
            icmp = c2.recv_icmp_unreachable()
            if icmp:
                out.write(f"  c2 sends ESP before any IKE -> ICMP type {icmp[0][0]} code {icmp[0][1]} from {icmp[0][2]}\n")
            for c in (c1, c2):
                spi_i, spi_r, src = c.ikev2_connect()
                out.write(f"  {c.role}: IKEv2 IKE_SA_INIT answered by {src} (responder SPI {spi_r:016x}), IKE_AUTH on 4500\n")
                time.sleep(0.1)  # let the daemon write the client into the fast path's map first
                for seq in range(1, 4):
                    c.send_esp(0xE0000000 | ord(c.role[1]), seq)
                if mode != "nat":
                    c.send_ah(0xA0000000 | ord(c.role[1]))
            spi_i, spi_r, src = c3.ikev1_connect()
            out.write(f"  c3: IKEv1 Main Mode through the NAT answered by {src}, floated to 4500\n")
            time.sleep(0.1)
            for seq in range(1, 4):
                c3.send_esp_in_udp(0xC0000003, seq)
            c3.send_keepalive()
            time.sleep(0.3)
            out.write("\n  connection table (vpn-director control socket):\n")
            _table(d, out)
            out.write("\n  what each real server received:\n")
            ok = True
            per_client: dict[str, set[str]] = {}
            for i, rip in enumerate(lab.rs_addrs):
                counts = Counter((names.get(r["src"], r["src"]), r["kind"]) for r in lab.received(i))
                line = ", ".join(f"{who} {kind} x{n}" for (who, kind), n in sorted(counts.items())) or "-"
                out.write(f"    {rip}: {line}\n")
                for who, _kind in counts:
                    per_client.setdefault(who, set()).add(rip)
            split = {w: s for w, s in per_client.items() if len(s) > 1}
            if split or len(per_client) != 3:
                ok = False
                out.write(f"  PROBLEM: clients split or missing: {per_client}\n")
            st = d.status()
            out.write(
                f"\n  daemon ({st['dataplane']} dataplane): {st['stats']['packets']} packets decided in user space, "
                f"{st['established']} established, icmp sent {st['stats']['icmp_sent']}, drops {st['drops'] or 0}\n"
            )
            out.write(fastpath_line(st))
        finally:
            rc = d.stop()
    out.write(f"  daemon stopped (exit {rc}), lab torn down; {time.monotonic() - t0:.1f} s\n")
    return ok and rc == 0


def run_lab_demo(modes: list[str], scheduler: str = "rr", out: TextIO = sys.stdout, dataplane: str = "auto",
                 peers: str = "both") -> int:  # fmt: skip
    """``peers``: "crafted" (the lab's own IKE/ESP packets and responders), "strongswan" (real charon
    clients and servers, director.lab.strongswan_demo), or "both" (default: crafted first)."""
    results: dict[str, bool] = {}
    if peers in ("crafted", "both"):
        for m in modes:
            results[f"{m} crafted"] = run_mode(m, scheduler, out, dataplane)
    if peers in ("strongswan", "both"):
        from director.lab.strongswan import strongswan_prerequisites
        from director.lab.strongswan_demo import run_strongswan_demo

        missing = strongswan_prerequisites()
        if missing:  # deploy/setup.sh installs strongSwan: its absence is a broken setup, not an option
            out.write("\nstrongSwan demo: missing " + "; ".join(missing) + " (deploy/setup.sh installs it; "
                      "--peers crafted runs without it)\n")  # fmt: skip
            results["strongswan"] = False
        else:
            for m in modes:
                results[f"{m} strongswan"] = run_strongswan_demo(m, dataplane=dataplane, scheduler=scheduler, out=out)
    out.write("\n" + "  ".join(f"{m}: {'ok' if r else 'FAILED'}" for m, r in results.items()) + "\n")
    return 0 if results and all(results.values()) else 1
