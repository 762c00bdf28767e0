"""Scale-out: how many conversations break when a director leaves and when one joins.

Not a test: it prints fractions and passes or fails nothing.

    .venv/bin/python bench/bench_scaleout.py [--mechanisms rr,mh] [--conversations 3000]
                                             [--json out.json] [--plot docs/img/scaleout-delivery.png]

Per mechanism, one ECMP lab (``director/lab/ecmp.py``: a BIRD router with L4 multipath hashing,
four director namespaces each with its own BIRD, three real servers, DR) and four daemons (the
real ``vpn-director run``, NFQUEUE dataplane) in d1-d3, announcing the VIP; d4 is spare:

1. ``--conversations`` crafted conversations from c1's namespace, each from its own source
   (address in 100.64.0.0/16, port): IKE_SA_INIT then IKE_AUTH (responder SPI set) behind the
   non-ESP marker on UDP 4500, which makes the director's entry ESTABLISHED, then one ESP-in-UDP
   packet whose SPI names the conversation. A conversation keeps one 5-tuple throughout, so the
   router sends all its packets to one director (the easy case: what breaks here is what the
   director set change alone breaks). Every real server has a UDP socket on VIP:4500 that reads
   the SPI of each ESP packet: the server a conversation's ESP reaches first is its **owner**.
2. **leave**: d3 dies like a box (every process in its namespace SIGKILLed); once the router's
   route has only d1 and d2, one more ESP packet per conversation. **Broken**: not delivered to
   its owner (dropped, or delivered to another server).
3. **join**: a second set of ``--conversations`` conversations is established (same way) on the
   two remaining directors, then d4's daemon starts (with ``shared``: and gets the others' table,
   waited for up to 10 s) and d4 announces the VIP; once the route has d1, d2 and d4, one more
   ESP packet per conversation of the second set. Broken by the join: not delivered to its owner.
   (A separate set: the first set's survivors of the leave are exactly the flows the router's
   hash did not move, and would hide what a join moves.)

The router's multipath hash is Linux's hash-threshold: a nexthop leaving or joining moves the
flows of its own share AND re-cuts the others' shares, so with 3 -> 2 directors about 1/2 of the
flows change director (1/3 from the dead one, 1/6 between the survivors), and 2 -> 3 about 1/2
too. A director without the conversation's entry drops its ESP (ICMP unreachable).

Mechanisms (``--mechanisms``): ``rr`` (round robin, nothing shared: the naive baseline) and ``mh``
(Maglev hashing alone: the same choice on every director for a NEW conversation), ``shared``
(``mh`` plus N-peer table sync: ``[daemon.sync]`` with every other director in ``peers`` and role
``all``; d4 is a peer from the start and gets the others' entries when it starts), ``labels``
(``mh`` plus SPI labels: the service's ``spi_label.mask`` is byte 4 of the IKE SPI, real server k
has label 0x41 + k and ESP SPIs ``label << 24`` .. ``| 0xFFFFFF``; the crafted IKE_AUTH carries
the label of the server its IKE_SA_INIT reached, in the responder SPI, and the ESP SPI lies in
that server's range, as a labelled strongSwan chooses them). A mechanism the daemon's config does
not accept stops the bench with a one-line message naming the missing setting.

``--plot``: while the leave and the join happen, ``WATCH`` of the conversations also send an ESP
packet every ``WATCH_INTERVAL`` s; each delivery is recorded at the real servers and drawn per
conversation over time (its owner: a dot; another server: a cross; nothing: a gap), with the
leave and the join marked. Needs matplotlib (``pip install -e .[bench]``).

Bounded: every phase sends a fixed number of packets, paced; the whole run takes about a minute
per mechanism. The lab is torn down even on failure; spoofed sources route nowhere (the router
has no route back to 100.64.0.0/16, and the real servers' sockets never answer).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from director.lab import craft  # noqa: E402
from director.lab.director_proc import DirectorProcess  # noqa: E402
from director.lab.ecmp import EcmpLab  # noqa: E402
from director.lab.netns import cleanup, list_labs  # noqa: E402
from director.packet import ip_to_int  # noqa: E402

SPI_BASE = 0x01000000  # ESP SPI of conversation i: SPI_BASE | i (labels: the server's label byte | i)
LABEL_MASK = 0x00000000FF000000  # SPI labels: byte 4 of the IKE SPI, as in docs/operations.md
LABELS = (0x41, 0x42, 0x43)  # real server k's label byte; its ESP SPIs are label << 24 .. | 0xFFFFFF
WATCH = 24  # conversations drawn in the plot
WATCH_INTERVAL = 0.02  # s between two ESP packets of a watched conversation
BURST = 200  # packets sent back to back, then PACE s
PACE = 0.01
ROUTE_BOUND = 30.0

SYNC_KEY = "5ca1e0075ca1e0075ca1e0075ca1e007"

MECHANISMS = {
    "rr": {"scheduler": "rr"},
    "mh": {"scheduler": "mh"},
    "shared": {"scheduler": "mh", "sync": True},  # mh + [daemon.sync] peers = [...], role "all"
    "labels": {"scheduler": "mh", "labels": True},  # service spi_label.mask, each server's label and ESP range
}
MISSING = {
    "shared": "[daemon.sync] peers = [...] with role \"all\" (N-peer table sync) is not in this daemon",
    "labels": "SPI label steering (service spi_label.mask, server spi_label/esp_spi_min/esp_spi_max) is not in "
              "this daemon",
}


def sync_table(lab: EcmpLab, role: str) -> str:
    """[daemon.sync] for N-peer shared state: every other director, on the LAN side."""
    me = lab.director_lan_addr(role)
    others = ", ".join(f'"{lab.director_lan_addr(r)}"' for r in lab.director_roles if r != role)
    return (f'\n[daemon.sync]\npeers = [{others}]\nbind = "{me}"\nkey = "{SYNC_KEY}"\nrole = "all"\n'
            f'state_file = "{lab._tmp() / f"sync-{role}.json"}"\n')


def label_config(text: str, lab: EcmpLab) -> str:
    """The lab's daemon config with SPI labels: the service's mask, each server's label and range."""
    mask = f'\nspi_label = {{ mask = "{LABEL_MASK:#018x}" }}\n'
    text = text.replace("\n[[service.server]]", mask + "\n[[service.server]]", 1)
    for k, addr in enumerate(lab.rs_addrs):
        b = LABELS[k]
        text = text.replace(f'address = "{addr}"\n',
                            f'address = "{addr}"\nspi_label = "{b << 24:#018x}"\n'
                            f"esp_spi_min = {b << 24}\nesp_spi_max = {(b << 24) | 0xFFFFFF}\n")  # fmt: skip
    return text


