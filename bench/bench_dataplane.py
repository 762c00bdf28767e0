"""Dataplane benchmark: packets/s delivered at the real servers through the real daemon, in the lab.

Not a test: it prints numbers and ratios measured in one run on one path, and passes or fails
nothing. The path is the lab's (docs/lab.md): client c1 -> bridge -> director eth0 -> director
eth1 -> bridge -> real server, all veth in namespaces. Traffic is one flow of 64-byte-payload ESP
(an ESP packet of SPI + sequence + 64 bytes, a 106-byte frame), or IKE, from c1's eth0.

    .venv/bin/python bench/bench_dataplane.py [--quick] [--json out.json] [--only fastpath|classic|return]

Cases, every one on the same path in the same run (docs/performance.md states the targets):
  a   plain kernel IP forwarding: ESP to rs1's own address, routed by the director, no daemon.
  a2  the same with the director's receive processing steered to CPU 1 by RPS: the two-core
      layout of the daemon cases (there, forwarding after a verdict runs on the daemon's core).
  a0  the raw NetfilterQueue loop (set_mark + accept, nothing else) on that same path: the
      denominator of the slow-path target ("0.8x the raw NetfilterQueue mark loop").
  b   ESP to the VIP through the daemon (NFQUEUE) in DR, TUN and NAT mode, c1 established by an
      IKEv2 exchange first, at several offered rates and unlimited (saturation, collapse); in
      the full run once more with the daemon on the generator's core (the collapse layout:
      daemon and softirq on one core).
  c   IKE through the daemon: non-initial messages of the established client (INFORMATIONAL on
      4500), and initial IKE_SA_INIT from a new initiator SPI per packet (new ISAKMP entries/s).
  d   what a user might build instead: iptables DNAT (conntrack) of ESP to rs1, no daemon.
  a'  (full run) plain forwarding again at the end: how much the machine drifted during the run.

Group r (``--only return``, only on request): the return path through the director (DR replies
from the VIP, ``return_path = "director"``), the eBPF reply program against the kernel's plain
forwarding of the same replies, per packet on the director's core (see ReturnBench).

Group f, the director's own cost (``--only fastpath`` runs just this group, about 8 minutes full,
under a minute with --quick). Above, (a), (d) and (e) run the whole path in the generator's
softirq on CPU 0, so they measure "generator + path on one core" and cannot show the fast path's
cost. Group f steers the director's receive processing to CPU 1 by RPS (rps_cpus of the
director's eth0 = CPU 1), so CPU 1 runs the director's forwarding (plus the downstream bridge hop
and the real server's receive, the same work in every case), and measures, per lab mode (DR, TUN,
NAT), in ``fp_rounds`` rounds (full 3) with the case order reversed every other round:
  a2  plain forwarding (ESP to rs1's own address, no daemon).
  e2  the eBPF fast path at the tc hook (daemon --dataplane ebpf, c1 established).
  x2  the eBPF fast path at the XDP hook (``daemon.fastpath_hook = "xdp"``), with the director's
      eth0 in threaded NAPI and its NAPI thread pinned to CPU 1 (SCHED_FIFO 50, as softirq work
      would preempt user processes). Why: XDP runs in the veth's NAPI poll, before RPS, and a
      veth's NAPI is scheduled on the CPU that transmitted into it, i.e. the generator's CPU 0;
      with XDP_REDIRECT the packet never becomes an skb on eth0, so RPS never moves it. Threaded
      NAPI is the only way to give XDP the director's core on this path.
  x0  the same XDP hook in plain (softirq) NAPI: the default layout. Its XDP work and everything
      after the redirect land on CPU 0, beside the generator; CPU 1 is nearly idle. Only the
      both-cores figure compares it with the others.
  d2  iptables DNAT with conntrack (NAT lab only).
  t2  the limit case at tc (layout of e2) and y2 at XDP (layout of x2), no daemon: bench/limit.bpf.c
      built in this run for rs1 (limit_case.py), forwarding every ESP frame with only the rewrite
      the mode needs and no lookup at all. e2 and x2 are also given as ratios to them.
  --family 6 runs the group on a dual-stack lab's IPv6 path (modes dr6 and nat6: ESP from c1's
  IPv6 address, a2 to rs1's IPv6 address, e2/x2/x0 to the IPv6 VIP; no limit or DNAT case), and
  --family both runs the IPv4 and the IPv6 labs in one run.
  --bpf-stats adds the program's own run time per packet (kernel.bpf_stats_enabled) to e2, t2,
  x2, y2 and x0; --headroom nic gives the frames NIC-like headroom (generic XDP pass-through on
  the generator's switch port); --plot PNG draws the summary.
Every case of the group runs with the same lab changes: RPS as above; GRO on the LAN bridge's
port of the director's eth1 (a veth peer must run NAPI to take XDP redirects; on for every case so
the downstream hop is the same); the director's raw, mangle and nat tables instantiated up front
(iptables-legacy keeps a table's hooks once it exists). Each case at one fixed offered rate
(``--fixed-rate``, default 0.4x the first a2's delivered rate at max, rounded down to 10k: x0
carries only about 200 kpps) and unlimited. Reported per case: delivered pps, loss, each core's
busy % (wall clock minus idle: on this kernel the tick-sampled busy fields miss softirq work done
on interrupt exit from idle), **CPU-1 µs per delivered packet** (CPU 1 busy fraction / delivered
pps: what the director's core pays per packet), **total µs per delivered packet** (both cores,
generator included: the fair cross-layout number, x0's only meaningful one) and the same without
other people's CPU (their processes' ticks; not per core, so only the total can be corrected);
then medians and min-max over the rounds, and ratios to a2 of the same lab: capacity (delivered at
max) and per-packet cost. The daemon is restarted for every daemon case and its programs and maps
removed after (``vpn-director cleanup``), so a2 and d2 never run with a program attached.

How it measures:
  - Offered load: bench/build/pktgen (AF_PACKET, sendmmsg batches, PACKET_QDISC_BYPASS,
    SO_SNDBUFFORCE) in c1, pinned to CPU 0; the daemon (all its threads) pinned to CPU 1; this
    script pins itself to CPU 0 so its sampling never takes the daemon's core.
  - Delivery is counted at the real servers: an iptables raw-table DROP rule per kind of benchmark
    traffic (source c1: esp, udp/500, udp/4500) in rs1..rs3, so the real server's stack does no
    work past PREROUTING; the rules' packet counters give the exact totals (loss %). The delivered
    rate is the rise of rx_packets on the real servers' eth0 (pyroute2) over a window inside the
    send (the first and last moments cut off), so a queue drained after the sender stopped does
    not flatter it.
  - Also per case: the daemon's CPU% (utime+stime from /proc/PID/stat over the window; softirq
    work run in its context, such as forwarding after a verdict, counts as its stime on this
    kernel), each CPU's busy % and softirq share (/proc/stat), NFQUEUE drops (queue full /
    socket buffer overrun, /proc/net/netfilter/nfnetlink_queue), backlog drops
    (/proc/net/softnet_stat) and the answer time of the control socket during the load.
  - Other people's work on a shared machine skews everything: each case reports the CPU % their
    processes used in the window; above 10% the case is repeated (full run: up to twice, after
    waiting up to 10 s for the machine to go quiet) and the least disturbed attempt is kept.

Bounded: each case sends for a fixed time (full 3 s, --quick 1.2 s); pktgen itself stops at 30 s;
the full run takes about 3 minutes, --quick under a minute. Every lab is built with ``with Lab``
and torn down even on failure. All traffic stays in the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from director.lab import craft  # noqa: E402
from director.lab.client import LabClient  # noqa: E402
from director.lab.director_proc import DirectorProcess  # noqa: E402
from director.lab.netns import Lab  # noqa: E402
from director.packet import INFORMATIONAL  # noqa: E402

import limit_case  # noqa: E402  (bench/, beside this script)

BENCH = Path(__file__).resolve().parent
PKTGEN = BENCH / "build" / "pktgen"
GEN_CPU, DAEMON_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

ESP_SIZE = 64  # bytes after the ESP header (SPI, sequence): LabClient.send_esp's default
ESP_SPI = 0x0000BE01
OTHERS_LIMIT = 10.0  # % of a CPU used by other people's processes above which a case is repeated
QUIET_WAIT = 10.0  # before a repeat, wait this long at most for a quiet machine
CAPACITY = 1 << 20  # table slots: a few seconds of initial-IKE flood fit without reclaiming
ETH, IP, UDP, MARKER = 14, 20, 8, 4
IP6 = 40
# where pktgen writes its per-packet counter
OFF_ESP_SEQ = ETH + IP + 4  # the ESP sequence number
OFF_IKE_MSGID = ETH + IP + UDP + MARKER + 20  # message ID of an IKE message on 4500
OFF_IKE_SPI_LOW = ETH + IP + UDP + 4  # low half of the initiator SPI of an IKE message on 500

PROFILES: dict[str, dict[str, Any]] = {
    # seconds per case, window cut at the start / end, wait for queues to drain after a case;
    # repeats of a disturbed case, and the run's total wait for a quiet machine before repeats
    "full": dict(seconds=3.0, warm=0.6, tail=0.3, settle=0.5,
                 esp_rates=[20_000, 50_000, 100_000, 200_000, 0], ike_rates=[20_000, 100_000, 0],
                 raw_rates=[100_000, 0], dnat_rates=[200_000, 0], shared_core=True, plain_again=True,
                 retries=2, quiet_budget=90.0,
                 fp_rounds=3, fp_seconds=2.0, fp_warm=0.5, fp_tail=0.2, fp_settle=0.4, fp_modes=["dr", "tun", "nat"]),
    "quick": dict(seconds=1.2, warm=0.3, tail=0.15, settle=0.3,
                  esp_rates=[50_000, 0], ike_rates=[0], raw_rates=[0], dnat_rates=[0],
                  shared_core=False, plain_again=False, retries=0, quiet_budget=0.0,
                  fp_rounds=1, fp_seconds=1.2, fp_warm=0.3, fp_tail=0.15, fp_settle=0.3, fp_modes=["dr", "nat"]),
}  # fmt: skip

# The raw NetfilterQueue loop of case a0: the "mark loop" of docs/performance.md, nothing else.
RAW_LOOP = r"""
import socket, sys
from netfilterqueue import NetfilterQueue
def cb(pkt):
    pkt.set_mark(1)
    pkt.accept()
