"""``vpn-director demo``: what the director decides, from crafted packets to real IPsec peers.

Three parts, chosen by the command's flags (``run_demo``):

- ``--core``: crafted IKE/ESP traffic through the pure decision core, no kernel dataplane: clients
  doing IKEv2 and IKEv1 (one behind a NAT floating to 4500), ESP after establishment, a rekey, a
  stranger's ESP answered with ICMP protocol-unreachable, a real server quiesced mid-run; then the
  table (``run_core_demo``).
- ``--peers crafted``: real packets through the real daemon in a namespace lab, per forwarding
  mode: three clients (c3 behind a NAT) run IKEv2 / IKEv1 handshakes and send ESP, AH and NAT-T
  traffic, a stranger sends ESP; then the director's table and what each real server received
  (``run_mode``).
- ``--peers strongswan``: the same lab with real charon road warriors and responders
  (director.lab.strongswan_demo); ``both``, the default, runs crafted then strongSwan.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from typing import TextIO

from director.core import Action, Director, Verdict
from director.drop_reasons import DropReason
from director.isakmp_state import State
from director.lab import craft
from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess, fastpath_line
from director.lab.netns import Lab
from director.packet import CREATE_CHILD_SA, QUICK, int_to_ip, ip_to_int
from director.schedulers import RealServer
from director.service import Method, Service


def run_demo(*, core: bool = False, clients: int = 6, scheduler: str = "wlc", modes=("dr", "tun", "nat"),
             dataplane: str = "auto", peers: str = "both", out: TextIO = sys.stdout) -> int:  # fmt: skip
    """The ``demo`` command: the core demo with ``core``, else the lab demo. Returns the exit status."""
    if core:
        return run_core_demo(clients=clients, scheduler=scheduler, out=out)
    return run_lab_demo(list(modes), scheduler=scheduler, out=out, dataplane=dataplane, peers=peers)


# -- the decision core alone ----------------------------------------------------------------------------
VIP = "192.0.2.10"
RIPS = ("198.51.100.11", "198.51.100.12", "198.51.100.13")


def _fmt_verdict(v: Verdict, d: Director) -> str:
    if v.action == Action.FORWARD:
        return f"-> rs{v.rs} {int_to_ip(v.addr)} ({Method(v.method).name})"
    if v.action == Action.ICMP_UNREACH:
        return "-> ICMP 3/2 protocol-unreachable to the client"
    return f"-> {v.action.name}" + (f" ({DropReason(v.reason).name})" if v.reason else "")


def print_services(d: Director, out: TextIO) -> None:
    out.write("Prot LocalAddress:Port Scheduler\n  -> RemoteAddress  Forward Weight ActiveConn InActConn\n")
    for svc in d.services.values():
        out.write(f"IPSEC {int_to_ip(svc.vip)} {svc.scheduler_name} affinity={svc.affinity}\n")
        for rs in svc.servers.values():
            out.write(
                f"  -> {int_to_ip(rs.addr):<15} {svc.method_of(rs).name:<7} {rs.weight:<6} "
                f"{rs.active:<10} {rs.inactive}\n"
            )


def print_connections(d: Director, now: float, out: TextIO) -> None:
    out.write(f"{'state':<12}{'client':<22}{'initiator cookie':<18}{'responder cookie':<18}{'rs':<4}expires\n")
    for e in sorted(d.table.entries(), key=lambda e: (e.client, e.created)):
        out.write(
            f"{e.state.name:<12}{int_to_ip(e.client) + ':' + str(e.cport):<22}"
            f"{e.spi_i:016x}  {e.spi_r:016x}  rs{e.rs:<2} {e.expires - now:7.1f}s\n"
        )


def run_core_demo(clients: int = 6, scheduler: str = "wlc", out: TextIO = sys.stdout, seed: int = 7) -> int:
    if clients < 2 or clients > 200:
        raise ValueError(f"--clients: must be 2..200, got {clients}")
    rng = random.Random(seed)
    vip = ip_to_int(VIP)
    d = Director(capacity=4096)
    servers = {i: RealServer(id=i, addr=ip_to_int(a), weight=1) for i, a in enumerate(RIPS)}
    d.add_service(Service(id=1, vip=vip, scheduler_name=scheduler, method=Method.DR, servers=servers))
    received: dict[str, Counter] = {}
    now = 0.0

    def send(label: str, pkt: bytes) -> Verdict:
        v = d.decide(pkt, now)
        out.write(f"  t={now:5.2f}s {label:<52} {_fmt_verdict(v, d)}\n")
        if v.action == Action.FORWARD:
            received.setdefault(label.split()[0], Counter())[f"rs{v.rs}"] += 1
        return v

    out.write(f"vpn-director decision-core demo: VIP {VIP}, {scheduler}, real servers {', '.join(RIPS)}\n\n")
    names = []
    for i in range(clients):
        ip = ip_to_int(f"203.0.113.{10 + i}")
        name = f"client{i}"
        names.append((name, ip))
        spi_i, spi_r = rng.getrandbits(64) | 1, rng.getrandbits(64) | 1
        if i % 3 == 2:  # IKEv1 behind a NAT: main mode on 500, floats to 4500 at message 5
            out.write(f"{name} {int_to_ip(ip)}: IKEv1 main mode behind NAT, float to 4500, quick mode, ESP-in-UDP\n")
            send(f"{name} MM1 (initial, 500)", craft.ike(ip, vip, spi_i, v1=True, sport=40000 + i))
            send(f"{name} MM3 (responder cookie seen)", craft.ike(ip, vip, spi_i, spi_r, v1=True, sport=40000 + i))
            send(f"{name} MM5 (4500, non-ESP marker)", craft.ike(ip, vip, spi_i, spi_r, v1=True, sport=41000 + i, natt=True))
            send(f"{name} QM1", craft.ike(ip, vip, spi_i, spi_r, v1=True, sport=41000 + i, natt=True, exchange=QUICK))
            for seq in range(1, 3):
                send(f"{name} ESP-in-UDP seq {seq}", craft.esp_in_udp(ip, vip, 0xC0000000 + i, seq, sport=41000 + i))
            send(f"{name} NAT-keepalive", craft.keepalive(ip, vip, sport=41000 + i))
        else:
            out.write(f"{name} {int_to_ip(ip)}: IKEv2, raw ESP\n")
            send(f"{name} IKE_SA_INIT (initial)", craft.ike(ip, vip, spi_i))
            send(f"{name} IKE_AUTH (responder SPI seen)", craft.ike(ip, vip, spi_i, spi_r))
            for seq in range(1, 3):
                send(f"{name} ESP seq {seq}", craft.esp(ip, vip, 0xE0000000 + i, seq))
        now += 0.25

    out.write("\nclient0 rekeys its IKE SA (new SPIs) and keeps its real server:\n")
    ip0 = names[0][1]
    send("client0 CREATE_CHILD_SA under new SPIs", craft.ike(ip0, vip, 0xABCDEF, 0x123456, exchange=CREATE_CHILD_SA))
    out.write("\nA stranger sends ESP without any IKE state:\n")
    send("stranger ESP", craft.esp(ip_to_int("203.0.113.250"), vip, 0x5555))
    out.write("\nrs0 is quiesced (weight 0): its clients stay, new clients go elsewhere:\n")
    d.set_weight(0, 0)
    for i in range(2):
        ip = ip_to_int(f"203.0.113.{100 + i}")
        send(f"late{i} IKE_SA_INIT (initial)", craft.ike(ip, vip, rng.getrandbits(64) | 1))
    now += 1.0
    d.expire(now)

    out.write("\n== services (ipvsadm -L -n style)\n")
    print_services(d, out)
    out.write(f"\n== connection table at t={now:.2f}s ({len(d.table)} entries)\n")
    print_connections(d, now, out)
    out.write("\n== which real server received each client's packets\n")
    for name, counter in sorted(received.items()):
        out.write(f"  {name:<10} {dict(counter)}\n")
    moved = [n for n, c in received.items() if len(c) > 1]
    established = sum(1 for e in d.table.entries() if e.state == State.ESTABLISHED)
    out.write(
        f"\nestablished={established} init={d.table.n_init} scheduled={d.stats['scheduled']} "
        f"persisted={d.stats['persisted']} adopted={d.stats['adopted']} icmp_unreach={d.stats['icmp_unreach']} "
        f"clients split across servers={len(moved)}\n"
    )
    return 0 if not moved else 1


# -- the namespace lab, crafted peers ----------------------------------------------------------------
def _table(d: DirectorProcess, out: TextIO) -> None:
    out.write(f"  {'state':<12}{'client':<20}{'initiator SPI':<18}{'responder SPI':<18}{'real server':<14}expires\n")
    for c in sorted(d.connections(), key=lambda c: c["client"]):
        out.write(
            f"  {c['state']:<12}{c['client'] + ':' + str(c['port']):<20}{c['spi_i']:<18}{c['spi_r']:<18}"
            f"{c['rs_address']:<14}{c['expires_in']:.0f}s\n"
        )


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
