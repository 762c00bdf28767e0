"""Prometheus metrics (docs/metrics.md): read from the daemon's views at scrape time.

Nothing is recorded per packet through prometheus_client: the core keeps plain array counters and
the daemon a fixed-bucket latency histogram; this collector turns them into metric families when
Prometheus scrapes. It reads director.views only (packets and bytes from the one counter read
model, which adds what the eBPF fast path forwarded in the kernel), holding the views' lock so a
scrape never sees half of a config change. Labels never carry a client address, cookie or SPI.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from director import __version__
from director.core import RS_CONNS, Action, rs_counter, svc_counter
from director.drop_reasons import DropReason
from director.packet import Kind, int_to_ip

if TYPE_CHECKING:
    from director.views import Views

KINDS = [k for k in Kind if k not in (Kind.NOT_OURS, Kind.FRAGMENT)]
VERDICTS = {Action.FORWARD: "forward", Action.DROP: "drop", Action.ICMP_UNREACH: "icmp_unreachable"}
OUTCOMES = ("scheduled", "persisted", "adopted", "rescheduled_dead", "rescheduled_stuck", "label_steered",
            "rescheduled_quiesced")
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3)


class Histogram:
    """A fixed-bucket histogram cheap enough for the per-packet path (one bisect, two adds)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = array("Q", [0]) * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.total += v

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, n in zip(self.bounds, self.counts):
            acc += n
            out.append((repr(b), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class Collector:
    """Registered with a prometheus_client registry; ``collect`` runs on each scrape (its thread)."""

    def __init__(self, views: "Views") -> None:
        self.views = views

    def collect(self) -> Iterator:
        with self.views.lock:  # every family from one state of the services
            families = list(self._families())
        yield from families

    def _families(self) -> Iterator:  # noqa: C901 - one family after the other, flat on purpose
        vw = self.views
        d = vw.director
        totals = vw.counters.totals()
        pk = CounterMetricFamily("director_packets", "Packets decided per service, kind and verdict",
                                 labels=["service", "kind", "verdict"])
        by = CounterMetricFamily("director_bytes", "Bytes decided per service, kind and verdict",
                                 labels=["service", "kind", "verdict"])
        rpk = CounterMetricFamily("director_real_server_packets", "Packets to (in) or from (out, NAT) a real server",
                                  labels=["service", "server", "kind", "direction"])
        rby = CounterMetricFamily("director_real_server_bytes", "Bytes to (in) or from (out, NAT) a real server",
                                  labels=["service", "server", "kind", "direction"])
        conns = CounterMetricFamily("director_real_server_connections", "ISAKMP entries created on a real server",
                                    labels=["service", "server"])
        active = GaugeMetricFamily("director_real_server_active_entries", "ESTABLISHED entries",
                                   labels=["service", "server"])
        inactive = GaugeMetricFamily("director_real_server_inactive_entries", "INIT entries",
                                     labels=["service", "server"])
        weight = GaugeMetricFamily("director_real_server_weight", "Configured weight (0 = quiesced)",
                                   labels=["service", "server"])
        up = GaugeMetricFamily("director_real_server_up", "1 when the real server is up", labels=["service", "server"])
        for svc in d.services.values():
            vip = int_to_ip(svc.vip)
            ctr = totals.services[svc.id]
            for kind in KINDS:
                kname = kind.name.lower()
                for action, vname in VERDICTS.items():
                    pk.add_metric([vip, kname, vname], ctr[svc_counter(action, kind)])
                    by.add_metric([vip, kname, vname], ctr[svc_counter(action, kind, True)])
            for rs in svc.servers.values():
                rip = int_to_ip(rs.addr)
                r = totals.servers[rs.id]
                for kind in KINDS:
                    kname = kind.name.lower()
                    for reply, direction in ((False, "in"), (True, "out")):
                        rpk.add_metric([vip, rip, kname, direction], r[rs_counter(reply, kind)])
                        rby.add_metric([vip, rip, kname, direction], r[rs_counter(reply, kind, True)])
                conns.add_metric([vip, rip], r[RS_CONNS])
                active.add_metric([vip, rip], rs.active)
                inactive.add_metric([vip, rip], rs.inactive)
                weight.add_metric([vip, rip], rs.weight)
                up.add_metric([vip, rip], 1 if rs.up else 0)
        yield from (pk, by, rpk, rby, conns, active, inactive, weight, up)

        sched = CounterMetricFamily("director_schedulings", "New-conversation outcomes", labels=["outcome"])
        for o in OUTCOMES:
            sched.add_metric([o], d.stats[o])
        yield sched

        t = d.table
        entries = GaugeMetricFamily("director_entries", "Entries in the table", labels=["state"])
        entries.add_metric(["init"], t.n_init)
        entries.add_metric(["established"], t.n_established)
        yield entries
        yield GaugeMetricFamily("director_entries_limit", "Table capacity (hard entry limit)", value=t.capacity)
        ev = CounterMetricFamily("director_table_evictions", "Drop-entry reclaims", labels=["class"])
        ev.add_metric(["init"], t.stats["reclaimed_init"])
        ev.add_metric(["soft"], t.stats["reclaimed_soft"])
        yield ev
        yield CounterMetricFamily("director_table_refused", "New entries refused: table full",
                                  value=t.stats["refused_full"])
        ex = CounterMetricFamily("director_table_expired", "Entries expired", labels=["state"])
        ex.add_metric(["init"], t.stats["expired_init"])
        ex.add_metric(["established"], t.stats["expired_established"])
        yield ex
        yield CounterMetricFamily("director_table_superseded",
                                  "ESTABLISHED conversations replaced by a newer one of their client endpoint",
                                  value=t.stats["superseded"])  # fmt: skip

        drops = CounterMetricFamily("director_drops", "Drops by reason (slow and fast path)", labels=["reason"])
        counts = vw.drop_counts()
        for r in DropReason:
            drops.add_metric([r.name.lower()], counts[r.value])
        yield drops

        st = vw.stats
        yield CounterMetricFamily("director_icmp_unreachable_sent", "ICMP protocol-unreachable answers sent",
                                  value=st["icmp_sent"])
        yield CounterMetricFamily("director_icmp_unreachable_limited", "ICMP answers withheld by the rate limit",
                                  value=st["icmp_limited"])
        yield CounterMetricFamily("director_icmp_unreachable_suppressed",
                                  "ICMP answers RFC 1122 forbids (about an ICMP error, a fragment, a broadcast)",
                                  value=st["icmp_suppressed"])
        # the fast path relays DR and TUN ones itself: its forwarded NOT_OURS packets are those
        in_kernel = vw.fastpath.dp_stats().get("fwd_packets", [0])[0] if vw.fastpath is not None else 0
        yield CounterMetricFamily("director_icmp_errors_relayed",
                                  "ICMP errors about a conversation relayed to its real server (unmatched: drops)",
                                  value=d.stats["icmp_relayed"] + in_kernel)
        if vw.fastpath is not None:  # SPI labels in the fast path (docs/fastpath.md, "SPI labels")
            fs = vw.fastpath.stats  # its kernel counters refreshed by the dp_stats() read just above
            lp = CounterMetricFamily("director_fastpath_label_packets",
                                     "ESP with no clients entry of a labelled service, by the kernel's label decode",
                                     labels=["result"])  # fmt: skip
            for r in ("forwarded", "unknown"):
                lp.add_metric([r], fs.get(f"label_{r}", 0))
            lr = CounterMetricFamily("director_fastpath_label_records",
                                     "Clients the kernel forwarded by label: records, and the entries made of them",
                                     labels=["outcome"])  # fmt: skip
            for o in ("recorded", "drained", "created", "known", "refused"):
                lr.add_metric([o], fs.get(f"label_{o}", 0))
            yield lp
            yield lr
        yield CounterMetricFamily("director_send_errors", "Answers or envelopes the kernel would not send (no route)",
                                  value=st.get("send_errors", 0))
        yield CounterMetricFamily("director_internal_errors", "Packets whose handling raised",
                                  value=st["internal_errors"])
        yield CounterMetricFamily("director_slow_iterations", "Event-loop iterations over 0.25 s",
                                  value=st["slow_iterations"])
        lat = HistogramMetricFamily("director_nfqueue_handling_seconds", "Callback arrival to verdict",
                                    labels=["queue"])
        for name, h in vw.latency.items():
            lat.add_metric([name], h.cumulative(), sum_value=h.total)
        yield lat
        st_sync = vw.sync_status()
        if st_sync is not None:  # table sync (docs/metrics.md)
            yield from _sync_families(st_sync)
        ann = vw.announcements()
        if ann is not None:  # route health injection (docs/metrics.md)
            vip_up = GaugeMetricFamily("director_vip_announced",
                                       "1 while this director's BGP speaker announces the VIP", labels=["service"])
            for vip, a in sorted(ann["vips"].items()):
                vip_up.add_metric([vip], 1 if a["announced"] else 0)
            yield vip_up
            sess = GaugeMetricFamily("director_bgp_session_up", "1 while the BGP session to the peer is Established",
                                     labels=["peer"])
            for peer, state in sorted(ann["sessions"].items()):
                sess.add_metric([peer], 1 if state == "Established" else 0)
            yield sess
            yield GaugeMetricFamily("director_route_injection_error",
                                    "1 while the BGP speaker refuses or cannot be reached (the last announcement stays)",
                                    value=1 if ann["error"] else 0)
        yield GaugeMetricFamily("director_services", "Configured virtual services", value=len(d.services))
        info = GaugeMetricFamily("director_build_info", "Build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _sync_families(st: dict):
    """The table sync's families: totals, the kernel's drops of strangers, and per peer the last
    datagram's age and the datagrams rejected by cause."""
    for k in ("sent", "received", "applied", "rejected_mac", "rejected_replay", "ignored"):
        yield CounterMetricFamily(f"director_sync_{k}", f"Table sync: records/datagrams {k}", value=st.get(k, 0))
    for k, text in (("conflicts_kept", "records that lost a conflict to the local entry (role all)"),
                    ("conflicts_taken", "records that won a conflict against the local entry (role all)"),
                    ("natt_port_kept", "records whose pre-NAT-T port did not replace a NAT-T one (role all)")):
        yield CounterMetricFamily(f"director_sync_{k}", f"Table sync: {text}", value=st.get(k, 0))
    yield CounterMetricFamily("director_sync_dropped_kernel", "Table sync: datagrams the kernel dropped before "
                              "the socket (not from a configured peer, or a full queue)",
                              value=st.get("dropped_kernel", 0))
    age = GaugeMetricFamily("director_sync_peer_last_datagram_age_seconds",
                            "Table sync: seconds since the last datagram from the peer (absent: none yet)",
                            labels=["peer"])
    rej = CounterMetricFamily("director_sync_peer_rejected", "Table sync: the peer's datagrams rejected, by cause",
                              labels=["peer", "cause"])
    acc = CounterMetricFamily("director_sync_peer_accepted", "Table sync: the peer's datagrams accepted",
                              labels=["peer"])
    for p in st.get("peers", ()):
        if p["last_age"] is not None:
            age.add_metric([p["peer"]], p["last_age"])
        for cause in ("mac", "replay"):
            rej.add_metric([p["peer"], cause], p[f"rejected_{cause}"])
        rej.add_metric([p["peer"], "malformed"], p["malformed"])
        acc.add_metric([p["peer"]], p["accepted"])
    yield age
    yield rej
    yield acc


def serve(views: "Views", address: str):
    """Start the HTTP endpoint on ``host:port`` (a thread of prometheus_client); returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"daemon.metrics: must be host:port, got '{address}'")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(views))
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