q = NetfilterQueue()
q.bind(0, cb, max_len=8192, sock_len=64 << 20)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12, fileno=q.get_fd())
print("ready", flush=True)
q.run_socket(s)
"""


# -- small helpers ---------------------------------------------------------------------------------


def build_pktgen() -> None:
    """``make -C bench`` when the binary is missing or older than its source; fails loudly."""
    src = BENCH / "pktgen.c"
    if PKTGEN.is_file() and PKTGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    proc = subprocess.run(["make", "-C", str(BENCH)], capture_output=True, text=True)
    if proc.returncode or not PKTGEN.is_file():
        raise SystemExit(f"bench_dataplane: `make -C {BENCH}` failed:\n{proc.stdout}{proc.stderr}")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": sys.version.split()[0], "platform": platform.platform()}  # fmt: skip


def commit() -> str:
    """The checkout measured: HEAD, plus "+dirty" when director/ has uncommitted changes (read-only git)."""
    repo = BENCH.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "director"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def proc_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def cpu_times() -> dict[int, tuple[int, int, int, int]]:
    """Per CPU: (busy, softirq, total, idle + iowait) jiffies from /proc/stat.

    This kernel has tick-based accounting (no CONFIG_IRQ_TIME_ACCOUNTING) and NO_HZ_IDLE: idle is
    measured exactly, but the busy fields are sampled by the tick, and softirq work done on an
    interrupt's exit from idle is seen by no tick at all, so "total" falls short of the wall
    clock on a lightly loaded core. ``busy_wall`` (wall minus idle) does not have that bias."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total = sum(v)
                out[int(name[3:])] = (total - v[3] - v[4], v[6], total, v[3] + v[4])
    return out


def busy_before(seconds: float = 1.0) -> dict[int, float]:
    """Each CPU's busy % over ``seconds`` before the run: work that is not ours skews every number."""
    a = cpu_times()
    time.sleep(seconds)
    b = cpu_times()
    return {c: 100.0 * (b[c][0] - a[c][0]) / max(1, b[c][2] - a[c][2]) for c in b}


PF_KTHREAD = 0x00200000


def foreign_ticks(lab_netns: set[tuple[int, int]]) -> dict[int, int]:
    """utime+stime of every user process that is not ours: not this script, not in a lab namespace.

    Kernel threads are left out on purpose: ksoftirqd does our packets' work when softirq load is
    high. What remains is other people's work on a shared machine, which skews the numbers.
    """
    me = os.getpid()
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[6]) & PF_KTHREAD:
                continue
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in lab_netns:
            out[int(entry)] = int(fields[11]) + int(fields[12])
    return out


def wait_for_quiet(limit: float) -> float:
    """Wait (at most ``limit`` s) until no CPU is more than 10% busy for 1 s; returns the time spent.

    Between cases nothing of ours runs, so any load is someone else's.
    """
    t0 = time.monotonic()
    quiet = 0
    while time.monotonic() - t0 < limit and quiet < 2:
        a = cpu_times()
        time.sleep(0.5)
        b = cpu_times()
        busy = max(100.0 * (b[c][0] - a[c][0]) / max(1, b[c][2] - a[c][2]) for c in b)
        quiet = quiet + 1 if busy < 10 else 0
    return time.monotonic() - t0


def ksoftirqd_pids() -> dict[int, int]:
    """CPU number -> pid of its ksoftirqd thread."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm.startswith("ksoftirqd/"):
                out[int(comm.split("/", 1)[1])] = int(entry)
    return out


def softnet_dropped() -> int:
    """Packets dropped because a CPU's input backlog was full (all CPUs, all namespaces)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)


def zero_udp_checksum(ip: bytes) -> bytes:
    """RFC 768: a zero UDP checksum means none; pktgen may then vary the payload freely."""
    return ip[: IP + 6] + b"\0\0" + ip[IP + 8 :]


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


# -- one lab's measuring kit -----------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    tx: int  # tx_packets of c1's eth0: what the generator got onto the wire
    rx: int  # rx_packets summed over the real servers' eth0
    cpus: dict[int, tuple[int, int, int]]
    daemon: int | None  # utime + stime ticks of the measured process
    ksoftirqd: dict[int, int]  # utime + stime ticks of each CPU's ksoftirqd