def supported(name: str) -> bool:
    """Whether this daemon's config accepts what mechanism ``name`` needs."""
    cfg = MECHANISMS[name]
    if cfg is None:
        return False
    if not cfg.get("sync") and not cfg.get("labels"):
        return True
    from director.config import ConfigErrors, from_dict

    raw = {"daemon": {}, "service": [{"vip": "192.0.2.10", "server": [{"address": "192.0.2.20"}]}]}
    if cfg.get("sync"):
        raw["daemon"]["sync"] = {"peers": ["192.0.2.2", "192.0.2.3"], "bind": "192.0.2.1", "key": SYNC_KEY,
                                 "role": "all", "state_file": "/tmp/x.json"}  # fmt: skip
    if cfg.get("labels"):
        raw["service"][0]["spi_label"] = {"mask": f"{LABEL_MASK:#018x}"}
        raw["service"][0]["server"][0].update({"spi_label": f"{0x41 << 24:#018x}", "esp_spi_min": 0x41 << 24,
                                               "esp_spi_max": (0x41 << 24) | 0xFFFFFF})  # fmt: skip
    try:
        from_dict(raw)
    except (ConfigErrors, ValueError, TypeError, KeyError):
        return False
    return True


def conv_source(i: int) -> tuple[int, int]:
    """Conversation i's client address (100.64.0.0/16) and source port."""
    return ip_to_int(f"100.64.{i // 250}.{i % 250 + 1}"), 10000 + i % 50000


