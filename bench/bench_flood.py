"""Flood absorption: a spoofed-source IKE_SA_INIT flood at the daemon while real clients are connected.

Not a test (tests/integration/test_defense.py asserts the correctness half with a small table): it
prints what the director absorbs and what it costs, per offered flood rate, for both dataplanes.

    .venv/bin/python bench/bench_flood.py [--quick] [--json out.json] [--rates 20000,100000,0]
                                          [--seconds 3] [--dataplanes nfqueue,ebpf]

Setup, per dataplane one DR lab (docs/lab.md), and per offered rate a fresh daemon in it:
  - The daemon's limits as an operator would set them (deploy/vpn-director.example.toml):
    ``new_entries_rate = 20000``, ``new_entries_per_source = 20``, ``drop_entry_threshold = 0.9``,
    and ``capacity = 32768`` (an operator's table for ~12k clients; small enough that the longer
    floods send ten times the table and more: the "x table" column). Daemon pinned to CPU 1.
  - Three established clients: c1 and c2 (IKEv2), c3 behind the lab's NAT (IKEv1, NAT-T). Each
    sends ESP throughout (c1, c2 raw ESP, c3 ESP-in-UDP on 4500), ``ESP_PPS`` packets/s each, from
    a thread of this script; every real server counts each client's ESP with an iptables raw DROP
    rule, so per client: sent, delivered, loss %, and whether it all went to the real server its
    entry names.
  - The flood: bench/build/pktgen in c1's namespace, pinned to CPU 0, IKE_SA_INIT to the VIP on
    500 with ``--src-bits 22`` (a new source in 100.64.0.0/10 per packet, IP checksum recomputed)
    and ``--seq-offset`` into the initiator SPI (a new SPI per packet too), at each offered rate
    (0 = as fast as the generator goes) for ``--seconds``. Flood packets the director forwards
    die in a raw DROP rule at the real servers (counted: "to RS").
  - A legitimate new client, c4 (a namespace this script adds on the lab's WAN bridge), runs an
    IKEv2 exchange halfway into the flood (retrying every ``RETRY_S`` like an impatient
    initiator: strongSwan's first retransmit would wait 4 s) and again right after it; reported:
    got through or not, seconds from the first try, tries.

Per rate it reports: offered pps (c1's tx counter over a window inside the send), new entries
admitted per second (the table's ``created`` counter over the second half of the flood: the
steady state, after the limiter's burst of one second's worth; the JSON also has it over the
whole flood, burst included), packets
dropped by the new-entry limits (``RATE_LIMITED`` + ``SOURCE_RATE_LIMITED``), INIT entries reclaimed under table pressure,
``TABLE_FULL`` refusals, the daemon's CPU % and its CPU time per flood packet offered and per
packet it handled, NFQUEUE drops (queue full: packets the daemon never saw), the table's fill at
the end, whether every established entry survived (same client, SPI and real server), the
established clients' ESP loss, and the new client's result. Other people's CPU use in the window
is reported too (others%): on a shared machine it skews the CPU figures.

Bounded: every flood stops after ``--seconds`` (pktgen's own cap is 30 s); the full run takes
about two minutes, --quick about one. Every lab is torn down even on failure; all traffic stays in
the lab's namespaces (spoofed sources route nowhere: the real servers' sinks drop the flood).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dataplane as bd  # noqa: E402
from director.lab import craft  # noqa: E402
from director.lab.client import LabClient  # noqa: E402
from director.lab.netns import Lab  # noqa: E402

CAPACITY = 32768
LIMITS = {"new_entries_rate": 20000, "new_entries_per_source": 20, "drop_entry_threshold": 0.9}
FLOOD_NET = 0x64400000  # 100.64.0.0/10 (RFC 6598): nothing in the lab routes there
FLOOD_SRC_BITS = 22
ESP_PPS = 500  # per established client
RETRY_S = 0.25  # the new client's retry interval
C4_ADDR = "198.18.0.14"
OFF_SPI_LOW = bd.OFF_IKE_SPI_LOW

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(rates=[20_000, 50_000, 100_000, 200_000, 0], seconds=3.0, warm=0.5, tail=0.3),
    "quick": dict(rates=[50_000, 0], seconds=1.5, warm=0.3, tail=0.2),
}


def add_c4(lab: Lab) -> None:
    """A fourth client namespace on the WAN bridge (the lab has three): the legitimate newcomer."""
    lab.add_namespace("c4")
    sw = lab.ipr("sw")
    sw.link("add", ifname="c4-eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": lab.ns["c4"]})
    idx = sw.link_lookup(ifname="c4-eth0")[0]
    sw.link("set", index=idx, master=sw.link_lookup(ifname="wan")[0], state="up")
    c4 = lab.ipr("c4")
    for name in ("lo", "eth0"):
        c4.link("set", index=c4.link_lookup(ifname=name)[0], state="up")
    c4.addr("add", index=c4.link_lookup(ifname="eth0")[0], address=C4_ADDR, prefixlen=24)
    lab.client_addrs["c4"] = C4_ADDR


class EspSenders(threading.Thread):
    """ESP from each established client at ``ESP_PPS``, paced in 10 ms steps, until stopped."""

    def __init__(self, clients: dict[str, LabClient], spis: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.clients, self.spis = clients, spis
        self.sent = {role: 0 for role in clients}
        self.stop_ev = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        step = 0
        while not self.stop_ev.is_set():
            step += 1
            due = int(ESP_PPS * step * 0.01)
            for role, c in self.clients.items():
                while self.sent[role] < due:
                    self.sent[role] += 1
                    try:
                        if role == "c3":
                            c.send_esp_in_udp(self.spis[role], self.sent[role])
                        else:
                            c.send_esp(self.spis[role], self.sent[role])
                    except OSError:
                        pass  # counted as sent and lost
            time.sleep(max(0.0, t0 + step * 0.01 - time.monotonic()))

    def stop(self) -> None:
        self.stop_ev.set()
        self.join()


def esp_sink_rules(lab: Lab) -> dict[str, list[str]]:
    return {
        "c1": ["-s", lab.client_addrs["c1"], "-p", "esp"],
        "c2": ["-s", lab.client_addrs["c2"], "-p", "esp"],
        "c3": ["-s", lab.nat_public, "-p", "udp", "--dport", "4500"],
        "flood": ["-s", "100.64.0.0/10", "-p", "udp", "--dport", "500"],
    }


def sink_counts(lab: Lab) -> dict[str, dict[str, int]]:
    """Per real server address: packets per sink (the rules' order is esp_sink_rules')."""
    names = list(esp_sink_rules(lab))
    out = {}
    for role, addr in zip(lab.rs_roles, lab.rs_addrs):
        text = lab.run(role, ["iptables", "-w", "-t", "raw", "-L", "PREROUTING", "-n", "-v", "-x"]).stdout
        counts = [int(p[0]) for p in (line.split() for line in text.splitlines()[2:]) if len(p) > 2 and p[2] == "DROP"]
        out[addr] = dict(zip(names, counts))
    return out


def connect_new(client: LabClient, until: float) -> dict[str, Any]:
    """IKEv2 exchanges from ``client`` until one is answered or ``until``: ok, seconds, tries."""
    t0 = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            client.ikev2_connect(timeout=RETRY_S)
            return {"ok": True, "seconds": time.monotonic() - t0, "tries": tries}
        except TimeoutError:
            if time.monotonic() >= until:
                return {"ok": False, "seconds": time.monotonic() - t0, "tries": tries}


def established(d) -> set[tuple[str, str, str]]:
    return {(c["client"], c["spi_i"], c["rs_address"]) for c in d.connections() if c["state"] == "ESTABLISHED"}


def one_rate(b: bd.Bench, dataplane: str, rate: int, prof: dict[str, Any], run_no: int) -> dict[str, Any]:
    lab = b.lab
    extra = "".join(f"{k} = {v}\n" for k, v in LIMITS.items())
    d = bd.start_daemon(lab, bd.DAEMON_CPU, dataplane=dataplane, capacity=CAPACITY, extra=extra)
    b.director, b.measured_pid = d, d.proc.pid
    clients: dict[str, LabClient] = {}
    esp: EspSenders | None = None
    try:
        for role in ("c1", "c2", "c3"):
            clients[role] = LabClient(lab, role)
        clients["c1"].ikev2_connect()
        clients["c2"].ikev2_connect()
        clients["c3"].ikev1_connect()
        time.sleep(0.2)
        before_est = established(d)
        spis = {"c1": 0xF100 + run_no, "c2": 0xF200 + run_no, "c3": 0xF300 + run_no}
        sinks0 = sink_counts(lab)
        esp = EspSenders(dict(clients), spis)
        esp.start()
        time.sleep(0.3)
        st0 = d.status()
        nfq0 = b.nfq_dropped()
        spi_i = (0x5EED0000 | run_no) << 32
        frame = b.frame(bd.zero_udp_checksum(craft.ike(FLOOD_NET | 1, lab.vip_int, spi_i, 0, body=bytes(36))))
        count = int(rate * prof["seconds"]) if rate else 50_000_000
        batch = 64 if not rate else max(1, min(64, rate // 5000))
        argv = ["taskset", "-c", str(bd.GEN_CPU), str(bd.PKTGEN), "eth0", frame, str(count), "--rate", str(rate),
                "--batch", str(batch), "--seconds", str(prof["seconds"]), "--seq-offset", str(OFF_SPI_LOW),
                "--src-bits", str(FLOOD_SRC_BITS)]  # fmt: skip
        start = time.monotonic()
        gen = lab.popen("c1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(prof["warm"])
        others = bd.OthersSampler(b.lab_netns)
        a = b.sample()
        # the newcomer, halfway into the flood (in a thread: the sampling goes on)
        newcomer: dict[str, Any] = {}
        c4 = clients["c4"] = LabClient(lab, "c4")

        def during() -> None:
            time.sleep(max(0.0, start + prof["seconds"] / 2 - time.monotonic()))
            newcomer.update(connect_new(c4, start + prof["seconds"] + 3.0))
            newcomer["during_flood"] = time.monotonic() - start < prof["seconds"]

        t = threading.Thread(target=during, daemon=True)
        t.start()
        st_h = None
        while time.monotonic() < start + prof["seconds"] - prof["tail"] and gen.poll() is None:
            if st_h is None and time.monotonic() >= start + prof["seconds"] / 2:
                st_h, t_h = d.status(), time.monotonic()  # the limiter's burst is spent by now
            time.sleep(0.01)
        bb = b.sample()
        st_b, t_b = d.status(), time.monotonic()
        others.finish()
        out, err = gen.communicate(timeout=prof["seconds"] + 30)
        if gen.returncode:
            raise RuntimeError(f"pktgen exited {gen.returncode}: {err.strip()}")
        g = json.loads(out.strip().splitlines()[-1])
        flood_s = time.monotonic() - start
        t.join(timeout=10)
        time.sleep(0.3)  # the queue drains
        st1 = d.status()
        nfq1 = b.nfq_dropped()
        after_new = connect_new(c4, time.monotonic() + 3.0)  # right after the flood
        time.sleep(0.2)
        esp.stop()
        time.sleep(0.3)
        sinks1 = sink_counts(lab)
        after_est = established(d)
        st2 = d.status()
    finally:
        if esp is not None and esp.is_alive():
            esp.stop()
        for c in clients.values():
            c.close()
        b.director, b.measured_pid = None, None
        rc = d.stop()
        if rc != 0:
            print(f"!! vpn-director exited {rc}:\n{d.log()[-2000:]}", flush=True)

    dt = bb.t - a.t
    row: dict[str, Any] = {"dataplane": dataplane, "rate": rate, "seconds": prof["seconds"], "flood_sent": g["sent"],
                           "gen_errors": g["errors"], "offered_pps": (bb.tx - a.tx) / dt if dt > 0 else 0.0,
                           "flood_wall_s": flood_s, "x_table": g["sent"] / CAPACITY}  # fmt: skip
    tbl0, tbl1 = st0["table"], st1["table"]
    row["created"] = tbl1["created"] - tbl0["created"]
    row["admitted_per_s"] = row["created"] / g["seconds"] if g["seconds"] else 0.0
    # steady state: entries created in the second half of the flood (the limiter's burst, one
    # second's worth, is spent by then at every rate above the limit)
    win = st_b["table"]["created"] - st_h["table"]["created"] if st_h else 0
    row["admitted_per_s_window"] = win / (t_b - t_h) if st_h and t_b > t_h else 0.0
    row["reclaimed_init"] = tbl1["reclaimed_init"] - tbl0["reclaimed_init"]
    row["refused_full"] = tbl1["refused_full"] - tbl0["refused_full"]
    for name in ("RATE_LIMITED", "SOURCE_RATE_LIMITED", "TABLE_FULL"):
        row[name.lower()] = st1["drops"].get(name, 0) - st0["drops"].get(name, 0)
    row["rate_limited"] += row["source_rate_limited"]  # the column: both limits (apart in the JSON)
    row["daemon_packets"] = st1["stats"]["packets"] - st0["stats"]["packets"]
    row["nfq_dropped"] = nfq1 - nfq0
    row["entries_end"] = st2["entries"]
    row["init_end"] = st2["init"]
    # wall clock minus idle (bench_dataplane.cpu_times: the tick-sampled busy fields miss work)
    busy = {c: max(0.0, 100.0 * (1 - (bb.cpus[c][3] - a.cpus[c][3]) / (dt * bd.CLK_TCK))) for c in bb.cpus}
    row["cpu_busy_pct"] = busy
    row["daemon_cpu_pct"] = 100.0 * (bb.daemon - a.daemon) / bd.CLK_TCK / dt if dt > 0 else 0.0
    flood_pps = row["offered_pps"]
    row["daemon_us_per_flood_pkt"] = 1e6 * row["daemon_cpu_pct"] / 100.0 / flood_pps if flood_pps else None
    handled = row["daemon_packets"] / g["seconds"] if g["seconds"] else 0.0
    row["daemon_us_per_handled_pkt"] = 1e6 * row["daemon_cpu_pct"] / 100.0 / handled if handled else None
    row["others_cpu_pct"] = 100.0 * others.ticks / bd.CLK_TCK / dt if dt > 0 else 0.0
    row["flood_to_rs"] = sum(s1["flood"] - sinks0[addr]["flood"] for addr, s1 in sinks1.items())
    # established entries: every one still there, same SPI, same real server
    row["established_before"] = len(before_est)
    row["established_kept"] = before_est <= after_est
    per: dict[str, Any] = {}
    where = {c: rs for c, _spi, rs in before_est}
    for role in ("c1", "c2", "c3"):
        got = {addr: s1[role] - sinks0[addr][role] for addr, s1 in sinks1.items()}
        total = sum(got.values())
        sent = esp.sent[role]
        src = lab.nat_public if role == "c3" else lab.client_addrs[role]
        per[role] = {"sent": sent, "delivered": total, "loss_pct": 100.0 * (1 - total / sent) if sent else 0.0,
                     "one_rs": total == got.get(where.get(src), -1)}  # fmt: skip
    row["esp"] = per
    row["esp_loss_pct"] = max(p["loss_pct"] for p in per.values())
    row["esp_one_rs"] = all(p["one_rs"] for p in per.values())
    row["new_client_during"] = newcomer
    row["new_client_after"] = after_new
    return row


HEADER = (f"{'dataplane':<9}{'target':>7}{'offered':>9}{'x table':>8}{'admit/s':>9}{'rate-lim':>10}{'reclaim':>9}"
          f"{'full':>6}{'nfq drop':>10}{'daemon%':>8}{'us/fl':>6}{'us/hd':>6}{'cpu0%':>6}{'cpu1%':>6}"
          f"{'est kept':>9}{'ESP loss%':>10}{'new (during)':>16}{'new (after)':>14}{'others%':>8}")  # fmt: skip


def newcomer_str(n: dict[str, Any]) -> str:
    if not n:
        return "?"
    return f"{'ok' if n['ok'] else 'NO'} {n['seconds']:.2f}s/{n['tries']}"


def print_row(r: dict[str, Any]) -> None:
    us_f, us_h = r["daemon_us_per_flood_pkt"], r["daemon_us_per_handled_pkt"]
    print(f"{r['dataplane']:<9}{bd.fmt_rate(r['rate']):>7}{r['offered_pps']:>9,.0f}{r['x_table']:>8.1f}"
          f"{r['admitted_per_s_window']:>9,.0f}{r['rate_limited']:>10,}{r['reclaimed_init']:>9,}{r['table_full']:>6,}"
          f"{r['nfq_dropped']:>10,}{r['daemon_cpu_pct']:>8.0f}{'' if us_f is None else f'{us_f:.1f}':>6}"
          f"{'' if us_h is None else f'{us_h:.1f}':>6}{r['cpu_busy_pct'].get(0, 0):>6.0f}{r['cpu_busy_pct'].get(1, 0):>6.0f}"
          f"{'yes' if r['established_kept'] else 'NO':>9}{r['esp_loss_pct']:>10.1f}"
          f"{newcomer_str(r['new_client_during']):>16}{newcomer_str(r['new_client_after']):>14}"
          f"{r['others_cpu_pct']:>8.0f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two rates, 1.5 s floods (about a minute)")
    ap.add_argument("--rates", help="comma-separated offered flood rates in pps, 0 = unlimited")
    ap.add_argument("--seconds", type=float, help="flood duration per rate (at most 10)")
    ap.add_argument("--dataplanes", default="nfqueue,ebpf", help="comma-separated: nfqueue, ebpf")
    ap.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_flood: needs root (network namespaces, iptables, AF_PACKET)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench_flood: needs 2 CPUs (generator and daemon on different cores)", file=sys.stderr)
        return 2
    bd.build_pktgen()
    os.sched_setaffinity(0, {bd.GEN_CPU})
    name = "quick" if args.quick else "full"
    prof = dict(PROFILES[name])
    if args.rates:
        prof["rates"] = [int(x) for x in args.rates.split(",")]
    if args.seconds:
        prof["seconds"] = min(10.0, args.seconds)
    mach = bd.machine()
    mach["commit"] = bd.commit()
    load0 = bd.loadavg()
    print(f"vpn-director flood benchmark ({name}: {prof['seconds']} s floods at {', '.join(bd.fmt_rate(r) for r in prof['rates'])})")
    print(f"machine: {mach['nproc']} CPU, {mach['cpu']}; kernel {mach['kernel']}; commit {mach['commit']}")
    idle = bd.busy_before()
    print(f"load average at start: {load0}; CPU busy before: " + ", ".join(f"cpu{c} {v:.0f}%" for c, v in sorted(idle.items())))
    if max(idle.values()) > 10:
        print("!! other work is running on this machine: the CPU figures below are skewed by it")
    print(f"daemon: DR, capacity {CAPACITY}, " + ", ".join(f"{k} {v}" for k, v in LIMITS.items())
          + f"; pinned to CPU {bd.DAEMON_CPU}; flood from pktgen on CPU {bd.GEN_CPU}, a new source per packet")
    print("admit/s = new entries per second in the flood's second half (after the limiter's burst); rate-lim = dropped by the new-entry limit; reclaim = INIT "
          "entries reclaimed under pressure; full = TABLE_FULL; us/fl = daemon CPU us per flood packet offered, us/hd "
          "= per packet it handled; est kept = every established entry still there (same SPI, same real server); "
          f"ESP loss = worst of the three clients ({ESP_PPS} pps each); new = c4's IKEv2 exchange: result, "
          "seconds from the first try / tries\n")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    run_no = 0
    for dp in [x.strip() for x in args.dataplanes.split(",") if x.strip()]:
        with Lab("dr") as lab:
            lab.start_responders()
            add_c4(lab)
            b = bd.Bench(lab, dict(bd.PROFILES["quick"]), [])
            for role in lab.rs_roles:
                for match in esp_sink_rules(lab).values():
                    lab.run(role, ["iptables", "-w", "-t", "raw", "-A", "PREROUTING", *match, "-j", "DROP"])
            for rate in prof["rates"]:
                run_no += 1
                row = one_rate(b, dp, rate, prof, run_no)
                rows.append(row)
                print_row(row)
    wall = time.monotonic() - t0
    load1 = bd.loadavg()
    print(f"\ndone in {wall:.0f} s; load average at end: {load1}")
    if args.json:
        doc = {"profile": name, "settings": prof, "capacity": CAPACITY, "limits": LIMITS, "esp_pps": ESP_PPS,
               "machine": mach, "load_start": load0, "load_end": load1, "cpu_busy_before_pct": idle, "wall_s": wall,
               "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
