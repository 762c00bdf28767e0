"""The decision-core demo: crafted IKE/ESP traffic through the pure core, then the table.

It shows what the director decides, packet by packet, without a kernel dataplane: clients doing
IKEv2 and IKEv1 (one behind a NAT floating to 4500), ESP after establishment, a rekey, a stranger's
ESP answered with ICMP protocol-unreachable, and a real server quiesced mid-run.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from typing import TextIO

from director.core import Action, Director, Verdict
from director.drop_reasons import DropReason
from director.isakmp_state import State
from director.lab import craft
from director.packet import CREATE_CHILD_SA, QUICK, int_to_ip, ip_to_int
from director.schedulers import RealServer
from director.service import Method, Service

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
