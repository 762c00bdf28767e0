"""The vpn-director daemon: lifecycle and the event loop.

``start`` opens the kernel pieces (queues, raw socket, routes and rules, the eBPF fast path, the
control socket, the health prober, the failover link, the metrics endpoint) and applies the
config; ``run`` is one select loop over the client queue, the reply queue (NAT), the control
socket, the prober's sockets, the failover link and a one-second tick that expires entries and
estimates rates; ``stop`` takes everything down but the eBPF programs and maps. Signal handlers
only set flags. Per packet the queue callbacks (director.dataplane.verdicts) ask the pure core for
a Verdict and apply it. What the operator reads is director.views; the control socket's server
is director.control_server; the failover link is director.dataplane.sync_link; the command line
is director.main.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Callable

from director import config as config_mod
from director import metrics, reconcile
from director.announce import DirectorState, ServiceState
from director.control import MUTATIONS, RequestError, addr_arg, mutate
from director.control_server import ControlServer
from director.core import Director
from director.dataplane.kernel_rules import KernelRefused, KernelRules
from director.dataplane.prober import Prober
from director.dataplane.return_path import Senders, netlink_neighbours, return_servers
from director.dataplane.sync_link import SyncLink
from director.dataplane.verdicts import Verdicts
from director.metrics import Histogram
from director.packet import int_to_ip, ip_to_int
from director.service import ConfigError
from director.views import Views

log = logging.getLogger(__name__)

TICK = 1.0
PROBE_TICK = 0.1  # the loop wakes at least this often while health checks run
DATAPLANES = ("auto", "ebpf", "nfqueue")
SLOW_ITERATION = 0.25  # a loop iteration longer than this is logged (rate limited)
BIRD_TIMEOUT = 1.0  # seconds the loop waits for BIRD's answer (a hung BIRD slows the tick, no more)


class Daemon:
    """Owns the Director and the kernel pieces it drives; ``start`` / ``run`` / ``stop``.

    The running services always equal ``self.desired``, a validated Config: start, SIGHUP reload
    and every changing control request compute a new desired Config, the reconciler plans and
    applies it (nothing changes when the plan fails), and the kernel is made to match the result.
    ``notify`` receives systemd's readiness states (director.main passes sd_notify).
    """

    def __init__(self, cfg: config_mod.Config, *, config_path: str | None = None, dataplane: str = "auto",
                 clock: Callable[[], float] = time.monotonic, notify: Callable[[str], None] = lambda _state: None) -> None:  # fmt: skip
        if dataplane not in DATAPLANES:
            raise ValueError(f"--dataplane: must be one of {', '.join(DATAPLANES)}, got '{dataplane}'")
        self.cfg = cfg
        self.config_path = config_path
        self.dataplane = dataplane  # what was asked; after start: "ebpf" or "nfqueue"
        self.fastpath = None
        self.prober: Prober | None = None
        self.clock = clock
        self.notify = notify
        d = cfg.daemon
        self.director = Director(d.capacity, now=clock(), new_rate=d.new_entries_rate,
                                 new_per_source=d.new_entries_per_source, pressure=d.drop_entry_threshold)
        reconcile.plan(self.director, cfg)  # validate everything before touching the kernel
        self.desired = config_mod.Config(cfg.daemon, ())
        self.stats = {"packets": 0, "internal_errors": 0, "icmp_sent": 0, "icmp_limited": 0,
                      "icmp_suppressed": 0, "send_errors": 0, "health_flips": 0, "slow_iterations": 0, "reloads": 0, "changes": 0,
                      "returned": 0, "return_ttl_expired": 0}  # the return path through the director
        self.latency = {"client": Histogram(), "reply": Histogram()}
        self.views = Views(self.director, clock=clock, stats=self.stats, latency=self.latency)
        self.verdicts = Verdicts(self.director, clock=clock, stats=self.stats, latency=self.latency,
                                 icmp_rate=d.icmp_rate)
        self.control = ControlServer(d.control_socket, self._handlers())
        self._stop = False
        self._reload = False
        self._queues: list = []
        self._ipr = None
        self._metrics = None
        self.kernel: KernelRules | None = None  # rules and routes; made in start
        self._lan_index = 0
        self._last_slow_log = 0.0
        self._sync: SyncLink | None = None  # failover sync ([daemon.sync])
        # route health injection ([daemon.bgp]): made in start, after the dataplane is up
        self.injector = None
        self._drained = d.bgp.drain if d.bgp is not None else False  # the whole director (vpnadm --drain)
        self._dataplane_up = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from pyroute2 import IPRoute

        from director.dataplane import routing
        from director.dataplane.nfqueue import Queue

        d = self.cfg.daemon
        self._ipr = IPRoute()
        if not self._ipr.link_lookup(ifname=d.client_interface):
            raise ValueError(f"daemon.client_interface: no interface '{d.client_interface}' in this namespace")
        self._lan_index, lan_addr = routing.interface_address(self._ipr, d.server_interface)
        vd = self.verdicts
        vd.lan_addr = ip_to_int(lan_addr)
        vd.lan_mtu = self._ipr.get_links(self._lan_index)[0].get_attr("IFLA_MTU")
        lan6 = routing.interface_address6(self._ipr, self._lan_index)  # ip6ip6 envelopes' source, if any
        vd.lan_addr6 = ip_to_int(lan6) if lan6 else 0
        routing.remove_all(self._ipr)  # leftovers of a crashed run
        if d.bgp is not None:  # ... and its announcement: nothing is announced until the dataplane is up
            self._withdraw_leftovers(d.bgp)
        self.kernel = KernelRules(d, self._ipr, self._lan_index)
        vd.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:  # IPv6 answers (ICMPv6 parameter problem); IPPROTO_RAW implies IPV6_HDRINCL
            vd.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError as e:  # IPv6 off in this namespace: IPv6 services cannot be answered
            log.warning("daemon.no_ipv6_raw_socket err=%s", e)
        # the return path through the director (DR/TUN replies from a VIP): who sent them, by MAC
        client_index = self._ipr.link_lookup(ifname=d.client_interface)[0]
        vd.client_mtu = self._ipr.get_links(client_index)[0].get_attr("IFLA_MTU")
        vd.senders = Senders(netlink_neighbours(self._ipr, self._lan_index), self.clock)
        self._queues = [Queue(d.queue, vd.on_client), Queue(d.queue + 1, vd.on_reply)]
        self.control.open()
        self.prober = self.views.prober = Prober(lan_addr)
        self.prober.open()
        self.apply_config(self.cfg)
        if self.dataplane != "nfqueue":
            self._start_fastpath(d)
        else:
            self.dataplane = "nfqueue"
        self.views.dataplane = self.dataplane
        if d.sync is not None:  # failover sync: after the fast path, so its adopted entries stay local
            client_index = self._ipr.link_lookup(ifname=d.client_interface)[0]
            self._sync = self.views.sync = SyncLink(self.director, d.sync, ipr=self._ipr, ifindex=client_index)
        if d.metrics:
            self._metrics = metrics.serve(self.views, d.metrics)
        self._dataplane_up = True
        for line in config_mod.consistency_warnings(self.cfg):
            log.warning("config.warning %s", line)
        if d.bgp is not None:  # route health injection: announce only now that packets are forwarded
            from director.dataplane.bgp import Bird
            from director.route_injection import RouteInjector

            self.injector = self.views.injector = RouteInjector(Bird(d.bgp.socket, d.bgp.include, timeout=BIRD_TIMEOUT))
            self.announce()
            self.injector.sessions()
        k = self.kernel.state
        log.info("daemon.started dataplane=%s services=%d dr=%d nat=%d queue=%d metrics=%s", self.dataplane,
                 len(self.director.services), len(k.dr_servers), len(k.nat_servers), d.queue, d.metrics or "off")
        self.notify("READY=1")

    def _withdraw_leftovers(self, bgp: config_mod.BgpConfig) -> None:
        """A run that crashed never withdrew its VIPs, and BIRD would go on announcing them (or
        announce them again when it restarts) with nobody forwarding: withdraw every configured
        VIP before anything else. Not fatal: BIRD may not run yet (it then reads the include)."""
        from director.dataplane.bgp import Bird, BirdError

        try:
            Bird(bgp.socket, bgp.include, timeout=BIRD_TIMEOUT).withdraw_all({s.vip for s in self.cfg.services})
        except (BirdError, OSError) as e:
            log.warning("route_injection.start_withdraw_failed %s", e)

    def _start_fastpath(self, d: config_mod.DaemonConfig) -> None:
        from director.dataplane.ebpf import FastPath, FastPathUnavailable

        client_index = self._ipr.link_lookup(ifname=d.client_interface)[0]
        fp = FastPath(self.director, client_ifindex=client_index, lan_ifindex=self._lan_index,
                      lan_addr=self.verdicts.lan_addr, lan_mtu=self.verdicts.lan_mtu, pin_dir=Path(d.bpf_pin_dir),
                      hook=d.fastpath_hook, admit_rate=d.new_entries_rate, admit_per_source=d.new_entries_per_source,
                      fib=d.fastpath_fib)
        fp.senders = self.verdicts.senders  # the return path's MAC -> real server map
        try:
            fp.start(self._ipr)
        except FastPathUnavailable as e:
            if self.dataplane == "ebpf":
                raise ValueError(f"--dataplane ebpf: {e}") from None
            log.warning("fastpath.unavailable reason=%s; using the NFQUEUE dataplane alone", e)
            self.dataplane = "nfqueue"
            return
        self.fastpath = fp
        self.dataplane = "ebpf"
        self.director.ingress_in_core = False  # the programs enforce the ingress limits before the queue
        with self.views.lock:
            self.views.attach_fastpath(fp)

    def stop(self) -> None:
        """Metrics first (no scrape reads what closes), rules (no packet is queued to a closing
        queue), then queues, routes, sockets.

        The eBPF programs and maps stay: they keep forwarding established clients' ESP while no
        daemon runs, and the next daemon adopts them (``vpn-director cleanup`` removes them).
        """
        from director.dataplane import iptables, routing

        self.notify("STOPPING=1")
        if self.injector is not None:  # withdraw first, give the routers time to move the traffic
            self.announce(shutting_down=True)
            if self.injector.error is None:
                time.sleep(self.cfg.daemon.bgp.shutdown_wait)
            else:
                log.warning("route_injection.shutdown_withdraw_failed %s", self.injector.error)
        self._dataplane_up = False
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._sync is not None:  # failover sync
            self._sync.close()
            self._sync = self.views.sync = None
        if self.fastpath is not None:
            self.fastpath.close()
            self.fastpath = self.views.fastpath = None
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
            self.control.close()
            if self.prober is not None:
                self.prober.close()
            if self.verdicts.raw is not None:
                self.verdicts.raw.close()
            if self.verdicts.raw6 is not None:
                self.verdicts.raw6.close()
        log.info("daemon.stopped")

    def apply_config(self, new: config_mod.Config) -> reconcile.Plan:
        """Plan (validates everything; raises ConfigError and changes nothing), apply, make the kernel match.

        When the kernel refuses its part (e.g. no route to a DR real server), the table goes back
        to the previous config and the error names what was refused: all or nothing. The views'
        lock is held throughout, so a metrics scrape sees the services before or after, never between.
        """
        plan = reconcile.plan(self.director, new)
        old = self.desired
        with self.views.lock:
            reconcile.apply(self.director, plan)
            try:
                self._apply_kernel()
            except KernelRefused as e:
                reconcile.reconcile(self.director, old)
                self._apply_kernel()
                self.views.config_applied()
                raise ConfigError(str(e)) from None
            self.views.config_applied()
        self.desired = new
        if self.prober is not None:
            self.prober.sync(self.director, self.clock())
        self.announce()
        log.info("config.applied %s services=%d", plan.summary(), len(self.director.services))
        return plan

    def announce(self, shutting_down: bool = False) -> None:
        """Route health injection: announce each VIP the director can serve, withdraw the others
        (director/announce.py decides; the injector applies changes only and retries failures)."""
        if self.injector is None:
            return
        drained = {s.vip for s in self.desired.services if s.drain}
        services = [ServiceState(int_to_ip(svc.vip), sum(1 for rs in svc.servers.values() if rs.up and rs.weight > 0),
                                 int_to_ip(svc.vip) in drained) for svc in self.director.services.values()]  # fmt: skip
        synced = self._sync is None or self._sync.table_ready(self.clock())
        self.injector.update(DirectorState(self._dataplane_up, self._drained, shutting_down, synced), services)

    def _apply_kernel(self) -> None:
        """Rules, DR routes and the fast path's service maps equal the running services."""
        self.verdicts.marks = self.kernel.apply(self.director)
        if self.verdicts.senders is not None:
            self.verdicts.senders.set_servers(return_servers(self.director))
        if self.fastpath is not None:
            self.fastpath.sync_services()

    def reload(self) -> reconcile.Plan:
        """Re-read the config file; the daemon section cannot change at run time."""
        if not self.config_path:
            raise ValueError("reload: the daemon was not started from a config file")
        self.notify("RELOADING=1")
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
            self.notify("READY=1")

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
        if flips:
            self.announce()

    # -- control requests (protocol: director/control.py; the socket side: director/control_server.py) --
    def _handlers(self) -> dict:
        views = self.views

        def opt_addr(req: dict, name: str) -> str | None:
            return addr_arg(req, name) if req.get(name) is not None else None

        return {
            **dict.fromkeys(MUTATIONS, self._mutate),
            "status": lambda req: views.status(),
            "services": lambda req: views.services(),
            "connections": lambda req: views.connections(opt_addr(req, "client"), opt_addr(req, "server")),
            "save": lambda req: config_mod.to_dict(self.desired)["service"],
            "zero": self._zero,
            "reload": lambda req: self.reload().summary(),
            "drain": lambda req: self._drain(req, True),
            "undrain": lambda req: self._drain(req, False),
        }

    def _drain(self, req: dict, on: bool) -> str:
        """vpnadm --drain/--undrain: one VIP (its service's ``drain`` setting) or the whole director."""
        if self.injector is None:
            raise RequestError("drain: no [daemon.bgp] in the config: this director announces no route")
        if req.get("vip") is not None:
            vip = addr_arg(req, "vip")
            self.apply_config(mutate(self.desired, {"cmd": "edit-service", "vip": vip, "changes": {"drain": on}}))
            what = vip
        else:
            self._drained = on
            self.announce()
            what = "director"
        log.info("route_injection.%s %s", "drain" if on else "undrain", what)
        if self.injector.error is not None:
            raise RequestError(f"{what}: {'drained' if on else 'undrained'}, but BIRD refused: {self.injector.error}")
        shown = ", ".join(f"{s.vip} {'announced' if s.announced else 'withdrawn'}" for s in self.injector.status())
        return f"{what} {'drained' if on else 'undrained'}: {shown or 'no VIP'}"

    def _mutate(self, req: dict) -> str:
        plan = self.apply_config(mutate(self.desired, req))
        self.stats["changes"] += 1
        return plan.summary()

    def _zero(self, req: dict) -> str:
        svc_id = None
        if req.get("vip") is not None:
            svc = self.director.service_by_vip(ip_to_int(addr_arg(req, "vip")))
            if svc is None:
                raise RequestError(f"vip: no service {req['vip']}")
            svc_id = svc.id
        self.views.zero(svc_id)
        return "zeroed"

    # -- the loop -------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop = True

    def request_reload(self, *_args) -> None:
        self._reload = True

    def run(self) -> None:
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        old = signal.set_wakeup_fd(wfd)
        next_tick = self.clock() + TICK
        ctl, prober = self.control, self.prober
        try:
            while not self._stop:
                timeout = max(0.0, next_tick - self.clock())
                ready, writable, _ = select.select(
                    [*self._queues, rfd, *ctl.read_fds(), *(prober.fds() if prober else []),
                     *([self._sync] if self._sync else []), *(self.fastpath.watch_fds() if self.fastpath else [])],
                    ctl.write_fds(), [], min(timeout, PROBE_TICK))  # fmt: skip
                t0 = self.clock()
                for r in ready:
                    if r is rfd:
                        os.read(rfd, 512)
                    elif hasattr(r, "drain"):
                        r.drain()
                    elif prober is not None and r in prober.fds():
                        self._apply_health(prober.on_readable(t0))
                    elif r is self._sync:  # failover sync
                        self._sync.on_readable(t0)
                    else:
                        ctl.on_readable(r, t0)
                for w in writable:
                    ctl.on_writable(w)
                if t0 >= next_tick:
                    # a failover backup mirrors the active's table: the active's expiry records
                    # remove entries there; its own clock would expire entries the active keeps
                    if self._sync is None or self._sync.role != "backup":
                        self.director.expire(t0)
                    if self.fastpath is not None:  # SPI labels: entries for clients the kernel steered
                        self.fastpath.drain_labels(t0)
                        self.fastpath.refresh_next_hops(t0)  # every nexthop.REFRESH s, events or not
                    self.views.tick(t0)
                    ctl.expire(t0)
                    if self.injector is not None:  # retries a refused change; session states for views
                        self.announce()
                        self.injector.sessions()
                    next_tick = t0 + TICK
                if prober is not None and prober.targets:
                    self._apply_health(prober.tick(self.director, t0))
                if self._sync is not None:  # failover sync: role, batch flush, snapshot requests
                    self._sync.tick(t0)
                if self.fastpath is not None and self.fastpath.pending:
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
