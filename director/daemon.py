"""The vpn-director daemon: config in, rules and routes installed, NFQUEUE verdicts out.

One event loop (select) over the client queue, the reply queue (NAT), the control socket and a
one-second tick that expires entries. Signal handlers only set flags. Per packet the loop asks the
pure core for a Verdict and applies it: DR -> fwmark (policy routing does the rest), NAT -> the
destination rewritten, TUN -> the queued packet dropped and its IP-in-IP envelope sent from the
director's own output path (a packet re-entering routing with the director's address as source
would be dropped as a martian), fragmented to the LAN MTU when needed, ICMP -> protocol-unreachable
sent (rate limited), DROP / PASS. NAT replies are rewritten in POSTROUTING (see iptables.py). A packet that makes anything raise is counted and dropped: the loop goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from pyroute2.netlink.exceptions import NetlinkError

from director import config as config_mod
from director import metrics, reconcile
from director.control import MUTATIONS, PROTOCOL_VERSION, RequestError, addr_arg, control_request, mutate
from director.core import RS_CONNS, Action, Director, rs_counter
from director.drop_reasons import DropReason
from director.forwarding.fragment import fragment
from director.forwarding.rewrite import icmp_error_dnat, icmp_unreachable, ipip_encap, nat_dnat, nat_snat
from director.packet import Kind, PacketError, int_to_ip, ip_to_int
from director.ratelimit import TokenBucket
from director.dataplane.prober import Prober
from director.metrics import Histogram
from director.service import ConfigError, Method

log = logging.getLogger(__name__)

TICK = 1.0
PROBE_TICK = 0.1  # the loop wakes at least this often while health checks run
DATAPLANES = ("auto", "ebpf", "nfqueue")
RATE_KEYS = ("cps", "inpps", "outpps", "inbps", "outbps")
SLOW_ITERATION = 0.25  # a loop iteration longer than this is logged (rate limited)


class KernelRefused(Exception):
    """The kernel refused a rule or route a config needs; the message names the field."""


class Daemon:
    """Owns the Director and the kernel pieces it drives; ``start`` / ``run`` / ``stop``.

    The running services always equal ``self.desired``, a validated Config: start, SIGHUP reload
    and every changing control request compute a new desired Config, the reconciler plans and
    applies it (nothing changes when the plan fails), and the kernel is synced to the result.
    """

    def __init__(self, cfg: config_mod.Config, *, config_path: str | None = None, dataplane: str = "auto",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if dataplane not in DATAPLANES:
            raise ValueError(f"--dataplane: must be one of {', '.join(DATAPLANES)}, got '{dataplane}'")
        self.cfg = cfg
        self.config_path = config_path
        self.dataplane = dataplane  # what was asked; after start: "ebpf" or "nfqueue"
        self.fastpath = None
        self.prober: Prober | None = None
        self.clock = clock
        d = cfg.daemon
        self.director = Director(d.capacity, now=clock(), new_rate=d.new_entries_rate,
                                 new_per_source=d.new_entries_per_source, pressure=d.drop_entry_threshold)
        reconcile.plan(self.director, cfg)  # validate everything before touching the kernel
        self.desired = config_mod.Config(cfg.daemon, ())
        self.stats = {"packets": 0, "internal_errors": 0, "icmp_sent": 0, "icmp_limited": 0,
                      "icmp_suppressed": 0, "send_errors": 0, "health_flips": 0, "slow_iterations": 0, "reloads": 0, "changes": 0}
        self.latency = {"client": Histogram(), "reply": Histogram()}
        self._icmp_bucket = TokenBucket(cfg.daemon.icmp_rate, now=clock())
        self._ident = 0
        self._stop = False
        self._reload = False
        self._queues: list = []
        self._ipr = None
        self._raw = None
        self._control = None
        self._metrics = None
        self._clients: list[socket.socket] = []
        self._marks: dict[int, int] = {}
        self._kernel: reconcile.KernelState | None = None
        self._lan_index = 0
        self._lan_addr = 0
        self._lan_mtu = 1500
        self._dests: dict[int, tuple[str, int]] = {}  # sendto() addresses of real servers, by int
        self._last_slow_log = 0.0
        self._rates: dict[int, dict[str, float]] = {}
        self._rate_last: dict[int, tuple] = {}
        self._rate_at = clock()
        self._sync: SyncLink | None = None  # failover sync ([daemon.sync]); see SyncLink below

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from pyroute2 import IPRoute

        from director.dataplane import routing
        from director.dataplane.nfqueue import Queue
        from director.packet import ip_to_int

        d = self.cfg.daemon
        self._ipr = IPRoute()
        if not self._ipr.link_lookup(ifname=d.client_interface):
            raise ValueError(f"daemon.client_interface: no interface '{d.client_interface}' in this namespace")
        self._lan_index, lan_addr = routing.interface_address(self._ipr, d.server_interface)
        self._lan_addr = ip_to_int(lan_addr)
        self._lan_mtu = self._ipr.get_links(self._lan_index)[0].get_attr("IFLA_MTU")
        routing.remove_all(self._ipr)  # leftovers of a crashed run
        self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._queues = [Queue(d.queue, self._on_client), Queue(d.queue + 1, self._on_reply)]
        self._open_control(d.control_socket)
        self.prober = Prober(lan_addr)
        self.prober.open()
        self.apply_config(self.cfg)
        if self.dataplane != "nfqueue":
            self._start_fastpath(d)
        else:
            self.dataplane = "nfqueue"
        if d.sync is not None:  # failover sync: after the fast path, so its adopted entries stay local
            self._sync = SyncLink(self, d.sync)
        if d.metrics:
            self._metrics = metrics.serve(self, d.metrics)
        k = self._kernel
        log.info("daemon.started dataplane=%s services=%d dr=%d nat=%d queue=%d metrics=%s", self.dataplane,
                 len(self.director.services), len(k.dr_servers), len(k.nat_servers), d.queue, d.metrics or "off")
        sd_notify("READY=1")

    def _start_fastpath(self, d: config_mod.DaemonConfig) -> None:
        from director.dataplane.ebpf import FastPath, FastPathUnavailable

        client_index = self._ipr.link_lookup(ifname=d.client_interface)[0]
        fp = FastPath(self.director, client_ifindex=client_index, lan_ifindex=self._lan_index,
                      lan_addr=self._lan_addr, lan_mtu=self._lan_mtu, pin_dir=Path(d.bpf_pin_dir),
                      hook=d.fastpath_hook, admit_rate=d.new_entries_rate, admit_per_source=d.new_entries_per_source,
                      fib_rules=d.fastpath_fib == "rules")
        self.director.dirty = set()
        try:
            fp.start(self._ipr)
        except FastPathUnavailable as e:
            self.director.dirty = None
            if self.dataplane == "ebpf":
                raise ValueError(f"--dataplane ebpf: {e}") from None
            log.warning("fastpath.unavailable reason=%s; using the NFQUEUE dataplane alone", e)
            self.dataplane = "nfqueue"
            return
        self.fastpath = fp
        self.director.table.activity = fp.activity
        self.dataplane = "ebpf"

    def stop(self) -> None:
        """Rules first (no packet is queued to a closing queue), then queues, routes, sockets.

        The eBPF programs and maps stay: they keep forwarding established clients' ESP while no
        daemon runs, and the next daemon adopts them (``vpn-director cleanup`` removes them).
        """
        from director.dataplane import iptables, routing

        sd_notify("STOPPING=1")
        if self._sync is not None:  # failover sync
            self._sync.close()
            self._sync = None
        if self.fastpath is not None:
            self.fastpath.close()
            self.fastpath = None
        try:
            iptables.remove()
        finally:
            for q in self._queues:
                q.close()
            self._queues = []
            if self._ipr is not None:
                routing.remove_all(self._ipr)
                self._ipr.close()
                self._ipr = None
            self._close_control()
            if self.prober is not None:
                self.prober.close()
            if self._raw is not None:
                self._raw.close()
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
                self._metrics = None
        log.info("daemon.stopped")

    def apply_config(self, new: config_mod.Config) -> reconcile.Plan:
        """Plan (validates everything; raises ConfigError and changes nothing), apply, sync the kernel.

        When the kernel refuses its part (e.g. no route to a DR real server), the table goes back
        to the previous config and the error names what was refused: all or nothing.
        """
        plan = reconcile.plan(self.director, new)
        old = self.desired
        reconcile.apply(self.director, plan)
        try:
            self._sync_kernel()
        except KernelRefused as e:
            reconcile.reconcile(self.director, old)
            self._sync_kernel()
            raise ConfigError(str(e)) from None
        self.desired = new
        if self.prober is not None:
            self.prober.sync(self.director, self.clock())
        log.info("config.applied %s services=%d", plan.summary(), len(self.director.services))
        return plan

    def _sync_kernel(self) -> None:
        from director.dataplane import iptables, routing

        want = reconcile.kernel_state(self.director)
        have = self._kernel or reconcile.KernelState((), (), ())
        d = self.cfg.daemon
        if (want.vips, want.nat_servers) != (have.vips, have.nat_servers) or self._kernel is None:
            iptables.install(iptables.RuleSet(d.client_interface, d.server_interface, want.vips,
                                              want.nat_servers, d.queue, d.fail_open))
        gone = set(have.dr_servers) - set(want.dr_servers)
        new = set(want.dr_servers) - set(have.dr_servers)
        if want.dr_servers and not have.dr_servers:
            routing.move_local_rule(self._ipr)
        for rs_id, rip in sorted(new):
            try:
                routing.add_server(self._ipr, rs_id, rip, self._lan_index)
            except NetlinkError as e:
                for done_id, _ in sorted(new):  # undo this round's routes before giving up
                    routing.remove_server(self._ipr, done_id)
                if not have.dr_servers:
                    routing.restore_local_rule(self._ipr)
                raise KernelRefused(
                    f"server.address: {rip}: cannot route to it for direct routing "
                    f"(not on-link on {self.cfg.daemon.server_interface}?): {os.strerror(e.code)}"
                ) from None
        for rs_id, _rip in sorted(gone):
            routing.remove_server(self._ipr, rs_id)
        if have.dr_servers and not want.dr_servers:
            routing.restore_local_rule(self._ipr)
        self._marks = {rs_id: routing.mark_of(rs_id) for rs_id, _ in want.dr_servers}
        self._kernel = want
        if self.fastpath is not None:
            self.fastpath.sync_services()

    def reload(self) -> reconcile.Plan:
        """Re-read the config file; the daemon section cannot change at run time."""
        if not self.config_path:
            raise ValueError("reload: the daemon was not started from a config file")
        sd_notify("RELOADING=1")
        try:
            new = config_mod.load(self.config_path)
            if new.daemon != self.cfg.daemon:
                changed = [k for k in config_mod.DaemonConfig.__dataclass_fields__
                           if getattr(new.daemon, k) != getattr(self.cfg.daemon, k)]
                raise ConfigError(f"daemon.{changed[0]}: cannot change at run time; restart the daemon")
            plan = self.apply_config(new)
            self.stats["reloads"] += 1
            return plan
        finally:
            sd_notify("READY=1")

    def _prober_fds(self) -> list:
        return self.prober.fds() if self.prober is not None else []

    def _apply_health(self, flips: list[tuple[int, bool]]) -> None:
        """A real server went down (no new clients; entries stay unless expire_on_down) or came back."""
        for rs_id, up in flips:
            rs = self.director.server(rs_id)
            if rs is None:
                continue
            self.director.set_up(rs_id, up)
            svc = self.director.services[self.director.service_of(rs_id)]
            expired = 0
            if not up and svc.health is not None and svc.health.expire_on_down:
                expired = self.director.expire_server_entries(rs_id)
            self.stats["health_flips"] += 1
            log.warning("server.%s rs=%s service=%s expired_entries=%d", "up" if up else "down",
                        int_to_ip(rs.addr), int_to_ip(svc.vip), expired)

    def request_stop(self, *_args) -> None:
        self._stop = True

    def request_reload(self, *_args) -> None:
        self._reload = True

    def run(self) -> None:
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        old = signal.set_wakeup_fd(wfd)
        next_tick = self.clock() + TICK
        try:
            while not self._stop:
                timeout = max(0.0, next_tick - self.clock())
                ready, _, _ = select.select([*self._queues, rfd, *self._control_fds(), *self._prober_fds(),
                                             *([self._sync] if self._sync else [])],
                                            [], [], min(timeout, PROBE_TICK))
                t0 = self.clock()
                for r in ready:
                    if r is rfd:
                        os.read(rfd, 512)
                    elif hasattr(r, "drain"):
                        r.drain()
                    elif r is self.prober or (self.prober is not None and r is self.prober.icmp):
                        self._apply_health(self.prober.on_readable(t0))
                    elif r is self._sync:  # failover sync
                        self._sync.on_readable(t0)
                    else:
                        self._on_control(r)
                if t0 >= next_tick:
                    # a failover backup mirrors the active's table: the active's expiry records
                    # remove entries there; its own clock would expire entries the active keeps
                    if self._sync is None or self._sync.role != "backup":
                        self.director.expire(t0)
                    self._estimate_rates(t0)
                    next_tick = t0 + TICK
                if self.prober is not None and self.prober.targets:
                    self._apply_health(self.prober.tick(self.director, t0))
                if self._sync is not None:  # failover sync: role, batch flush, snapshot requests
                    self._sync.tick(t0)
                if self.fastpath is not None and self.director.dirty:
                    self.fastpath.flush()
                if self._reload:
                    self._reload = False
                    try:
                        log.info("config.reloaded %s", self.reload().summary())
                    except (config_mod.ConfigErrors, ValueError) as e:
                        log.error("config.reload_failed %s", str(e).replace("\n", "; "))
                spent = self.clock() - t0
                if spent > SLOW_ITERATION:
                    self.stats["slow_iterations"] += 1
                    if t0 - self._last_slow_log > 10.0:
                        self._last_slow_log = t0
                        log.warning("loop.slow seconds=%.3f", spent)
        finally:
            signal.set_wakeup_fd(old)
            os.close(rfd)
            os.close(wfd)

    # -- per packet -----------------------------------------------------------------------------
    def _on_client(self, pkt) -> None:
        now = self.clock()
        try:
            data = pkt.get_payload()
            v = self.director.decide(data, now)
            self.stats["packets"] += 1
            a = v.action
            if a == Action.FORWARD or a == Action.RELAY_ICMP:
                m = v.method
                if m == Method.DR:
                    pkt.set_mark(self._marks[v.rs])
                elif m == Method.NAT:
                    pkt.set_payload(nat_dnat(data, v.addr) if a == Action.FORWARD else icmp_error_dnat(data, v.addr))
                else:
                    pkt.drop()
                    self._send_tunnel(data, v.addr)
                    self.latency["client"].observe(self.clock() - now)
                    return
                pkt.accept()
            elif a == Action.PASS:
                pkt.accept()
            else:
                pkt.drop()
                if a == Action.ICMP_UNREACH:
                    self._send_icmp(data, v.svc, now)
            self.latency["client"].observe(self.clock() - now)
        except Exception:  # the loop must survive any packet: count it, drop it, go on
            self._internal_error(pkt)

    def _on_reply(self, pkt) -> None:
        now = self.clock()
        try:
            data = pkt.get_payload()
            v = self.director.decide_reply(data, now)
            self.stats["packets"] += 1
            if v.action == Action.FORWARD:
                pkt.set_payload(nat_snat(data, v.addr))
                pkt.accept()
            elif v.action == Action.PASS:
                pkt.accept()
            else:
                pkt.drop()
            self.latency["reply"].observe(self.clock() - now)
        except Exception:
            self._internal_error(pkt)

    def _internal_error(self, pkt) -> None:
        self.stats["internal_errors"] += 1
        if self.stats["internal_errors"] & (self.stats["internal_errors"] - 1) == 0:  # 1, 2, 4, 8...: rate limited
            log.warning("packet.internal_error count=%d", self.stats["internal_errors"], exc_info=True)
        try:
            pkt.drop()
        except Exception:  # a verdict already given; nothing left to do
            pass

    def _send_tunnel(self, data: bytes, rip: int) -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        envelope = ipip_encap(data, self._lan_addr, rip, ident=self._ident)
        dest = self._dests.get(rip)
        if dest is None:
            dest = self._dests[rip] = (int_to_ip(rip), 0)
        try:
            for piece in fragment(envelope, self._lan_mtu):
                self._raw.sendto(piece, dest)
        except OSError:  # e.g. no neighbour or route to the real server right now
            self.stats["send_errors"] += 1

    def _send_icmp(self, data: bytes, svc_id: int, now: float) -> None:
        if not self._icmp_bucket.take(now):
            self.stats["icmp_limited"] += 1
            return
        try:
            reply = icmp_unreachable(data, self.director.services[svc_id].vip)
        except PacketError:  # RFC 1122: never an ICMP error about this packet (drop already counted)
            self.stats["icmp_suppressed"] += 1
            return
        try:
            self._raw.sendto(reply, (int_to_ip(int.from_bytes(reply[16:20], "big")), 0))
        except OSError:  # no route back to the (often spoofed) source: nothing to answer
            self.stats["send_errors"] += 1
            return
        self.stats["icmp_sent"] += 1

    # -- control socket (line-delimited JSON, versioned) ------------------------------------------
    def _open_control(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # root-only: the socket can change the running table
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(8)
        s.setblocking(False)
        self._control = s
        self._control_path = path

    def _close_control(self) -> None:
        for c in self._clients:
            c.close()
        self._clients = []
        if self._control is not None:
            self._control.close()
            self._control = None
            try:
                os.unlink(self._control_path)
            except FileNotFoundError:
                pass

    def _control_fds(self) -> list:
        return ([self._control] if self._control else []) + self._clients

    def _on_control(self, s: socket.socket) -> None:
        if s is self._control:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                return
            conn.settimeout(1.0)
            self._clients.append(conn)
            return
        try:
            line = s.makefile("rb").readline(65536)
            if line:
                s.sendall(json.dumps(self.handle_request(line)).encode() + b"\n")
        except (OSError, ValueError):
            pass
        finally:
            self._clients.remove(s)
            s.close()

    def handle_request(self, line: bytes) -> dict:
        """One control request (see director/control.py for the protocol); never raises."""
        try:
            try:
                req = json.loads(line)
            except ValueError:
                raise RequestError("request: not JSON") from None
            if not isinstance(req, dict):
                raise RequestError("request: must be a JSON object")
            if req.get("v") != PROTOCOL_VERSION:
                raise RequestError(f"v: protocol version {PROTOCOL_VERSION} expected, got {req.get('v')!r}")
            cmd = req.get("cmd")
            if cmd in MUTATIONS:
                plan = self.apply_config(mutate(self.desired, req))
                self.stats["changes"] += 1
                return {"ok": True, "result": plan.summary()}
            if cmd == "status":
                return {"ok": True, "result": self.status()}
            if cmd == "services":
                return {"ok": True, "result": self.services()}
            if cmd == "connections":
                client = addr_arg(req, "client") if req.get("client") is not None else None
                server = addr_arg(req, "server") if req.get("server") is not None else None
                return {"ok": True, "result": self.connections(client, server)}
            if cmd == "save":
                return {"ok": True, "result": config_mod.to_dict(self.desired)["service"]}
            if cmd == "zero":
                svc_id = None
                if req.get("vip") is not None:
                    svc = self.director.service_by_vip(ip_to_int(addr_arg(req, "vip")))
                    if svc is None:
                        raise RequestError(f"vip: no service {req['vip']}")
                    svc_id = svc.id
                self.director.zero_counters(svc_id)
                return {"ok": True, "result": "zeroed"}
            if cmd == "reload":
                return {"ok": True, "result": self.reload().summary()}
            raise RequestError(f"cmd: unknown command {cmd!r}")
        except config_mod.ConfigErrors as e:
            return {"ok": False, "error": "; ".join(e.errors)}
        except (ValueError, OSError) as e:
            return {"ok": False, "error": str(e)}

    def services(self) -> list[dict]:
        """Services and real servers with ipvsadm's --stats columns and rates."""
        d = self.director
        out = []
        for svc in d.services.values():
            servers = []
            for rs in svc.servers.values():
                c = d.rs_counters[rs.id]
                stats = {
                    "conns": c[RS_CONNS],
                    "inpkts": sum(c[rs_counter(False, k)] for k in Kind),
                    "inbytes": sum(c[rs_counter(False, k, True)] for k in Kind),
                    "outpkts": sum(c[rs_counter(True, k)] for k in Kind),
                    "outbytes": sum(c[rs_counter(True, k, True)] for k in Kind),
                }
                servers.append({
                    "id": rs.id, "address": int_to_ip(rs.addr), "weight": rs.weight,
                    "method": svc.method_of(rs).name.lower(), "active": rs.active, "inactive": rs.inactive,
                    "up": rs.up, "u_threshold": rs.u_threshold, "l_threshold": rs.l_threshold,
                    "stats": stats, "rates": self._rates.get(rs.id, dict.fromkeys(RATE_KEYS, 0.0)),
                })
            total = {k: sum(r["stats"][k] for r in servers) for k in ("conns", "inpkts", "inbytes", "outpkts", "outbytes")}
            rates = {k: sum(r["rates"][k] for r in servers) for k in RATE_KEYS}
            out.append({
                "vip": int_to_ip(svc.vip), "scheduler": svc.scheduler_name, "method": svc.method.name.lower(),
                "affinity": svc.affinity, "ah": svc.ah,
                "timeouts": {"init": svc.timeouts.init, "established": svc.timeouts.established},
                "stats": total, "rates": rates, "servers": servers,
            })
        return out

    def _estimate_rates(self, now: float) -> None:
        """ipvsadm --rate: per-second rates over the last tick, smoothed (EWMA, weight 1/2)."""
        dt = now - self._rate_at
        if dt <= 0:
            return
        for svc in self.director.services.values():
            for rs in svc.servers.values():
                c = self.director.rs_counters[rs.id]
                cur = (c[RS_CONNS], sum(c[rs_counter(False, k)] for k in Kind),
                       sum(c[rs_counter(True, k)] for k in Kind),
                       sum(c[rs_counter(False, k, True)] for k in Kind),
                       sum(c[rs_counter(True, k, True)] for k in Kind))
                prev = self._rate_last.get(rs.id, cur)
                old = self._rates.get(rs.id, dict.fromkeys(RATE_KEYS, 0.0))
                self._rates[rs.id] = {
                    k: round((old[k] + max(0, a - b) / dt) / 2, 2) for k, a, b in zip(RATE_KEYS, cur, prev)
                }
                self._rate_last[rs.id] = cur
        self._rate_at = now

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
        if self._sync is not None:  # failover sync
            out["sync"] = self._sync.status()
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
                                              "ttl_pass", "replies")},
                "clients": len(fp.clients()),
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

    def connections(self, client: str | None = None, server: str | None = None) -> list[dict]:
        now = self.clock()
        d = self.director
        want_client = ip_to_int(client) if client else None
        want_rs = {rs.id for s in d.services.values() for rs in s.servers.values()
                   if int_to_ip(rs.addr) == server} if server else None
        return [
            {"svc": e.svc, "vip": int_to_ip(d.services[e.svc].vip) if e.svc in d.services else None,
             "client": int_to_ip(e.client), "port": e.cport, "state": e.state.name,
             "spi_i": f"{e.spi_i:016x}", "spi_r": f"{e.spi_r:016x}", "rs": e.rs,
             "rs_address": int_to_ip(d.server(e.rs).addr) if d.server(e.rs) else None,
             "expires_in": round(e.expires - now, 1), "natt": e.natt}
            for e in d.table.entries()
            if (want_client is None or e.client == want_client) and (want_rs is None or e.rs in want_rs)
        ]


