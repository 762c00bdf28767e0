"""What the operator reads: status, ipvsadm-style services with --stats and --rate, connections,
drop counts. Pure: it reads the Director, the counter read model and the parts the daemon hands it.

The daemon owns a Views and attaches its parts (fast path, health prober, failover link) as they
start; the control socket and the metrics collector read them through it and never reach into
the daemon. Packet and byte figures come from one place, :class:`director.counters.Counters`
(user space's counts plus the kernel's), and so do the rates.

``lock`` is held by the daemon while it changes services (reconcile, -Z) and by the metrics
collector while it reads (prometheus_client scrapes from its own HTTP thread): a scrape sees the
services before or after a change, never half of one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from director.core import Director
from director.counters import IPVS_COLUMNS, Counters, Totals, ipvs_stats
from director.drop_reasons import DropReason
from director.packet import Kind, int_to_ip, ip_to_int

RATE_KEYS = ("cps", "inpps", "outpps", "inbps", "outbps")  # ipvsadm --rate, same order as IPVS_COLUMNS
_ZERO = (0,) * len(IPVS_COLUMNS)


class FastPathView(Protocol):
    """What the views read of the eBPF fast path (director.dataplane.ebpf.FastPath)."""

    stats: dict

    def dp_stats(self) -> dict: ...
    def rs_stats(self) -> dict[int, dict]: ...
    def clients(self) -> list: ...


class Rates:
    """ipvsadm --rate: per-second rates of each real server over the last tick, smoothed (EWMA,
    weight 1/2), from the same totals --stats shows."""

    def __init__(self, now: float) -> None:
        self._rates: dict[int, dict[str, float]] = {}
        self._last: dict[int, tuple[int, ...]] = {}
        self._at = now

    def update(self, totals: Totals, now: float) -> None:
        dt = now - self._at
        if dt <= 0:
            return
        for rs_id, r in totals.servers.items():
            st = ipvs_stats(r)
            cur = tuple(st[k] for k in IPVS_COLUMNS)
            # a server not seen before counts from zero: it was added since the last tick (its
            # counters start at zero, the kernel's from a baseline) or the daemon just started
            prev = self._last.get(rs_id, _ZERO)
            old = self._rates.get(rs_id, dict.fromkeys(RATE_KEYS, 0.0))
            # a counter that went down was zeroed (-Z): no negative rate
            self._rates[rs_id] = {k: round((old[k] + max(0, a - b) / dt) / 2, 2)
                                  for k, a, b in zip(RATE_KEYS, cur, prev)}  # fmt: skip
            self._last[rs_id] = cur
        for gone in set(self._rates) - set(totals.servers):
            del self._rates[gone]
            self._last.pop(gone, None)
        self._at = now

    def of(self, rs_id: int) -> dict[str, float]:
        return self._rates.get(rs_id, dict.fromkeys(RATE_KEYS, 0.0))


class Views:
    """The daemon's read side. ``stats`` and ``latency`` are the daemon's own counters (shared
    objects, updated in place); ``fastpath``, ``prober`` and ``sync`` are attached as they start."""

    def __init__(self, director: Director, *, clock: Callable[[], float], stats: dict[str, int],
                 latency: dict[str, Any]) -> None:  # fmt: skip
        self.director = director
        self.clock = clock
        self.stats = stats
        self.latency = latency
        self.dataplane = ""
        self.fastpath: FastPathView | None = None
        self.prober: Any = None  # .view(rs_id) -> dict (director.dataplane.prober.Prober)
        self.sync: Any = None  # .status() -> dict (director.dataplane.sync_link.SyncLink)
        self.injector: Any = None  # route health injection (director.route_injection.RouteInjector)
        self.counters = Counters(director)
        self.rates = Rates(clock())
        self.lock = threading.Lock()

    def attach_fastpath(self, fp: FastPathView) -> None:
        self.fastpath = fp
        self.counters.attach(fp.rs_stats)

    def config_applied(self) -> None:
        """Called with ``lock`` held after the services changed."""
        self.counters.servers_changed()

    def zero(self, svc_id: int | None) -> None:
        """vpnadm -Z: one service's counters (or all), user space's and the kernel's."""
        d = self.director
        with self.lock:
            d.zero_counters(svc_id)
            self.counters.zeroed(rs for sid, s in d.services.items() if svc_id in (None, sid) for rs in s.servers)

    def tick(self, now: float) -> None:
        self.rates.update(self.counters.totals(), now)

    # -- the views ------------------------------------------------------------------------------
    def services(self) -> list[dict]:
        """Services and real servers with ipvsadm's --stats columns and rates."""
        totals = self.counters.totals()
        out = []
        for svc in self.director.services.values():
            servers = []
            for rs in svc.servers.values():
                servers.append({
                    "id": rs.id, "address": int_to_ip(rs.addr), "weight": rs.weight,
                    "method": svc.method_of(rs).name.lower(), "active": rs.active, "inactive": rs.inactive,
                    "up": rs.up, "u_threshold": rs.u_threshold, "l_threshold": rs.l_threshold,
                    "stats": totals.server_stats(rs.id), "rates": self.rates.of(rs.id),
                })
            out.append({
                "vip": int_to_ip(svc.vip), "scheduler": svc.scheduler_name, "method": svc.method.name.lower(),
                "affinity": svc.affinity, "affinity_prefix": svc.affinity_prefix, "ah": svc.ah, "expire_quiescent": svc.expire_quiescent,
                "scheduler_options": dict(svc.scheduler_options),
                "timeouts": {"init": svc.timeouts.init, "established": svc.timeouts.established},
                "stats": {k: sum(r["stats"][k] for r in servers) for k in IPVS_COLUMNS},
                "rates": {k: sum(r["rates"][k] for r in servers) for k in RATE_KEYS},
                "servers": servers,
                **({"ingress": dict(zip(("esp_pps", "ah_pps", "ike_pps", "burst"), svc.ingress))} if svc.ingress else {}),
            })
        ann = self.announcements()
        if ann is not None:  # route health injection
            for s in out:
                s["announcement"] = ann["vips"].get(s["vip"])
                s["bgp_sessions"] = ann["sessions"]
        return out

    # -- route health injection -----------------------------------------------------------------
    def announcements(self) -> dict | None:
        """Each VIP's announcement (wanted, as BIRD runs it, why withdrawn) and the BGP sessions'
        states as last read; None without [daemon.bgp]."""
        inj = self.injector
        if inj is None:
            return None
        return {
            "vips": {v.vip: {"announced": v.announced, "wanted": v.wanted,
                             "reason": v.reason.name.lower() if v.reason is not None else None}
                     for v in inj.status()},  # fmt: skip
            "sessions": dict(inj.session_states),
            "drifts": inj.drifts,  # times BIRD was found running something else than applied
            "error": inj.error,
        }
    # -- end route health injection -------------------------------------------------------------

    def status(self) -> dict:
        d = self.director
        out = {
            "dataplane": self.dataplane,
            "entries": len(d.table),
            "init": d.table.n_init,
            "established": d.table.n_established,
            "stats": {**d.stats, **self.stats},
            "table": dict(d.table.stats),
            "drops": {DropReason(i).name: n for i, n in self.drop_counts().items() if n},
            "services": [
                {
                    "id": s.id, "vip": int_to_ip(s.vip), "scheduler": s.scheduler_name, "method": s.method.name,
                    "servers": [
                        {"id": r.id, "address": int_to_ip(r.addr), "weight": r.weight, "active": r.active,
                         "inactive": r.inactive, "method": s.method_of(r).name, "up": r.up,
                         "health": self.prober.view(r.id) if self.prober is not None else None}
                        for r in s.servers.values()
                    ],
                }
                for s in d.services.values()
            ],
        }
        if self.sync is not None:  # failover sync
            out["sync"] = self.sync.status()
        if self.injector is not None:  # route health injection
            out["bgp"] = self.announcements()
        if self.fastpath is not None:
            fp = self.fastpath
            st = fp.dp_stats()
            out["fastpath"] = {
                **fp.stats,
                "forwarded": {Kind(k).name: n for k, n in enumerate(st.get("fwd_packets", [])) if n},
                "passed": {Kind(k).name: n for k, n in enumerate(st.get("pass_packets", [])) if n},
                "drops": {DropReason(i).name: n for i, n in enumerate(st.get("drops", []))
                          if n and i in DropReason._value2member_map_},
                **{k: st.get(k, 0) for k in ("miss", "fragments", "not_ours", "fib_miss", "mtu_pass",
                                              "ttl_pass", "replies", "returned")},
                "clients": len(fp.clients()),
                "hook": fp.hook,
                "hook_reason": fp.hook_reason,
                "fib": fp.fib,
                "next_hops": fp.next_hop_status(),
            }
        return out

    def drop_counts(self) -> dict[int, int]:
        """Drops by DropReason value, the slow path's and the fast path's (malformed packets die there)."""
        out = {r.value: self.director.drops[r] for r in DropReason}
        if self.fastpath is not None:
            for i, n in enumerate(self.fastpath.dp_stats().get("drops", [])):
                if i in out:
                    out[i] += n
        return out

    def sync_status(self) -> dict | None:
        return self.sync.status() if self.sync is not None else None

    def connections(self, client: str | None = None, server: str | None = None) -> list[dict]:
        now = self.clock()
        d = self.director
        want_client = ip_to_int(client) if client else None
        want_rs = {rs.id for s in d.services.values() for rs in s.servers.values()
                   if int_to_ip(rs.addr) == server} if server else None  # fmt: skip
        return [
            {"svc": e.svc, "vip": int_to_ip(d.services[e.svc].vip) if e.svc in d.services else None,
             "client": int_to_ip(e.client), "port": e.cport, "state": e.state.name,
             "spi_i": f"{e.spi_i:016x}", "spi_r": f"{e.spi_r:016x}", "rs": e.rs,
             "rs_address": int_to_ip(d.server(e.rs).addr) if d.server(e.rs) else None,
             "expires_in": round(e.expires - now, 1), "natt": e.natt}
            for e in d.table.entries()
            if (want_client is None or e.client == want_client) and (want_rs is None or e.rs in want_rs)
        ]