class Sinks:
    """A UDP socket on VIP:4500 in every real server, read by one thread: (t, spi, rs index)."""

    def __init__(self, lab: EcmpLab) -> None:
        self.socks = []
        for role in lab.rs_roles:
            s = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)  # SO_RCVBUFFORCE
            s.bind((lab.vip, 4500))
            s.setblocking(False)
            self.socks.append(s)
        self.log: list[tuple[float, int, int]] = []  # ESP: (time, conversation, rs)
        self.ike: list[tuple[int, int]] = []  # IKE: (initiator SPI, rs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            idle = True
            for rs, s in enumerate(self.socks):
                try:
                    while True:
                        data = s.recv(2048)
                        idle = False
                        if len(data) >= 8 and data[:4] != b"\x00\x00\x00\x00":  # ESP, not IKE
                            self.log.append((time.monotonic(), struct.unpack_from(">I", data)[0] & 0xFFFFFF, rs))
                        elif len(data) >= 12:
                            self.ike.append((struct.unpack_from(">Q", data, 4)[0], rs))
                except BlockingIOError:
                    pass
            if idle:
                time.sleep(0.002)

    def mark(self) -> int:
        return len(self.log)

    def since(self, mark: int) -> list[tuple[float, int, int]]:
        return self.log[mark:]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