@dataclass
class Case:
    group: str  # a, a0, b, c, c-new, d, a'
    label: str
    mode: str
    rate: int  # offered target, packets/s; 0 = as fast as the generator goes
    row: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Frames, sinks and counters for one Lab; ``run`` measures one case."""

    def __init__(self, lab: Lab, prof: dict[str, Any], out: list[dict[str, Any]], v6: bool = False) -> None:
        """``v6``: c1's traffic is IPv6 (a dual-stack lab, group f only): ESP from c1's IPv6 address,
        sinks in ip6tables, the ESP sequence number 20 bytes further in."""
        self.lab = lab
        self.prof = prof
        self.out = out
        self.v6 = v6
        self.c1 = lab.client_addr6_ints["c1"] if v6 else lab.client_addr_ints["c1"]
        self.seq_off = OFF_ESP_SEQ + (IP6 - IP if v6 else 0)
        dmac = self._mac("director", "eth0")
        smac = self._mac("c1", "eth0")
        self.l2 = mac_bytes(dmac) + mac_bytes(smac) + (b"\x86\xdd" if v6 else b"\x08\x00")
        self.rs_ipr = {role: lab.ipr(role) for role in lab.rs_roles}
        self.rs_idx = {role: ipr.link_lookup(ifname="eth0")[0] for role, ipr in self.rs_ipr.items()}
        self.c1_ipr = lab.ipr("c1")
        self.c1_idx = self.c1_ipr.link_lookup(ifname="eth0")[0]
        self.measured_pid: int | None = None
        self.director: DirectorProcess | None = None
        self.ike_run = 0
        self.ksoftirqd = ksoftirqd_pids()
        self.lab_netns: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the lab's namespaces
        for name in lab.ns.values():
            st = os.stat(f"/run/netns/{name}")
            self.lab_netns.add((st.st_dev, st.st_ino))

    def _mac(self, role: str, ifname: str) -> str:
        ipr = self.lab.ipr(role)
        return ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")

    # -- frames ---------------------------------------------------------------------------------
    def frame(self, ip: bytes) -> str:
        return (self.l2 + ip).hex()

    def esp_to(self, dst: int) -> str:
        return self.frame(craft.esp(self.c1, dst, ESP_SPI, 1, size=ESP_SIZE))

    def ike_info(self, spi_i: int, spi_r: int) -> str:
        """A non-initial IKEv2 INFORMATIONAL of the established conversation, on 4500, 64 bytes."""
        ip = craft.ike(self.c1, self.lab.vip_int, spi_i, spi_r, natt=True, sport=4500,
                       exchange=INFORMATIONAL, body=bytes(36))  # fmt: skip
        return self.frame(zero_udp_checksum(ip))

    def ike_new(self) -> str:
        """IKE_SA_INIT on 500; pktgen writes a counter into the SPI's low half: a new SPI per packet.

        The high half changes per run, so a second run creates entries too (no retransmits).
        """
        self.ike_run += 1
        spi_i = (0x5EED0000 | self.ike_run) << 32
        ip = craft.ike(self.c1, self.lab.vip_int, spi_i, 0, body=bytes(36))
        return self.frame(zero_udp_checksum(ip))

    # -- sinks and counters -----------------------------------------------------------------------
    SINKS = {"esp": (["-p", "esp"],), "ike": (["-p", "udp", "--dport", "500"], ["-p", "udp", "--dport", "4500"])}

    def install_sinks(self, kind: str) -> None:
        """raw PREROUTING DROP of c1's ``kind`` traffic in every real server (counted per rule).

        IKE sinks go in only after the client's handshake, which needs the responders.
        """
        c1 = self.lab.client_addrs6["c1"] if self.v6 else self.lab.client_addrs["c1"]
        for role in self.lab.rs_roles:
            for match in self.SINKS[kind]:
                self.lab.run(role, [self.iptables, "-w", "-t", "raw", "-A", "PREROUTING", "-s", c1, *match, "-j", "DROP"])

    @property
    def iptables(self) -> str:
        return "ip6tables" if self.v6 else "iptables"

    def sink_total(self) -> int:
        total = 0
        for role in self.lab.rs_roles:
            text = self.lab.run(role, [self.iptables, "-w", "-t", "raw", "-L", "PREROUTING", "-n", "-v", "-x"]).stdout
            for line in text.splitlines()[2:]:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "DROP":
                    total += int(parts[0])
        return total

    def tx(self) -> int:
        return self.c1_ipr.link("get", index=self.c1_idx)[0].get_attr("IFLA_STATS64")["tx_packets"]

    def rx(self) -> int:
        total = 0
        for role, ipr in self.rs_ipr.items():
            stats = ipr.link("get", index=self.rs_idx[role])[0].get_attr("IFLA_STATS64")
            total += stats["rx_packets"]
        return total

    def nfq_dropped(self) -> int:
        """queue_dropped + user_dropped over the director namespace's queues."""
        text = self.lab.run("director", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
        return sum(int(p[5]) + int(p[6]) for p in (line.split() for line in text.splitlines()) if len(p) >= 7)

    def daemon_packets(self) -> int | None:
        if self.director is None:
            return None
        return self.director.status()["stats"]["packets"]

    def sample(self) -> Sample:
        pid = self.measured_pid
        return Sample(time.monotonic(), self.tx(), self.rx(), cpu_times(), proc_cpu_ticks(pid) if pid else None,
                      {c: proc_cpu_ticks(p) for c, p in self.ksoftirqd.items()})

    # -- one case ---------------------------------------------------------------------------------
    def pktgen(self, hexframe: str, rate: int, seconds: float, seq_off: int, count: int | None = None):
        if count is None:
            count = int(rate * seconds) if rate else 50_000_000
        batch = 64 if not rate else max(1, min(64, rate // 5000))  # paced: at most ~5000 batches/s
        argv = ["taskset", "-c", str(GEN_CPU), str(PKTGEN), "eth0", hexframe, str(count),
                "--rate", str(rate), "--batch", str(batch), "--seconds", str(seconds),
                "--seq-offset", str(seq_off)]  # fmt: skip
        return self.lab.popen("c1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def warm_up(self, hexframe: str, seq_off: int, what: str) -> None:
        """A short burst: resolves neighbours, teaches the bridges, and proves the path works."""
        self.lab.ping("c1", self.lab.director_wan)
        before = self.sink_total()
        proc = self.pktgen(hexframe, 20_000, 1.0, seq_off, count=1000)
        proc.communicate(timeout=30)
        time.sleep(0.2)
        got = self.sink_total() - before
        if got < 900:
            raise RuntimeError(f"{self.lab.mode}: only {got} of 1000 {what} packets reached the real servers; "
                               f"daemon log:\n{self.director.log() if self.director else '(no daemon)'}")

    def run(self, case: Case, frame: str | Callable[[], str], seq_off: int) -> dict[str, Any]:
        """Measure one case; repeat it (up to ``retries`` times) while other work disturbs it.

        ``frame`` may be a callable giving a fresh frame per attempt (new initiator SPIs).
        """
        attempts = []
        tries = 1 + self.prof["retries"]
        for i in range(tries):
            row = self._run_once(case, frame() if callable(frame) else frame, seq_off)
            attempts.append(row)
            if row["others_cpu_pct"] <= OTHERS_LIMIT or i == tries - 1:
                break
            print_row(row, note=f"  <- repeated: other work took {row['others_cpu_pct']:.0f}% CPU")
            waited = wait_for_quiet(min(QUIET_WAIT, self.prof["quiet_budget"]))
            self.prof["quiet_budget"] -= waited  # shared by every lab of the run
        row = min(attempts, key=lambda r: r["others_cpu_pct"])
        row["attempts"] = len(attempts)
        note = ""
        if len(attempts) > 1:
            row["discarded"] = [r for r in attempts if r is not row]
            note = f"  <- kept (least disturbed of {len(attempts)})"
        if row["others_cpu_pct"] > OTHERS_LIMIT:
            note += "  <- disturbed by other work"
        case.row = row
        self.out.append(row)
        print_row(row, note=note)
        return row

    def _run_once(self, case: Case, hexframe: str, seq_off: int) -> dict[str, Any]:
        p = self.prof
        self.lab.ping("c1", self.lab.director_wan)  # keep the wan bridge's entry for the director fresh
        sink0, nfq0, back0, dpk0 = self.sink_total(), self.nfq_dropped(), softnet_dropped(), self.daemon_packets()
        start = time.monotonic()
        proc = self.pktgen(hexframe, case.rate, p["seconds"], seq_off)
        time.sleep(p["warm"])
        others = OthersSampler(self.lab_netns)
        a = self.sample()
        probe = ControlProbe(self.director, p["seconds"] + 5) if self.director else None
        end_at = start + p["seconds"] - p["tail"]
        while time.monotonic() < end_at and proc.poll() is None:
            time.sleep(0.01)
        b = self.sample()
        others.finish()
        try:
            stdout, stderr = proc.communicate(timeout=p["seconds"] + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if proc.returncode:
            raise RuntimeError(f"pktgen exited {proc.returncode}: {stderr.strip()}")
        gen = json.loads(stdout.strip().splitlines()[-1])
        time.sleep(p["settle"])
        if probe:
            probe.join()
        delivered = self.sink_total() - sink0
        dt = b.t - a.t
        row: dict[str, Any] = {
            "group": case.group, "case": case.label, "mode": case.mode, "rate": case.rate,
            "sent": gen["sent"], "gen_seconds": gen["seconds"], "gen_pps": gen["pps"],
            "offered_pps": (b.tx - a.tx) / dt if dt > 0 else 0.0,
            "gen_errors": gen["errors"], "batch": gen["batch"],
            "delivered": delivered, "delivered_pps": (b.rx - a.rx) / dt if dt > 0 else 0.0,
            "window_s": dt,
            "loss_pct": 100.0 * (1 - delivered / gen["sent"]) if gen["sent"] else 0.0,
            "nfq_dropped": self.nfq_dropped() - nfq0, "backlog_dropped": softnet_dropped() - back0,
        }  # fmt: skip
        ticks = {c: (b.cpus[c][0] - a.cpus[c][0], b.cpus[c][1] - a.cpus[c][1], b.cpus[c][2] - a.cpus[c][2])
                 for c in b.cpus}  # fmt: skip
        row["cpu_busy_pct"] = {c: 100.0 * busy / tot if tot else 0.0 for c, (busy, _, tot) in ticks.items()}
        row["cpu_softirq_pct"] = {c: 100.0 * si / tot if tot else 0.0 for c, (_, si, tot) in ticks.items()}
        # busy = wall clock minus idle (see cpu_times: the tick-sampled busy fields miss work)
        row["cpu_busy_wall_pct"] = {c: max(0.0, 100.0 * (1 - (b.cpus[c][3] - a.cpus[c][3]) / (dt * CLK_TCK)))
                                    for c in b.cpus} if dt > 0 else {}  # fmt: skip
        # softirq work deferred to ksoftirqd competes with the daemon for its core (the collapse layout)
        row["ksoftirqd_pct"] = {c: 100.0 * (b.ksoftirqd[c] - a.ksoftirqd.get(c, 0)) / CLK_TCK / dt
                                for c in b.ksoftirqd} if dt > 0 else {}  # fmt: skip
        row["others_cpu_pct"] = 100.0 * others.ticks / CLK_TCK / dt if dt > 0 else 0.0
        if a.daemon is not None and b.daemon is not None and dt > 0:
            row["daemon_cpu_pct"] = 100.0 * (b.daemon - a.daemon) / CLK_TCK / dt
            if row["delivered_pps"] > 0:  # CPU time of the daemon per packet it got through
                row["daemon_us_per_pkt"] = 1e6 * row["daemon_cpu_pct"] / 100.0 / row["delivered_pps"]
        if dpk0 is not None:
            row["daemon_packets"] = self.daemon_packets() - dpk0
        if probe:
            row["control_answer_s"] = probe.seconds
        return row


class OthersSampler(threading.Thread):
    """CPU time of other people's processes over the window, short-lived ones included.

    Scans /proc every ``PERIOD`` (about 1.3 ms of CPU 0 per scan here): a process first seen after
    the first scan started inside the window, so all its time counts; a process that lives less
    than one period between two scans is missed.
    """

    PERIOD = 0.1

    def __init__(self, lab_netns: set[tuple[int, int]]) -> None:
        super().__init__(daemon=True)
        self.lab_netns = lab_netns
        self.first = foreign_ticks(lab_netns)
        self.last = dict(self.first)
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(self.PERIOD):
            self.last.update(foreign_ticks(self.lab_netns))

    def finish(self) -> None:
        self.done.set()
        self.join()
        self.last.update(foreign_ticks(self.lab_netns))

    @property
    def ticks(self) -> int:
        return sum(t - self.first.get(pid, 0) for pid, t in self.last.items())


class ControlProbe(threading.Thread):
    """One status request to the daemon while it is under load; ``seconds`` = answer time or None."""

    def __init__(self, director: DirectorProcess, timeout: float) -> None:
        super().__init__(daemon=True)
        self.director = director
        self.timeout = timeout
        self.seconds: float | None = None
        self.start()

    def run(self) -> None:
        from director.control_client import control_request

        t0 = time.monotonic()
        try:
            control_request(str(self.director.control), {"cmd": "status"}, timeout=self.timeout)
            self.seconds = time.monotonic() - t0
        except OSError:
            self.seconds = None


# -- output ----------------------------------------------------------------------------------------

HEADER = (f"{'case':<34}{'mode':<5}{'target':>9}{'offered':>10}{'delivered':>11}{'loss%':>7}"
          f"{'daemon%':>8}{'us/pkt':>7}{'cpu0%':>7}{'cpu1%':>7}{'si1%':>6}{'ksi1%':>6}{'nfq drop':>10}{'ctl s':>7}{'others%':>8}")  # fmt: skip


def fmt_rate(r: float) -> str:
    return "max" if r == 0 else f"{r / 1000:.0f}k"


def print_row(r: dict[str, Any], note: str = "") -> None:
    d = r.get("daemon_cpu_pct")
    us = r.get("daemon_us_per_pkt")
    ctl = r.get("control_answer_s", "")
    ctl_s = "" if ctl == "" else ("TIMEOUT" if ctl is None else f"{ctl:.2f}")
    busy, si = r["cpu_busy_pct"], r["cpu_softirq_pct"]
    print(f"{r['case']:<34}{r['mode']:<5}{fmt_rate(r['rate']):>9}{r['offered_pps']:>10,.0f}"
          f"{r['delivered_pps']:>11,.0f}{r['loss_pct']:>7.1f}{'' if d is None else f'{d:.0f}':>8}{'' if us is None else f'{us:.1f}':>7}"
          f"{busy.get(0, 0):>7.0f}{busy.get(1, 0):>7.0f}{si.get(1, 0):>6.0f}{r['ksoftirqd_pct'].get(1, 0):>6.0f}"
          f"{r['nfq_dropped']:>10,}"
          f"{ctl_s:>7}{r['others_cpu_pct']:>8.0f}{note}", flush=True)  # fmt: skip


# -- the cases, lab by lab -------------------------------------------------------------------------


def start_daemon(lab: Lab, cpu: int, dataplane: str = "nfqueue", hook: str | None = None,
                 extra: str = "", capacity: int = CAPACITY) -> DirectorProcess:
    """The daemon in the lab, pinned to ``cpu``; ``hook`` sets daemon.fastpath_hook ("tc"/"xdp"),
    ``extra`` adds lines to [daemon]."""
    d = DirectorProcess(lab, scheduler="rr", dataplane=dataplane)
    text = d.config_path.read_text()
    lines = f"capacity = {capacity}\n" + (f'fastpath_hook = "{hook}"\n' if hook else "") + extra
    d.config_path.write_text(text.replace("[daemon]\n", f"[daemon]\n{lines}", 1))
    d.start()
    pin(d.proc.pid, cpu)
    return d


def plain_cases(bench: Bench, group: str = "a") -> None:
    """a: ESP to rs1's own address, routed by the director's kernel, no daemon."""
    lab = bench.lab
    lab.ipr("c1").route("replace", dst=lab.lan_net, gateway=lab.director_wan)  # the lab has no such route
    frame = bench.esp_to(lab.rs_addr_ints[0])
    bench.warm_up(frame, OFF_ESP_SEQ, "plain ESP")
    label = "a  plain IP forwarding" if group == "a" else "a' plain IP forwarding (again)"
    bench.run(Case(group, label, lab.mode, 0), frame, OFF_ESP_SEQ)
    if group != "a":
        return
    # a2: the same, with the director's receive processing steered to the daemon's core by RPS, the
    # two-core layout of the daemon cases (there, work after a verdict runs on CPU 1).
    rps = "/sys/class/net/eth0/queues/rx-0/rps_cpus"  # `ip netns exec` mounts the namespace's /sys
    lab.run("director", ["sh", "-c", f"echo {1 << DAEMON_CPU:x} > {rps}"])
    try:
        bench.run(Case("a2", "a2 plain, director on CPU 1 (RPS)", lab.mode, 0), frame, OFF_ESP_SEQ)
    finally:
        lab.run("director", ["sh", "-c", f"echo 0 > {rps}"])


def raw_loop_cases(bench: Bench) -> None:
    """a0: the same plain path, every packet through a bare NetfilterQueue mark+accept loop."""
    lab = bench.lab
    rule = ["PREROUTING", "-i", "eth0", "-d", lab.rs_addrs[0], "-p", "esp", "-j", "NFQUEUE", "--queue-num", "0"]
    proc = lab.popen("director", [sys.executable, "-c", RAW_LOOP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)  # fmt: skip
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"raw NetfilterQueue loop did not start: {proc.stderr.read()}")
        pin(proc.pid, DAEMON_CPU)
        lab.run("director", ["iptables", "-w", "-t", "mangle", "-A", *rule])
        bench.measured_pid = proc.pid
        frame = bench.esp_to(lab.rs_addr_ints[0])
        bench.warm_up(frame, OFF_ESP_SEQ, "queued plain ESP")
        for rate in bench.prof["raw_rates"]:
            bench.run(Case("a0", "a0 raw NFQUEUE mark loop", lab.mode, rate), frame, OFF_ESP_SEQ)
    finally:
        bench.measured_pid = None
        lab.run("director", ["iptables", "-w", "-t", "mangle", "-D", *rule], check=False)
        proc.terminate()
        proc.wait(timeout=5)


def daemon_cases(bench: Bench, shared_core: bool) -> None:
    """b and c: the daemon forwards ESP and IKE of an established client."""
    lab, prof = bench.lab, bench.prof
    d = start_daemon(lab, DAEMON_CPU)
    bench.director, bench.measured_pid = d, d.proc.pid
    try:
        client = LabClient(lab, "c1")
        spi_i, spi_r, _ = client.ikev2_connect()
        client.close()
        bench.install_sinks("ike")
        esp = bench.esp_to(lab.vip_int)
        bench.warm_up(esp, OFF_ESP_SEQ, "ESP to the VIP")
        m = lab.mode.upper()
        for rate in prof["esp_rates"]:
            bench.run(Case("b", f"b  ESP via daemon ({m})", lab.mode, rate), esp, OFF_ESP_SEQ)
        info = bench.ike_info(spi_i, spi_r)
        for rate in prof["ike_rates"]:
            bench.run(Case("c", f"c  IKE non-initial ({m})", lab.mode, rate), info, OFF_IKE_MSGID)
        if shared_core:
            pin(d.proc.pid, GEN_CPU)  # the collapse layout: daemon and softirq on one core
            bench.run(Case("b-shared", f"b  ESP, daemon on gen. core ({m})", lab.mode, 0), esp, OFF_ESP_SEQ)
            pin(d.proc.pid, DAEMON_CPU)
        # Last: they leave hundreds of thousands of INIT entries of c1 behind. Before 8dac3de each
        # later ESP packet of c1 walked them all and the daemon stalled; now they must not matter,
        # but the other cases are then measured on a table like the one they started with.
        for rate in prof["ike_rates"]:
            bench.run(Case("c-new", f"c  IKE initial, new SPI ({m})", lab.mode, rate), bench.ike_new,
                      OFF_IKE_SPI_LOW)  # fmt: skip
        st = d.status()
        bench.out[-1]["daemon_status"] = {"entries": st["entries"], "table": st["table"], "stats": st["stats"],
                                          "drops": st["drops"]}  # fmt: skip
    finally:
        bench.director, bench.measured_pid = None, None
        rc = d.stop()
        if rc != 0:
            print(f"!! vpn-director exited {rc}:\n{d.log()[-2000:]}", flush=True)


def fastpath_cases(bench: Bench) -> None:
    """e: the eBPF fast path (tc) forwards the established client's ESP in the kernel."""
    lab = bench.lab
    d = start_daemon(lab, DAEMON_CPU, dataplane="ebpf")
    bench.director, bench.measured_pid = d, d.proc.pid
    try:
        client = LabClient(lab, "c1")
        client.ikev2_connect()
        client.close()
        esp = bench.esp_to(lab.vip_int)
        bench.warm_up(esp, OFF_ESP_SEQ, "ESP to the VIP (fast path)")
        bench.run(Case("e", f"e  ESP via eBPF fast path ({lab.mode.upper()})", lab.mode, 0), esp, OFF_ESP_SEQ)
        st = d.status()
        bench.out[-1]["fastpath"] = st.get("fastpath")
        bench.out[-1]["user_space_packets"] = st["stats"]["packets"]
    finally:
        bench.director, bench.measured_pid = None, None
        rc = d.stop()
        if rc != 0:
            print(f"!! vpn-director exited {rc}:\n{d.log()[-2000:]}", flush=True)


# -- group f: the director's own cost, its receive processing on its own core ----------------------

RPS_PATH = "/sys/class/net/eth0/queues/rx-0/rps_cpus"  # `ip netns exec` mounts the namespace's /sys
# The fixed rate as a share of a2's delivered rate at max: x0 (XDP with the whole path on the
# generator's core) carries only about 200 kpps here, a2 300-470 kpps: 0.4 keeps every case lossless.
FIXED_SHARE = 0.4
NAPI_PRIO = 50  # SCHED_FIFO priority of x2's NAPI thread (threaded IRQ handlers use 50 too)
FP_CASES = ("a2", "e2", "t2", "x2", "y2", "x0", "d2")
FP_LABELS = {
    "a2": "a2 plain forwarding (RPS->1)",
    "e2": "e2 eBPF tc (RPS->1)",
    "t2": "t2 limit case, tc (RPS->1)",
    "x2": "x2 eBPF XDP, NAPI thread on 1",
    "y2": "y2 limit case, XDP, NAPI on 1",
    "x0": "x0 eBPF XDP, NAPI in softirq",
    "d2": "d2 iptables DNAT (RPS->1)",
}
FP_HOOK = {"e2": "tc", "t2": "tc", "x2": "xdp", "y2": "xdp", "x0": "xdp"}  # where the case's program runs
FP_LIMIT_OF = {"e2": "t2", "x2": "y2"}  # the director's case -> the limit case of its hook and layout


def xdp_hook_supported() -> bool:
    """Whether this checkout's daemon knows ``daemon.fastpath_hook`` (another engineer's work)."""
    from director import config as config_mod

    return "fastpath_hook" in getattr(config_mod.DaemonConfig, "__dataclass_fields__", {})


def napi_threads(ifname: str) -> dict[int, str]:
    """pid -> name of every threaded-NAPI kernel thread of an interface called ``ifname`` (any netns)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith(f"napi/{ifname}-"):
            out[int(entry)] = comm
    return out


class FastpathGroup:
    """Group f: a2, e2, x2, x0 (and d2 in the NAT lab) interleaved in rounds in one lab.

    Every case of the group runs with the same lab changes: RPS on the director's eth0 to CPU 1;
    GRO on the LAN bridge port of the director's eth1 (the veth peer must run NAPI to take XDP
    redirects, and the downstream hop must be the same for every case); the director's raw, mangle
    and nat tables instantiated up front (iptables-legacy keeps a table's hooks once it exists, so a
    case after the daemon's or DNAT's rules would otherwise pay for empty tables the first did not).
    """

    def __init__(self, bench: Bench, fixed: dict[str, int], hook_ok: bool, bpf_stats: bool = False,
                 headroom: str = "veth") -> None:  # fmt: skip
        self.bench = bench
        self.lab = bench.lab
        self.fixed = fixed  # {"rate": pps}: set from the first a2 at max unless given
        self.hook_ok = hook_ok
        self.bpf_stats = bpf_stats  # the program's own run time per packet (kernel.bpf_stats_enabled)
        self.headroom = headroom
        lab = self.lab
        self.v6 = bench.v6
        self.mode = lab.mode + ("6" if bench.v6 else "")  # the rows' mode: dr6, nat6 for IPv6
        # the limit case: bench/limit.bpf.c built for this lab's rs1 (the server a2 forwards to)
        director = lab.ipr("director")
        self.limit_obj = None if bench.v6 else limit_case.build(
            lab.mode, director.link_lookup(ifname="eth1")[0], mac_bytes(bench._mac("rs1", "eth0")),
            mac_bytes(bench._mac("director", "eth1")), lab.rs_addr_ints[0], lab.director_lan_int,
            BENCH / "build" / f"limit-{lab.mode}-{os.getpid()}.o")  # fmt: skip
        if headroom == "nic":
            limit_case.headroom_on(lab, limit_case.build_pass())
        lab.ipr("c1").route("replace", dst=lab.lan_net, gateway=lab.director_wan)
        if bench.v6:
            lab.ipr("c1").route("replace", dst="2001:db8:18:1::/64", gateway=lab.director_wan6, family=socket.AF_INET6)
        lab.run("sw", ["ethtool", "-K", "director-eth1", "gro", "on"])
        for table in ("raw", "mangle", "nat"):
            lab.run("director", ["iptables", "-w", "-t", table, "-S"])
            if bench.v6:
                lab.run("director", ["ip6tables", "-w", "-t", table, "-S"])
        lab.run("director", ["sh", "-c", f"echo {1 << DAEMON_CPU:x} > {RPS_PATH}"])
        self.plain = bench.esp_to(lab.rs_addr6_ints[0] if bench.v6 else lab.rs_addr_ints[0])
        self.vip = bench.esp_to(lab.vip6_int if bench.v6 else lab.vip_int)
        self.warmed: set[str] = set()

    def cases(self) -> list[str]:
        if self.v6:  # no IPv6 limit case (limit.bpf.c forwards IPv4 ESP) and no ip6tables DNAT case
            return ["a2", "e2"] + (["x2", "x0"] if self.hook_ok else [])
        out = ["a2", "e2", "t2"]
        if self.hook_ok:
            out += ["x2", "y2", "x0"]
        if self.lab.mode == "nat":
            out.append("d2")
        return out

    def rates(self) -> list[int]:
        if not self.fixed.get("rate"):
            return [0]  # the first a2: calibrates the fixed rate
        return [self.fixed["rate"], 0]

    def measure(self, group: str, frame: str, rnd: int) -> None:
        b, lab = self.bench, self.lab
        if group not in self.warmed:
            b.warm_up(frame, b.seq_off, f"{group} ESP")
            self.warmed.add(group)
        for rate in self.rates():
            before = self.prog_stats(group)
            row = b.run(Case(f"f.{group}", FP_LABELS[group], self.mode, rate), frame, b.seq_off)
            row["round"] = rnd
            row["fixed_rate"] = bool(rate)
            row["headroom"] = self.headroom
            add_per_packet(row)
            self.add_prog_stats(row, before, self.prog_stats(group))
            if group == "a2" and not self.fixed.get("rate"):
                # every case must carry it without loss: about two thirds of what a2 delivers
                self.fixed["rate"] = max(20_000, int(row["delivered_pps"] * FIXED_SHARE / 10_000) * 10_000)
                print(f"   fixed rate for group f: {self.fixed['rate']:,} pps ({FIXED_SHARE}x a2's "
                      f"{row['delivered_pps']:,.0f}, rounded down)")
                rest = self.bench.run(Case(f"f.{group}", FP_LABELS[group], self.mode, self.fixed["rate"]), frame,
                                      b.seq_off)  # fmt: skip
                rest["round"] = rnd
                rest["fixed_rate"] = True
                add_per_packet(rest)

    # -- the program's own cost in place (--bpf-stats) -------------------------------------------------
    def prog_stats(self, group: str) -> tuple[int, int, int] | None:
        """(program id, run_time_ns, run_cnt) of the program of ``group``'s hook on the director's
        eth0, or None (no program, or --bpf-stats off). Read before and after a run, never per packet."""
        hook = FP_HOOK.get(group)
        if not self.bpf_stats or hook is None:
            return None
        net = json.loads(self.lab.run("director", ["bpftool", "-j", "net", "show", "dev", "eth0"]).stdout)
        progs = [p for entry in net for p in entry.get(hook, [])]
        if len(progs) != 1:
            raise RuntimeError(f"{group}: want one {hook} program on the director's eth0, found {progs}")
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(progs[0]["id"])],
                                         capture_output=True, text=True, check=True).stdout)  # fmt: skip
        return info["id"], info.get("run_time_ns", 0), info.get("run_cnt", 0)

    @staticmethod
    def add_prog_stats(row: dict[str, Any], before, after) -> None:
        if before is None or after is None or before[0] != after[0]:
            return
        runs = after[2] - before[2]
        row["prog_runs"] = runs
        row["prog_ns_per_pkt"] = (after[1] - before[1]) / runs if runs else None
        if runs:
            print(f"{'':<34}     -> the program alone: {row['prog_ns_per_pkt']:.0f} ns per run ({runs:,} runs)",
                  flush=True)

    def run_case(self, group: str, rnd: int) -> None:
        if group == "a2":
            self.measure("a2", self.plain, rnd)
        elif group in ("t2", "y2"):
            self.limit_case(group, rnd)
        elif group == "d2":
            rule = ["PREROUTING", "-i", "eth0", "-d", self.lab.vip, "-p", "esp", "-j", "DNAT", "--to-destination",
                    self.lab.rs_addrs[0]]  # fmt: skip
            self.lab.run("director", ["iptables", "-w", "-t", "nat", "-A", *rule])
            try:
                self.measure("d2", self.vip, rnd)
            finally:
                self.lab.run("director", ["iptables", "-w", "-t", "nat", "-D", *rule], check=False)
                self.lab.run("director", ["conntrack", "-F"], check=False)
        else:
            self.daemon_case(group, rnd)

    def daemon_case(self, group: str, rnd: int) -> None:
        lab, b = self.lab, self.bench
        hook = None if group == "e2" else "xdp"  # None: the default hook, tc
        d = start_daemon(lab, DAEMON_CPU, dataplane="ebpf", hook=hook)
        b.director, b.measured_pid = d, d.proc.pid
        threads: dict[int, str] = {}
        try:
            client = LabClient(lab, "c1", socket.AF_INET6 if self.v6 else socket.AF_INET)
            client.ikev2_connect()
            client.close()
            deadline = time.monotonic() + 5
            while (d.status().get("fastpath") or {}).get("clients", 0) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{group}: c1 never reached the fast path map:\n{d.log()[-2000:]}")
                time.sleep(0.05)
            if group == "x2":
                threads = self.threaded_napi(True)
            self.measure(group, self.vip, rnd)
            st = d.status()
            for row in self.bench.out[-2:]:
                row["user_space_packets"] = st["stats"]["packets"]
                row["fastpath_forwarded"] = (st.get("fastpath") or {}).get("forwarded")
                if threads:
                    row["napi_threads"] = sorted(threads.values())
        finally:
            if threads:
                self.threaded_napi(False)
            b.director, b.measured_pid = None, None
            rc = d.stop()
            if rc != 0:
                print(f"!! vpn-director exited {rc}:\n{d.log()[-2000:]}", flush=True)
            # its programs stay attached (and its maps pinned) for the next daemon: take them all off
            lab.run("director", [sys.executable, "-m", "director.main", "cleanup", "--config", str(d.config_path)],
                    nsenter=True, cwd=str(BENCH.parent))  # fmt: skip
            for dev in ("eth0", "eth1"):
                lab.run("director", ["tc", "qdisc", "del", "dev", dev, "clsact"], check=False)

    def limit_case(self, group: str, rnd: int) -> None:
        """The limit program at the hook and in the layout of e2 (t2) or x2 (y2), no daemon."""
        hook = FP_HOOK[group]
        threads: dict[int, str] = {}
        limit_case.attach(self.lab, hook, self.limit_obj)
        try:
            if group == "y2":
                threads = self.threaded_napi(True)
            self.measure(group, self.vip, rnd)
            if threads:
                for row in self.bench.out[-2:]:
                    row["napi_threads"] = sorted(threads.values())
        finally:
            if threads:
                self.threaded_napi(False)
            limit_case.detach(self.lab, hook)

    def threaded_napi(self, on: bool) -> dict[int, str]:
        """Threaded NAPI on the director's eth0, its kernel thread pinned to CPU 1 (XDP's layout with
        the director on its own core: XDP runs in the veth's NAPI, before RPS could move anything)."""
        before = napi_threads("eth0")
        self.lab.run("director", ["sh", "-c", f"echo {int(on)} > /sys/class/net/eth0/threaded"])
        if not on:
            return {}
        time.sleep(0.05)
        new = {pid: name for pid, name in napi_threads("eth0").items() if pid not in before}
        if not new:
            raise RuntimeError("threaded NAPI on the director's eth0 made no napi/eth0-* thread")
        for pid in new:
            os.sched_setaffinity(pid, {DAEMON_CPU})
            # like softirq work, ahead of any user process on the core (else a busy shared machine
            # starves the thread and the veth ring overflows; softirq would have preempted them)
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(NAPI_PRIO))
        return new

    def finish(self) -> None:
        self.lab.run("director", ["sh", "-c", f"echo 0 > {RPS_PATH}"], check=False)
        if self.headroom == "nic":
            limit_case.headroom_off(self.lab)
        if self.limit_obj is not None:
            self.limit_obj.unlink(missing_ok=True)


def add_per_packet(row: dict[str, Any]) -> None:
    """CPU time per delivered packet: CPU 1's (the director's core) and both cores' together."""
    busy = row["cpu_busy_wall_pct"]  # wall minus idle: see cpu_times
    pps = row["delivered_pps"]
    row["cpu1_us_per_pkt"] = 1e6 * busy.get(DAEMON_CPU, 0.0) / 100.0 / pps if pps else None
    row["total_us_per_pkt"] = 1e6 * sum(busy.values()) / 100.0 / pps if pps else None
    # other people's processes are in both cores' busy time; their own ticks are known (not per core)
    mine = max(0.0, sum(busy.values()) - row["others_cpu_pct"])
    row["total_excl_others_us_per_pkt"] = 1e6 * mine / 100.0 / pps if pps else None
    if pps:
        print(f"{'':<34}     -> CPU-1 {row['cpu1_us_per_pkt']:.2f} us/pkt, both cores {row['total_us_per_pkt']:.2f} "
              f"us/pkt ({row['total_excl_others_us_per_pkt']:.2f} without others' CPU)", flush=True)


def fastpath_group(prof: dict[str, Any], rows: list[dict[str, Any]], fixed: dict[str, int]) -> None:
    """f: every lab mode in its own lab; in each, ``fp_rounds`` rounds of the cases, the order reversed
    in every other round so that a drift over the lab's life hits plain and fast path alike."""
    hook_ok = xdp_hook_supported()
    if not hook_ok:
        print("   (x2/x0 skipped: this checkout has no daemon.fastpath_hook yet; they run once it exists)")
    fprof = dict(prof, seconds=prof["fp_seconds"], warm=prof["fp_warm"], tail=prof["fp_tail"],
                 settle=prof["fp_settle"])  # fmt: skip
    labs = [(mode, False) for mode in prof["fp_modes"] if 4 in prof["fp_families"]]
    labs += [(mode, True) for mode in prof["fp_modes"] if 6 in prof["fp_families"] and mode != "tun"]
    for mode, v6 in labs:
        with Lab(mode, ipv6=v6) as lab:
            lab.start_responders()
            bench = Bench(lab, fprof, rows, v6=v6)
            bench.install_sinks("esp")
            group = FastpathGroup(bench, fixed, hook_ok, prof.get("bpf_stats", False), prof.get("headroom", "veth"))
            try:
                cases = group.cases()
                for rnd in range(prof["fp_rounds"]):
                    for case in cases if rnd % 2 == 0 else list(reversed(cases)):
                        group.run_case(case, rnd)
            finally:
                group.finish()
            prof["quiet_budget"] = fprof["quiet_budget"]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def summarize_fastpath(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode, case and rate kind (fixed / max): medians and spreads over the rounds; ratios to a2
    of the same lab (capacity = delivered at max; cost = CPU-1 and total µs per delivered packet)."""
    out: dict[str, Any] = {}
    fp = [r for r in rows if r["group"].startswith("f.")]
    for mode in ("dr", "tun", "nat", "dr6", "nat6"):
        for kind in ("fixed", "max"):
            for g in FP_CASES:
                rs = [r for r in fp if r["mode"] == mode and r["group"] == f"f.{g}" and r["fixed_rate"] == (kind == "fixed")]
                if not rs:
                    continue
                item: dict[str, Any] = {"n": len(rs), "rate": rs[0]["rate"]}
                for key in ("offered_pps", "delivered_pps", "loss_pct", "cpu1_us_per_pkt", "total_us_per_pkt",
                            "total_excl_others_us_per_pkt", "others_cpu_pct", "prog_ns_per_pkt"):
                    vals = [r[key] for r in rs if r.get(key) is not None]
                    if vals:
                        item[key] = median(vals)
                        item[key + "_spread"] = (min(vals), max(vals))
                item["cpu_busy_pct"] = {c: median([r["cpu_busy_wall_pct"].get(c, 0.0) for r in rs]) for c in (0, 1)}
                out[f"{mode}.{kind}.{g}"] = item
            base = out.get(f"{mode}.{kind}.a2")
            if not base:
                continue
            for g in FP_CASES:
                item = out.get(f"{mode}.{kind}.{g}")
                if not item or g == "a2":
                    continue
                if kind == "max" and base.get("delivered_pps"):
                    item["capacity_vs_a2"] = item["delivered_pps"] / base["delivered_pps"]
                for key in ("cpu1_us_per_pkt", "total_us_per_pkt"):
                    if item.get(key) and base.get(key):
                        item[key.replace("_us_per_pkt", "_cost_vs_a2")] = item[key] / base[key]
                limit = out.get(f"{mode}.{kind}.{FP_LIMIT_OF.get(g, '')}")
                if not limit:
                    continue
                if kind == "max" and limit.get("delivered_pps"):
                    item["capacity_vs_limit"] = item["delivered_pps"] / limit["delivered_pps"]
                for key in ("cpu1_us_per_pkt", "prog_ns_per_pkt"):
                    if item.get(key) and limit.get(key):
                        item[key.replace("_us_per_pkt", "_cost").replace("_ns_per_pkt", "_cost") + "_vs_limit"] = (
                            item[key] / limit[key])
    return out


def print_fastpath_summary(s: dict[str, Any]) -> None:
    if not s:
        return
    print("\ngroup f: medians over the rounds [min-max]; cost = CPU time per delivered packet; "
          "ratios to a2 of the same lab, and of e2/x2 to the limit case of their hook (t2/y2); "
          "prog ns = the program's own run time per packet (--bpf-stats)")
    print(f"  {'mode':<4} {'rate':<6} {'case':<30}{'delivered':>22}{'loss%':>6}{'cpu0%':>6}{'cpu1%':>6}"
          f"{'CPU-1 us/pkt':>20}{'total us/pkt':>20}{'-others':>8}{'cap/a2':>7}{'c1/a2':>7}{'tot/a2':>7}"
          f"{'cap/lim':>8}{'c1/lim':>7}{'prog ns':>8}{'p/lim':>6}{'others%':>8}")  # fmt: skip
    for key, it in s.items():
        mode, kind, g = key.split(".")
        dl, (lo, hi) = it["delivered_pps"], it["delivered_pps_spread"]
        c1 = it.get("cpu1_us_per_pkt")
        c1s = it.get("cpu1_us_per_pkt_spread", (0, 0))
        tt = it.get("total_us_per_pkt")
        tts = it.get("total_us_per_pkt_spread", (0, 0))
        tx = it.get("total_excl_others_us_per_pkt")
        rate = fmt_rate(it["rate"])

        def r(name: str, width: int) -> str:
            v = it.get(name)
            return f"{'' if v is None else f'{v:.2f}':>{width}}"

        pns = it.get("prog_ns_per_pkt")
        print(f"  {mode:<4} {rate:<6} {FP_LABELS[g]:<30}{dl:>9,.0f} [{lo / 1000:.0f}-{hi / 1000:.0f}k]"
              f"{it['loss_pct']:>6.1f}{it['cpu_busy_pct'][0]:>6.0f}{it['cpu_busy_pct'][1]:>6.0f}"
              f"{'' if c1 is None else f'{c1:.2f} [{c1s[0]:.2f}-{c1s[1]:.2f}]':>20}"
              f"{'' if tt is None else f'{tt:.2f} [{tts[0]:.2f}-{tts[1]:.2f}]':>20}"
              f"{'' if tx is None else f'{tx:.2f}':>8}"
              f"{r('capacity_vs_a2', 7)}{r('cpu1_cost_vs_a2', 7)}{r('total_cost_vs_a2', 7)}"
              f"{r('capacity_vs_limit', 8)}{r('cpu1_cost_vs_limit', 7)}"
              f"{'' if pns is None else f'{pns:.0f}':>8}{r('prog_cost_vs_limit', 6)}"
              f"{it.get('others_cpu_pct', 0):>8.0f}")  # fmt: skip


def plot_fastpath(s: dict[str, Any], path: str, title: str) -> None:
    """Group f as a picture: per mode, capacity (delivered at max, kpps) and CPU 1's µs per
    delivered packet at the fixed rate, one bar per case, with plain forwarding (a2) and the limit
    cases (t2, y2) as reference lines. Needs matplotlib (``pip install -e .[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("dr", "tun", "nat", "dr6", "nat6") if any(k.startswith(f"{m}.") for k in s)]
    cases = [g for g in ("e2", "t2", "x2", "y2", "x0", "d2") if any(k.endswith(f".{g}") for k in s)]
    colors = {"e2": "#1f77b4", "t2": "#aec7e8", "x2": "#2ca02c", "y2": "#98df8a", "x0": "#bcbd22", "d2": "#d62728"}
    rows = [("max", "delivered_pps", 1e-3, "capacity, kpps delivered"),
            ("fixed", "cpu1_us_per_pkt", 1.0, "CPU 1 µs per packet at the fixed rate")]  # fmt: skip
    if any(it.get("prog_ns_per_pkt") for it in s.values()):
        rows.append(("fixed", "prog_ns_per_pkt", 1.0, "the program alone, ns per packet (bpf_stats)"))
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(4.4 * len(modes), 3.6 * len(rows)), squeeze=False)
    for col, mode in enumerate(modes):
        for row, (kind, key, scale, ylabel) in enumerate(rows):
            ax = axes[row][col]
            xs, vals = [], []
            for g in cases:
                it = s.get(f"{mode}.{kind}.{g}")
                if it and it.get(key) is not None and not (g == "x0" and key == "cpu1_us_per_pkt"):
                    xs.append(g)
                    vals.append(it[key] * scale)
            ax.bar(xs, vals, color=[colors[g] for g in xs])
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.2f}" if key == "cpu1_us_per_pkt" else f"{v:.0f}", ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
            refs = (("a2", "plain forwarding", "black", "-"), ("t2", "limit, tc", "#1f77b4", "--"),
                    ("y2", "limit, XDP", "#2ca02c", ":"))  # fmt: skip
            for g, label, color, style in refs:
                it = s.get(f"{mode}.{kind}.{g}")
                if it and it.get(key) is not None:
                    ax.axhline(it[key] * scale, color=color, linestyle=style, linewidth=1, label=label)
            ax.set_title(f"{mode.upper()}: {ylabel.split(',')[0]}", fontsize=10)
            ax.set_ylabel(ylabel)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def dnat_cases(bench: Bench) -> None:
    """d: iptables DNAT of ESP (conntrack), no daemon."""
    lab = bench.lab
    lab.run("director", ["iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-d", lab.vip,
                         "-p", "esp", "-j", "DNAT", "--to-destination", lab.rs_addrs[0]])  # fmt: skip
    frame = bench.esp_to(lab.vip_int)
    bench.warm_up(frame, OFF_ESP_SEQ, "DNAT ESP")
    for rate in bench.prof["dnat_rates"]:
        bench.run(Case("d", "d  iptables DNAT (conntrack)", lab.mode, rate), frame, OFF_ESP_SEQ)


# -- group r: the return path through the director (DR replies from the VIP, eBPF) -------------------


class ReturnBench:
    """DR replies through the director: rs1 sends ESP from the VIP to c1 (pktgen in rs1 on CPU 0),
    the director's receive on its LAN side (eth1) steered to CPU 1 by RPS, c1 counts what arrives
    (raw PREROUTING DROP of ESP from the VIP). Cases, alternated over the rounds:

      r0  plain IP forwarding of those replies: no daemon, the VIP taken off the director's eth0 so
          its kernel forwards them as any routed packet (with the VIP local they die as martians).
      r1  the reply program's return path (``return_path = "director"``, daemon --dataplane ebpf):
          the same frames, checked against c1's ``clients`` entry and rs1's MAC, redirected in tc.

    Per case: delivered pps at c1 and CPU 1's busy time (wall minus idle) per delivered packet; the
    difference r1 - r0 is what the return path's checks and redirect cost against the kernel's own
    forwarding of the same frames on the same core."""

    def __init__(self, lab: Lab, prof: dict[str, Any], out: list[dict[str, Any]]) -> None:
        self.lab, self.prof, self.out = lab, prof, out
        ipr = lab.ipr("director")
        dmac = ipr.link("get", index=ipr.link_lookup(ifname="eth1")[0])[0].get_attr("IFLA_ADDRESS")
        ripr = lab.ipr("rs1")
        smac = ripr.link("get", index=ripr.link_lookup(ifname="eth0")[0])[0].get_attr("IFLA_ADDRESS")
        ip = craft.esp(lab.vip_int, lab.client_addr_ints["c1"], ESP_SPI, 1, size=ESP_SIZE)
        self.frame = (mac_bytes(dmac) + mac_bytes(smac) + b"\x08\x00" + ip).hex()
        self.c1_ipr = lab.ipr("c1")
        self.c1_idx = self.c1_ipr.link_lookup(ifname="eth0")[0]
        self.sink = ["PREROUTING", "-s", lab.vip, "-p", "esp", "-j", "DROP"]
        lab.run("c1", ["iptables", "-w", "-t", "raw", "-A", *self.sink])
        # the same netfilter tables in both cases (the daemon instantiates raw and mangle)
        for table in ("raw", "mangle"):
            lab.run("director", ["iptables", "-w", "-t", table, "-L", "-n"])
        lab.run("director", ["sh", "-c", f"echo {1 << DAEMON_CPU:x} > /sys/class/net/eth1/queues/rx-0/rps_cpus"])

    def delivered(self) -> int:
        text = self.lab.run("c1", ["iptables", "-w", "-t", "raw", "-L", "PREROUTING", "-n", "-v", "-x"]).stdout
        return sum(int(p[0]) for p in (line.split() for line in text.splitlines()[2:]) if len(p) > 2 and p[2] == "DROP")

    def rx(self) -> int:
        return self.c1_ipr.link("get", index=self.c1_idx)[0].get_attr("IFLA_STATS64")["rx_packets"]

    def pktgen(self, rate: int, seconds: float, count: int | None = None):
        count = count if count is not None else (int(rate * seconds) if rate else 50_000_000)
        argv = ["taskset", "-c", str(GEN_CPU), str(PKTGEN), "eth0", self.frame, str(count), "--rate", str(rate),
                "--batch", "64" if not rate else "1", "--seconds", str(seconds), "--seq-offset", str(OFF_ESP_SEQ)]
        return self.lab.popen("rs1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def warm_up(self, what: str) -> None:
        before = self.delivered()
        self.pktgen(20_000, 1.0, count=1000).communicate(timeout=30)
        time.sleep(0.2)
        got = self.delivered() - before
        if got < 900:
            raise RuntimeError(f"{what}: only {got} of 1000 replies reached c1")

    def measure(self, group: str, label: str) -> dict[str, Any]:
        p = self.prof
        sink0 = self.delivered()
        proc = self.pktgen(0, p["fp_seconds"])
        time.sleep(p["fp_warm"])
        t0, rx0, cpu0 = time.monotonic(), self.rx(), cpu_times()
        time.sleep(max(0.1, p["fp_seconds"] - p["fp_warm"] - p["fp_tail"]))
        t1, rx1, cpu1 = time.monotonic(), self.rx(), cpu_times()
        stdout, stderr = proc.communicate(timeout=p["fp_seconds"] + 30)
        if proc.returncode:
            raise RuntimeError(f"pktgen exited {proc.returncode}: {stderr.strip()}")
        gen = json.loads(stdout.strip().splitlines()[-1])
        time.sleep(p["fp_settle"])
        dt = t1 - t0
        pps = (rx1 - rx0) / dt
        busy1 = max(0.0, 1 - (cpu1[DAEMON_CPU][3] - cpu0[DAEMON_CPU][3]) / (dt * CLK_TCK))
        row = {"group": group, "case": label, "mode": "dr", "rate": 0, "sent": gen["sent"],
               "delivered": self.delivered() - sink0, "delivered_pps": pps, "cpu1_busy_pct": 100 * busy1,
               "cpu1_ns_per_pkt": 1e9 * busy1 / pps if pps else None}  # fmt: skip
        ns = row["cpu1_ns_per_pkt"]
        print(f"{label:<44}{pps:>12,.0f} pps  CPU1 {100 * busy1:5.1f}%  "
              f"{'' if ns is None else f'{ns:7.0f}'} ns/pkt", flush=True)
        self.out.append(row)
        return row

    def plain(self) -> None:
        lab = self.lab
        lab.run("director", ["ip", "addr", "del", f"{lab.vip}/32", "dev", "eth0"])
        try:
            self.warm_up("r0 plain forwarding")
            self.measure("r.r0", "r0 plain forwarding of the replies")
        finally:
            lab.run("director", ["ip", "addr", "add", f"{lab.vip}/32", "dev", "eth0"])

    def return_path(self) -> None:
        lab = self.lab
        d = DirectorProcess(lab, scheduler="rr", dataplane="ebpf", extra_service='return_path = "director"')
        d.start()
        pin(d.proc.pid, DAEMON_CPU)
        try:
            client = LabClient(lab, "c1", socket.AF_INET6 if self.v6 else socket.AF_INET)
            client.ikev2_connect()
            client.close()
            deadline = time.monotonic() + 5
            while (d.status().get("fastpath") or {}).get("clients", 0) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"r1: c1 never reached the fast path map:\n{d.log()[-2000:]}")
                time.sleep(0.05)
            self.warm_up("r1 return path")
            row = self.measure("r.r1", "r1 return path, eBPF reply program")
            st = d.status()
            row["fastpath_returned"] = st["fastpath"].get("returned")
            row["drops"] = st["drops"]
        finally:
            rc = d.stop()
            if rc != 0:
                print(f"!! vpn-director exited {rc}:\n{d.log()[-2000:]}", flush=True)
            lab.run("director", [sys.executable, "-m", "director.main", "cleanup", "--config", str(d.config_path)],
                    nsenter=True, cwd=str(BENCH.parent))  # fmt: skip
            lab.run("director", ["tc", "qdisc", "del", "dev", "eth1", "clsact"], check=False)
            lab.run("director", ["tc", "qdisc", "del", "dev", "eth0", "clsact"], check=False)


def return_group(prof: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Group r in ``fp_rounds`` rounds, the case order reversed every other round; then medians."""
    with Lab("dr", return_via_director=True) as lab:
        lab.start_responders()
        rb = ReturnBench(lab, prof, rows)
        for rnd in range(prof["fp_rounds"]):
            order = (rb.plain, rb.return_path) if rnd % 2 == 0 else (rb.return_path, rb.plain)
            for case in order:
                case()
    per = {g: sorted(r["cpu1_ns_per_pkt"] for r in rows if r["group"] == g and r.get("cpu1_ns_per_pkt"))
           for g in ("r.r0", "r.r1")}  # fmt: skip
    if per["r.r0"] and per["r.r1"]:
        m0, m1 = per["r.r0"][len(per["r.r0"]) // 2], per["r.r1"][len(per["r.r1"]) // 2]
        print(f"group r medians: plain {m0:.0f} ns/pkt, return path {m1:.0f} ns/pkt on CPU 1: "
              f"{m1 - m0:+.0f} ns/pkt ({m1 / m0:.2f}x)", flush=True)


def with_lab(mode: str, prof: dict[str, Any], out: list[dict[str, Any]], body) -> None:
    with Lab(mode) as lab:
        lab.start_responders()
        bench = Bench(lab, prof, out)
        bench.install_sinks("esp")
        body(bench)


# -- summary ---------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    plain = [r for r in rows if r["group"] == "a"]
    base = plain[0]["delivered_pps"] if plain else 0.0
    for r in rows:
        r["ratio_to_plain"] = r["delivered_pps"] / base if base else None
    summary: dict[str, Any] = {"plain_pps": base}
    rps = [r for r in rows if r["group"] == "a2"]
    base2 = rps[0]["delivered_pps"] if rps else 0.0
    summary["plain_rps_pps"] = base2
    if rps:
        summary["plain_rps_cpu1_busy_pct"] = rps[0]["cpu_busy_pct"].get(DAEMON_CPU, 0.0)
    again = [r for r in rows if r["group"] == "a'"]
    if again and base:
        summary["plain_again_pps"] = again[0]["delivered_pps"]
        summary["plain_drift"] = again[0]["delivered_pps"] / base
    raw = [r["delivered_pps"] for r in rows if r["group"] == "a0"]
    raw_cap = max(raw) if raw else 0.0
    summary["raw_loop_capacity_pps"] = raw_cap
    for group in ("b", "c", "c-new", "d"):
        for mode in ("dr", "tun", "nat"):
            rs = [r for r in rows if r["group"] == group and r["mode"] == mode]
            if not rs:
                continue
            cap = max(r["delivered_pps"] for r in rs)
            flood = [r for r in rs if r["rate"] == 0]
            item = {"capacity_pps": cap, "ratio_to_plain": cap / base if base else None,
                    "ratio_to_plain_rps": cap / base2 if base2 else None,
                    "ratio_to_raw_loop": cap / raw_cap if raw_cap else None}  # fmt: skip
            if flood:
                f = flood[0]
                item["flood_offered_pps"] = f["offered_pps"]
                item["flood_delivered_pps"] = f["delivered_pps"]
                item["flood_over_capacity"] = f["delivered_pps"] / cap if cap else None
                item["overload_factor"] = f["offered_pps"] / cap if cap else None
            summary[f"{group}.{mode}"] = item
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print("\nsummary (capacity = best delivered rate over the offered rates; flood = unlimited offer)")
    print(f"  a   plain IP forwarding: {s['plain_pps']:,.0f} pps  (the 1.0x of every ratio below)")
    if s["plain_rps_pps"]:
        print(f"  a2  plain, director on CPU 1 (RPS): {s['plain_rps_pps']:,.0f} pps = "
              f"{s['plain_rps_pps'] / s['plain_pps']:.2f}x of a; CPU 1 was {s['plain_rps_cpu1_busy_pct']:.0f}% busy "
              "(the generator's core is the limit)")  # fmt: skip
    if "plain_drift" in s:
        print(f"  a'  plain again at the end: {s['plain_again_pps']:,.0f} pps = {s['plain_drift']:.2f}x of a")
    if s["raw_loop_capacity_pps"]:
        print(f"  a0  raw NetfilterQueue mark loop: {s['raw_loop_capacity_pps']:,.0f} pps = "
              f"{s['raw_loop_capacity_pps'] / s['plain_pps']:.2f}x of a")  # fmt: skip
    names = {"b": "ESP via daemon", "c": "IKE non-initial", "c-new": "new ISAKMP entries/s", "d": "iptables DNAT"}
    for key, item in s.items():
        if "." not in key:
            continue
        group, mode = key.split(".")
        line = f"  {group:<5} {names[group]:<22} {mode:<4} capacity {item['capacity_pps']:>9,.0f} pps"
        line += f" = {item['ratio_to_plain']:.3f}x a" if item["ratio_to_plain"] is not None else ""
        line += f", {item['ratio_to_plain_rps']:.3f}x a2" if item["ratio_to_plain_rps"] is not None else ""
        if item.get("ratio_to_raw_loop") and group != "d":
            line += f", {item['ratio_to_raw_loop']:.2f}x raw loop"
        if "flood_delivered_pps" in item:
            line += (f"; flood {item['flood_offered_pps']:,.0f} offered ({item['overload_factor']:.1f}x) -> "
                     f"{item['flood_delivered_pps']:,.0f} = {item['flood_over_capacity']:.2f}x capacity")  # fmt: skip
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rates, 1.2 s per case, no repeats (about 30 s)")
    ap.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    ap.add_argument("--only", choices=("fastpath", "classic", "return"),
                    help="fastpath: only group f (a2/e2/x2/x0/d2 in rounds, a few minutes); "
                         "classic: only the groups a..e, a' (without f); "
                         "return: only group r (DR replies through the director: r0/r1 in rounds)")
    ap.add_argument("--rounds", type=int, help="group f: rounds per lab (full 3, quick 1)")
    ap.add_argument("--fixed-rate", type=int, metavar="PPS",
                    help="group f: the fixed offered rate (default: 0.65x a2's delivered rate at max, rounded down)")
    ap.add_argument("--modes", help="group f: comma-separated lab modes (default dr,tun,nat; quick dr,nat)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="group f: also the programs' own run time per packet (kernel.bpf_stats_enabled during the group)")
    ap.add_argument("--headroom", choices=("veth", "nic"), default="veth",
                    help="group f: the headroom of the frames reaching the director: what the generator's veth "
                         "gives (16 bytes, default) or a NIC's (256: generic XDP on the generator's switch port)")
    ap.add_argument("--plot", metavar="PNG", help="group f: draw the summary into this PNG (needs matplotlib)")
    ap.add_argument("--family", choices=("4", "6", "both"), default="4",
                    help="group f: IPv4 labs (default), IPv6 labs (dr6, nat6: the same cases on a dual-stack "
                         "lab's IPv6 path, no limit or DNAT case), or both in one run")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces, iptables, AF_PACKET)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench_dataplane: needs 2 CPUs (generator and daemon on different cores)", file=sys.stderr)
        return 2
    build_pktgen()
    os.sched_setaffinity(0, {GEN_CPU})  # never on the daemon's core
    name = "quick" if args.quick else "full"
    prof = dict(PROFILES[name])  # quiet_budget is spent as the run goes
    if args.rounds:
        prof["fp_rounds"] = args.rounds
    if args.modes:
        prof["fp_modes"] = [m.strip() for m in args.modes.split(",") if m.strip()]
    prof["bpf_stats"], prof["headroom"] = args.bpf_stats, args.headroom
    prof["fp_families"] = {"4": [4], "6": [6], "both": [4, 6]}[args.family]
    mach = machine()
    mach["commit"] = commit()
    load0 = loadavg()
    print(f"vpn-director dataplane benchmark ({name}: {prof['seconds']} s per case)")
    print(f"machine: {mach['nproc']} CPU, {mach['cpu']}; kernel {mach['kernel']}; Python {mach['python']}; "
          f"commit {mach['commit']}")
    idle = busy_before()
    print(f"load average at start: {load0}; CPU busy before the run: "
          + ", ".join(f"cpu{c} {v:.0f}%" for c, v in sorted(idle.items())))
    if max(idle.values()) > 10:
        print("!! other work is running on this machine: every number below is skewed by it")
    print(f"frame: {ETH + IP + 8 + ESP_SIZE}-byte Ethernet frame, ESP with {ESP_SIZE} bytes after SPI+seq; "
          f"pktgen on CPU {GEN_CPU}, daemon on CPU {DAEMON_CPU}")  # fmt: skip
    print("delivered = packets/s arriving at the real servers in a window inside the send; loss% from "
          "exact totals; si1% = CPU 1 softirq share, ksi1% = ksoftirqd/1's CPU\n")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def dr(b: Bench) -> None:
        plain_cases(b)
        raw_loop_cases(b)
        daemon_cases(b, prof["shared_core"])

    fixed: dict[str, int] = {"rate": args.fixed_rate or 0}
    if args.only == "return":
        print(f"\ngroup r ({prof['fp_rounds']} round(s), {prof['fp_seconds']} s per case; ns/pkt = CPU 1's "
              "busy time per packet delivered at c1)")
        return_group(prof, rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"profile": name, "machine": mach, "cases": rows}, indent=1,
                                                  default=str) + "\n")  # fmt: skip
        return 0
    if args.only not in ("fastpath", "return"):
        with_lab("dr", prof, rows, dr)
        with_lab("tun", prof, rows, lambda b: daemon_cases(b, False))
        with_lab("nat", prof, rows, lambda b: daemon_cases(b, False))
        with_lab("nat", prof, rows, dnat_cases)
        for mode in ("dr", "tun", "nat"):
            with_lab(mode, prof, rows, fastpath_cases)
    if args.only != "classic":
        print(f"\ngroup f ({prof['fp_rounds']} round(s) per lab, {prof['fp_seconds']} s per case; "
              "us/pkt here = CPU 1's busy time per delivered packet, daemon column = the daemon process)")
        stats_was = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() if args.bpf_stats else None
        if args.bpf_stats:
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1\n")
        try:
            fastpath_group(prof, rows, fixed)
        finally:
            if stats_was is not None:
                Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_was + "\n")
    if prof["plain_again"] and args.only != "fastpath":
        with_lab("dr", prof, rows, lambda b: plain_cases(b, "a'"))
    wall = time.monotonic() - t0

    summary = summarize(rows)
    if args.only != "fastpath":
        print_summary(summary)
    summary["fastpath_group"] = fp_summary = summarize_fastpath(rows)
    summary["fastpath_fixed_rate"] = fixed["rate"]
    print_fastpath_summary(fp_summary)
    if args.plot and fp_summary:
        plot_fastpath(fp_summary, args.plot, f"vpn-director group f (bench_dataplane.py --only fastpath), commit "
                      f"{mach['commit']}\n{prof['fp_rounds']} round(s), medians; headroom {args.headroom}; "
                      f"fixed rate {fixed['rate']:,} pps")  # fmt: skip
    if args.only != "fastpath":
        print("\nratio of every case's delivered rate to a:")
    for r in rows if args.only != "fastpath" else []:
        if r["group"].startswith("f."):
            continue
        ratio = r["ratio_to_plain"]
        print(f"  {r['case']:<36}{fmt_rate(r['rate']):>5}  {'' if ratio is None else f'{ratio:.3f}x'}")
    load1 = loadavg()
    print(f"\ndone in {wall:.0f} s; load average at end: {load1}")
    if args.json:
        doc = {"profile": name, "settings": prof, "machine": mach, "load_start": load0, "load_end": load1,
               "cpu_busy_before_pct": idle,
               "wall_s": wall, "cases": rows, "summary": summary}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
