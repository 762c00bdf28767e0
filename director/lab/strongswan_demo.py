"""The strongSwan demo: real IPsec clients and servers (charon) through the real daemon in the lab.

For one forwarding mode: build the lab, start the daemon, a charon responder in every real server
and three road warriors (c1 and c2 IKEv2, c3 IKEv1 main mode behind the NAT), then print a
client's ``swanctl --list-sas`` next to the director's connection table, ping through every
tunnel and tear everything down. About 5 s per mode on the 2-core VM.

``python -m director.lab.strongswan_demo [--mode dr|tun|nat] [--dataplane nfqueue|ebpf]``
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from director.lab.director_proc import DirectorProcess, fastpath_line
from director.lab.netns import MODES, Lab
from director.lab.strongswan import PROTECTED, Peers, pool_of, strongswan_prerequisites

CLIENTS = (("c1", "psk"), ("c2", "psk"), ("c3", "psk1"))  # (namespace, connection)


def _director_table(d: DirectorProcess, names: dict[str, str], out: TextIO) -> None:
    out.write(f"    {'state':<12}{'client':<26}{'initiator SPI':<18}{'responder SPI':<18}real server\n")
    for c in sorted(d.connections(), key=lambda c: (c["client"], c["spi_i"])):
        who = f"{c['client']}:{c['port']}" + (f" ({names[c['client']]})" if c["client"] in names else "")
        out.write(f"    {c['state']:<12}{who:<26}{c['spi_i']:<18}{c['spi_r']:<18}{c['rs_address']}\n")


def _indent(text: str, prefix: str = "    ") -> str:
    return "".join(prefix + line + "\n" for line in text.rstrip().splitlines())


def run_strongswan_demo(mode: str = "dr", *, dataplane: str | None = None, scheduler: str = "rr",
                        out: TextIO = sys.stdout) -> bool:  # fmt: skip
    """Run the demo for one ``mode``; True when every client got its tunnel and every ping came back."""
    missing = strongswan_prerequisites()
    if missing:
        out.write("strongSwan demo: missing " + "; ".join(missing) + "\n")
        return False
    t0 = time.monotonic()
    ok = True
    out.write(f"\n=== strongSwan peers, {mode.upper()} mode: charon clients c1, c2 (IKEv2 PSK) and c3 "
              f"(IKEv1 main mode, behind the NAT); a charon responder in each real server\n")  # fmt: skip
    with Lab(mode) as lab:
        d = DirectorProcess(lab, dataplane=dataplane, scheduler=scheduler).start()
        peers = Peers(lab)
        try:
            peers.start_servers()
            for role, conn in CLIENTS:
                peers.client(role, conn)
            peers.start_clients()
            t1 = time.monotonic()
            peers.connect()
            out.write(f"  daemon ({d.status()['dataplane']} dataplane) up, 3 responders and 3 clients connected in "
                      f"{time.monotonic() - t1:.2f} s; each server hands out {pool_of(0)[:-6]}<rs>.0/24 "
                      f"and protects {PROTECTED}\n")  # fmt: skip

            out.write("\n  c1: swanctl --list-sas\n")
            out.write(_indent(peers.clients["c1"].swanctl("--list-sas")))
            names = {peers.seen_as(role): role for role, _ in CLIENTS}
            out.write("\n  the director's connection table (control socket):\n")
            _director_table(d, names, out)

            out.write("\n  who is where (client's IKE SA -> director entry -> real server's SA):\n")
            by_spi = {(c["client"], c["spi_i"]): c for c in d.connections()}
            for role, conn in CLIENTS:
                c = peers.clients[role]
                sa = c.wait_established(conn)
                entry = by_spi.get((peers.seen_as(role), sa["initiator-spi"]))
                rs = peers.server_of(role)
                where = entry["rs_address"] if entry else "(no entry!)"
                held = f"rs{rs + 1} {lab.rs_addrs[rs]}" if rs is not None else "no server"
                agree = entry is not None and rs is not None and entry["rs_address"] == lab.rs_addrs[rs]
                ok &= agree
                out.write(f"    {role} IKEv{sa['version']} {sa['initiator-spi']}_i {sa['responder-spi']}_r "
                          f"vip {c.virtual_ip(conn)}: director -> {where}; SA held by {held}"
                          f"{'' if agree else '  <-- MISMATCH'}\n")  # fmt: skip

            out.write(f"\n  ping {PROTECTED} inside each tunnel (from the client's virtual IP):\n")
            for role, _ in CLIENTS:
                sent, got = peers.ping(role, count=3)
                ok &= got == sent
                out.write(f"    {role}: {got}/{sent} replies\n")
            st = d.status()
            out.write(f"\n  daemon: {st['stats']['packets']} packets decided, {st['established']} established, "
                      f"drops {st['drops'] or 0}, internal errors {st['stats']['internal_errors']}\n")  # fmt: skip
            out.write(fastpath_line(st))  # the tunnels' ESP-in-UDP, forwarded in the kernel
        except Exception as e:  # a demo reports, it does not crash: the lab still goes down
            ok = False
            out.write(f"  PROBLEM: {e}\n")
        finally:
            peers.stop()  # clients first, then servers
            rc = d.stop()
            ok &= rc == 0
    out.write(f"  charons stopped, daemon stopped (exit {rc}), lab torn down; {time.monotonic() - t0:.1f} s\n")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m director.lab.strongswan_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, action="append", help="repeatable; default: all three")
    parser.add_argument("--dataplane", choices=("nfqueue", "ebpf"), default=None)
    args = parser.parse_args(argv)
    results = {m: run_strongswan_demo(m, dataplane=args.dataplane) for m in (args.mode or MODES)}
    print("\n" + "  ".join(f"{m}: {'ok' if r else 'FAILED'}" for m, r in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