class Sender:
    def __init__(self, lab: EcmpLab) -> None:
        self.sock = lab.socket("c1", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.vip = ip_to_int(lab.vip)
        self.vip_s = lab.vip
        self.lock = threading.Lock()
        self.spi_of: dict[int, int] = {}  # conversation -> its ESP SPI (labels: in its server's range)

    def send(self, pkts: list[bytes]) -> None:
        for k, p in enumerate(pkts):
            with self.lock:
                self.sock.sendto(p, (self.vip_s, 0))
            if k % BURST == BURST - 1:
                time.sleep(PACE)

    def handshake(self, convs: range, sinks: Sinks, labels: bool = False) -> None:
        """IKE_SA_INIT, then IKE_AUTH (responder SPI set: the entry turns ESTABLISHED). With
        ``labels``, the responder SPI and the ESP SPI carry the label of the server the
        IKE_SA_INIT reached, as a labelled strongSwan would choose them."""
        mark = len(sinks.ike)
        pkts = []
        for i in convs:
            src, sport = conv_source(i)
            pkts.append(craft.ike(src, self.vip, 0x5000_0000_0000 + i, 0, sport=sport, natt=True))
        self.send(pkts)
        time.sleep(0.3)
        reached = dict(sinks.ike[mark:]) if labels else {}
        pkts = []
        for i in convs:
            src, sport = conv_source(i)
            spi_r = 0x6000_0000_0000 + i
            self.spi_of[i] = SPI_BASE | i
            rs = reached.get(0x5000_0000_0000 + i)
            if rs is not None:
                spi_r = (0x6000 << 48) | (i << 32) | (LABELS[rs] << 24) | 0x1234
                self.spi_of[i] = (LABELS[rs] << 24) | i
            pkts.append(craft.ike(src, self.vip, 0x5000_0000_0000 + i, spi_r, sport=sport, natt=True))
        self.send(pkts)
        time.sleep(0.3)

    def esp_round(self, convs, seq: int) -> None:
        pkts = []
        for i in convs:
            src, sport = conv_source(i)
            pkts.append(craft.esp_in_udp(src, self.vip, self.spi_of[i], seq, sport=sport, size=32))
        self.send(pkts)


def collect(sinks: Sinks, mark: int, want: int, timeout: float = 3.0) -> dict[int, set[int]]:
    """{conversation: real servers that got its ESP} for the deliveries since ``mark``."""
    deadline = time.monotonic() + timeout
    while len(sinks.since(mark)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # stragglers
    got: dict[int, set[int]] = {}
    for _, conv, rs in sinks.since(mark):
        got.setdefault(conv, set()).add(rs)
    return got


def run_mechanism(name: str, n: int, plot: bool) -> dict:
    cfg = MECHANISMS[name]
    lab = EcmpLab("dr", directors=4, hash_policy=1)
    result: dict = {"mechanism": name, "conversations": n}
    try:
        lab.up()
        def start(r: str) -> DirectorProcess:
            extra = {"daemon_extra": sync_table(lab, r)} if cfg.get("sync") else {}
            p = DirectorProcess(lab, r, role=r, scheduler=cfg["scheduler"], init_timeout=60.0, **extra)
            if cfg.get("labels"):
                p.config_path.write_text(label_config(p.config_path.read_text(), lab))
            return p.start()

        directors = {r: start(r) for r in ("d1", "d2", "d3")}
        for r in ("d1", "d2", "d3"):
            b = lab.bird(r)
            b.apply(b.plan({lab.vip}, {lab.vip}))
        lab.wait_nexthops(lab.fabric_addrs(["d1", "d2", "d3"]), ROUTE_BOUND)
        assert lab.ping("c1", lab.router_wan)
        sinks = Sinks(lab)
        sender = Sender(lab)
        every = range(n)
        sender.handshake(every, sinks, bool(cfg.get("labels")))

        m = sinks.mark()
        sender.esp_round(every, 1)
        first = collect(sinks, m, n)
        owner = {i: min(rs) for i, rs in first.items() if len(rs) == 1}
        result["established"] = len(owner)
        result["spread_over_servers"] = [sum(1 for v in owner.values() if v == k) for k in range(3)]
        per_dir = {r: p.status() for r, p in directors.items()}
        per_dir["d4"] = {"entries": 0}  # not started yet
        result["entries_per_director"] = {r: s["entries"] for r, s in per_dir.items()}

        watched = sorted(owner)[:WATCH]
        stop_watch = threading.Event()
        t_events: dict[str, float] = {}

        def watch() -> None:
            seq = 100
            while not stop_watch.is_set():
                sender.esp_round(watched, seq)
                seq += 1
                time.sleep(WATCH_INTERVAL)

        watch_mark = sinks.mark()
        t_watch0 = time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        if plot:
            watcher.start()
            time.sleep(1.0)

        # leave: d3 dies like a box
        t_events["leave"] = time.monotonic()
        lab.kill_director("d3")
        lab.wait_nexthops(lab.fabric_addrs(["d1", "d2"]), ROUTE_BOUND)
        t_events["route without d3"] = time.monotonic()
        if plot:
            time.sleep(1.0)
        m = sinks.mark()
        sender.esp_round(owner, 2)
        after_leave = collect(sinks, m, len(owner))
        ok_leave = {i for i in owner if after_leave.get(i) == {owner[i]}}
        result["broken_by_leave"] = 1 - len(ok_leave) / max(1, len(owner))

        # join: a second set established on d1 and d2, then d4 announces
        second = range(n, 2 * n)
        sender.handshake(second, sinks, bool(cfg.get("labels")))
        m = sinks.mark()
        sender.esp_round(second, 1)
        got = collect(sinks, m, n)
        owner2 = {i: min(rs) for i, rs in got.items() if len(rs) == 1 and i >= n}
        result["established_second"] = len(owner2)
        t_events["join"] = time.monotonic()
        directors["d4"] = start("d4")
        if cfg.get("sync"):  # announce once the snapshot is in (bounded)
            want = directors["d1"].status()["entries"]
            deadline = time.monotonic() + 10.0
            while directors["d4"].status()["entries"] < want and time.monotonic() < deadline:
                time.sleep(0.05)
            result["d4_snapshot_s"] = time.monotonic() - t_events["join"]
            result["d4_entries_at_announce"] = (directors["d4"].status()["entries"], want)
        b = lab.bird("d4")
        b.apply(b.plan({lab.vip}, {lab.vip}))
        lab.wait_nexthops(lab.fabric_addrs(["d1", "d2", "d4"]), ROUTE_BOUND)
        t_events["route with d4"] = time.monotonic()
        if plot:
            time.sleep(1.0)
        m = sinks.mark()
        sender.esp_round(owner2, 3)
        after_join = collect(sinks, m, len(owner2))
        ok_join = {i for i in owner2 if after_join.get(i) == {owner2[i]}}
        result["broken_by_join"] = 1 - len(ok_join) / max(1, len(owner2))
        result["misdelivered_after_join"] = sum(1 for i in owner2
                                                if after_join.get(i) and owner2[i] not in after_join[i])

        if plot:
            stop_watch.set()
            watcher.join(timeout=5)
            result["timeline"] = {
                "t0": t_watch0,
                "events": {k: v - t_watch0 for k, v in t_events.items()},
                "owner": {i: owner[i] for i in watched},
                "deliveries": [(t - t_watch0, c, rs) for t, c, rs in sinks.since(watch_mark) if c in set(watched)],
            }
        sinks.close()
        for r, p in directors.items():
            if r != "d3":
                p.stop()
    finally:
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)
    return result


def draw(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in results if "timeline" in r]
    fig, axes = plt.subplots(len(drawn), 1, figsize=(10, 2.6 * len(drawn) + 0.6), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], drawn):
        tl = r["timeline"]
        rows = {c: k for k, c in enumerate(sorted(tl["owner"]))}
        good = [(t, rows[c]) for t, c, rs in tl["deliveries"] if rs == tl["owner"][c]]
        bad = [(t, rows[c]) for t, c, rs in tl["deliveries"] if rs != tl["owner"][c]]
        if good:
            ax.scatter(*zip(*good), s=2, marker=".", color="tab:green", label="ESP at its own server")
        if bad:
            ax.scatter(*zip(*bad), s=8, marker="x", color="tab:red", label="ESP at another server")
        for name, t in tl["events"].items():
            labelled = name in ("leave", "join")
            ax.axvline(t, color="0.2" if labelled else "0.6", lw=0.8, ls="--" if labelled else ":")
            if labelled:
                text = "d3 killed" if name == "leave" else "d4 starts"
                ax.text(t, len(rows) + 0.3, f" {text}", fontsize=8, ha="left", va="bottom")
        ax.set_ylim(-1, len(rows) + 2)
        ax.set_ylabel(f"{r['mechanism']}: client")
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds (gaps: ESP dropped)")
    fig.suptitle("ESP delivery of 24 clients established on d1-d3 (L4 ECMP): d3 killed, then d4 joins\n"
                 "(dotted: the router's route changed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mechanisms", default="rr,mh")
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args(argv)
    names = [m for m in a.mechanisms.split(",") if m]
    for m in names:
        if m not in MECHANISMS:
            print(f"--mechanisms: unknown mechanism {m!r} (one of {', '.join(MECHANISMS)})", file=sys.stderr)
            return 2
        if not supported(m):
            print(f"--mechanisms: {m}: {MISSING[m]}", file=sys.stderr)
            return 2
    if not 1 <= a.conversations <= 30000:
        print("--conversations: 1..30000", file=sys.stderr)
        return 2
    results = []
    print(f"{'mechanism':<10} {'conversations':>13} {'established':>11} {'broken by leave':>16} {'broken by join':>15}")
    print(f"{'':<10} {'(per set)':>13} {'(1st, 2nd)':>11} {'(3 -> 2)':>16} {'(2 -> 3)':>15}")
    for m in names:
        r = run_mechanism(m, a.conversations, bool(a.plot))
        results.append(r)
        est = f"{r['established']},{r['established_second']}"
        print(f"{m:<10} {r['conversations']:>13} {est:>11} {r['broken_by_leave']:>16.3f} "
              f"{r['broken_by_join']:>15.3f}   servers {r['spread_over_servers']} "
              f"entries {r['entries_per_director']}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.plot:
        draw(results, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