# -- failover sync: the socket side of director/sync.py ----------------------------------------------
class SyncLink:
    """The UDP link to the other director: sends this director's table changes while it holds the
    VIP (VRRP master), applies the peer's while it does not (backup), asks for a snapshot when it
    becomes backup (a director that joins or rejoins) until one arrives complete.

    Role ``auto``: whether a service VIP is configured on the client interface, checked every
    ROLE_CHECK seconds. keepalived adds and removes the VIP itself, so the address is the ground
    truth of who receives the clients' packets; a notify script could be missed or be late, a
    restarted daemon learns its role at once, and no script or control command is needed.
    """

    ROLE_CHECK = 0.1
    REQUEST_EVERY = 1.0

    def __init__(self, daemon: "Daemon", cfg: config_mod.SyncConfig) -> None:
        from director.sync import Receiver, Sender, parse_key

        self.daemon, self.cfg = daemon, cfg
        key = parse_key(cfg.key)
        self.peer = (cfg.peer, cfg.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(self.peer)  # the source address toward the peer: a stable sender id
            own = ip_to_int(probe.getsockname()[0])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", cfg.port))
        self.sock.setblocking(False)
        d = daemon.director
        self.sender = Sender(d, key, own, epoch=time.time_ns() // 1000)
        self.sender.attach()
        self.sender.enabled = False
        self.receiver = Receiver(d, key, own_id=own)
        self.role = ""
        self.synced = False
        self.stats = {"send_errors": 0, "role_changes": 0}
        self._next_role = self._next_request = self._next_flush = 0.0
        self._ifindex = daemon._ipr.link_lookup(ifname=daemon.cfg.daemon.client_interface)[0]
        log.info("sync.started peer=%s:%d id=%s role=%s", cfg.peer, cfg.port, int_to_ip(own), cfg.role)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _send(self, datagrams: list[bytes]) -> None:
        for dgram in datagrams:
            try:
                self.sock.sendto(dgram, self.peer)
            except OSError:  # the peer is down (that is what failover is for): counted
                self.stats["send_errors"] += 1

    def _holds_vip(self) -> bool:
        vips = {int_to_ip(s.vip) for s in self.daemon.director.services.values()}
        return any(a.get_attr("IFA_ADDRESS") in vips for a in self.daemon._ipr.get_addr(index=self._ifindex))

    def _set_role(self, role: str, now: float) -> None:
        if role == self.role:
            return
        if self.role:
            self.stats["role_changes"] += 1
        log.warning("sync.role %s -> %s", self.role or "start", role)
        if self.role == "backup" and role == "master":  # taking over: the mirrored deadlines are stale
            n = self.daemon.director.table.refresh_all(now)
            log.warning("sync.takeover entries=%d", n)
        self.role = role
        self.sender.clear()
        self.sender.enabled = role == "master"
        if role == "backup":  # our table may be stale (we were away, or master): resync
            self.synced = False
            self._next_request = now

    def tick(self, now: float) -> None:
        if now >= self._next_role:
            self._next_role = now + self.ROLE_CHECK
            role = self.cfg.role
            if role == "auto":
                role = "master" if self._holds_vip() else "backup"
            self._set_role(role, now)
        if self.role == "master":
            if self.sender.pending:
                self._send(self.sender.flush(now))
        elif not self.synced and now >= self._next_request:
            self._next_request = now + self.REQUEST_EVERY
            self._send([self.sender.request()])

    def on_readable(self, now: float) -> None:
        from director.sync import Outcome

        for _ in range(256):
            try:
                data, _addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable of an earlier send
                continue
            outcome = self.receiver.handle(data, now)
            if outcome == Outcome.REQUEST and self.role == "master":
                self._send(self.sender.snapshot(now, time.time_ns() // 1000))
                log.info("sync.snapshot_sent entries=%d", len(self.daemon.director.table))
            elif outcome == Outcome.SNAPSHOT_DONE:
                self.synced = True
                log.info("sync.snapshot_applied entries=%d", len(self.daemon.director.table))

    def status(self) -> dict:
        r, s = self.receiver.stats, self.sender.stats
        return {"role": self.role, "synced": self.synced, "peer": f"{self.cfg.peer}:{self.cfg.port}",
                "sent": s["sent"], "records_sent": s["records_sent"], "snapshots_sent": s["snapshots_sent"],
                "received": r["received"], "applied": r["applied"], "rejected_mac": r["rejected_mac"],
                "rejected_replay": r["rejected_replay"], "ignored": r["ignored"], "malformed": r["malformed"],
                "snapshots_applied": r["snapshots"], "requests": r["requests"], **self.stats}
# -- end failover sync --------------------------------------------------------------------------------


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness: one datagram to $NOTIFY_SOCKET, if set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify.failed state=%s error=%s", state, e)


def cleanup(cfg: config_mod.Config) -> int:
    """Everything a daemon (running or crashed) installed in this namespace, removed."""
    from pyroute2 import IPRoute

    from director.dataplane import iptables, routing
    from director.dataplane.ebpf import FastPath

    iptables.remove()
    with IPRoute() as ipr:
        routing.remove_all(ipr)
        ifindexes = [i for name in (cfg.daemon.client_interface, cfg.daemon.server_interface)
                     for i in ipr.link_lookup(ifname=name)]
        FastPath.remove(ipr, ifindexes, Path(cfg.daemon.bpf_pin_dir))
    print("vpn-director: rules, routes, eBPF programs and maps removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpn-director", description="IPsec-aware load-balancing director.")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the director in the foreground (as systemd does)")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--dataplane", choices=DATAPLANES, default="auto",
                     help="auto (default): the eBPF fast path where the kernel allows it, else NFQUEUE alone")
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    chk = sub.add_parser("check", help="validate a config file and exit")
    chk.add_argument("--config", required=True)
    cln = sub.add_parser("cleanup", help="remove every rule, route, eBPF program and map a daemon left (not running)")
    cln.add_argument("--config", required=True)
    rel = sub.add_parser("reload", help="ask the running daemon to re-read its config; fails if it refuses")
    rel.add_argument("--socket", default=config_mod.DaemonConfig().control_socket, help="control socket")
    demo = sub.add_parser("demo", help="bring up the namespace lab, balance real IKE/ESP packets, tear down")
    demo.add_argument("--core", action="store_true", help="only the decision core on crafted packets (no kernel)")
    demo.add_argument("--clients", type=int, default=6, help="--core: number of crafted clients (default 6)")
    demo.add_argument("--scheduler", default="wlc", help="scheduler name (default wlc)")
    demo.add_argument("--modes", default="dr,tun,nat", help="forwarding modes to show (default dr,tun,nat)")
    demo.add_argument("--dataplane", choices=DATAPLANES, default="auto", help="the daemon's dataplane (default auto)")
    demo.add_argument("--peers", choices=("both", "crafted", "strongswan"), default="both",
                      help="crafted IKE/ESP packets, real strongSwan clients and servers, or both (default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check":
            cfg = config_mod.load(args.config)
            reconcile.validate(cfg)  # what run checks: limits, services, schedulers and options
            print(f"{args.config}: ok ({len(cfg.services)} services)")
            return 0
        if args.command == "reload":
            answer = control_request(args.socket, {"cmd": "reload"})
            if not answer.get("ok"):
                print(f"vpn-director: reload refused: {answer.get('error')}", file=sys.stderr)
                return 1
            print(f"reloaded: {answer['result']}")
            return 0
        if args.command == "demo":
            if args.core:
                from director.demo import run_core_demo

                return run_core_demo(clients=args.clients, scheduler=args.scheduler)
            from director.lab.demo import run_lab_demo

            return run_lab_demo(modes=args.modes.split(","), scheduler=args.scheduler, dataplane=args.dataplane,
                                peers=args.peers)
        if args.command == "cleanup":
            return cleanup(config_mod.load(args.config))
        cfg = config_mod.load(args.config)
        daemon = Daemon(cfg, config_path=args.config, dataplane=args.dataplane)
    except config_mod.ConfigErrors as e:
        for line in e.errors:
            print(f"vpn-director: {line}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"vpn-director: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reload: no daemon listening
        print(f"vpn-director: {e}", file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
    try:
        daemon.start()
    except (ValueError, OSError) as e:
        print(f"vpn-director: {e}", file=sys.stderr)
        daemon.stop()
        return 1
    try:
        daemon.run()
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
