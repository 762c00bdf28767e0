"""Make a running Director match a desired Config: plan (validate everything), then apply. Pure.

Every change goes this way: the daemon's start, a SIGHUP reload, and each control-socket request
(which first edits the desired Config). ``plan`` builds every new object (services, real servers,
schedulers) and checks every rule before anything changes, so a bad change raises ConfigError and
leaves the running table as it was. ``apply`` then cannot fail on validation. Services are matched
by VIP and real servers by address, so ids, entries and counters of unchanged parts survive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from director.config import Config, ServerConfig, ServiceConfig
from director.core import Director
from director.health import HealthConfig
from director.isakmp_state import Timeouts
from director.packet import int_to_ip, ip_to_int
from director.schedulers import RealServer, Scheduler, make_scheduler
from director.forwarding.method import AH_ACROSS_NAT, Method, ah_across_nat
from director.service import ConfigError, Service


@dataclass
class ServiceChange:
    svc_id: int
    fields: dict
    scheduler: Scheduler | None
    add: list[RealServer] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)
    update: list[tuple[int, ServerConfig]] = field(default_factory=list)


@dataclass
class Plan:
    add: list[Service] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)
    change: list[ServiceChange] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.add:
            parts.append(f"add={len(self.add)}")
        if self.remove:
            parts.append(f"remove={len(self.remove)}")
        touched = [c for c in self.change if c.fields or c.scheduler or c.add or c.remove or c.update]
        if touched:
            parts.append(f"change={len(touched)}")
        return " ".join(parts) or "no change"


def _server_fields(r: ServerConfig) -> dict:
    return {"weight": r.weight, "method": r.method, "u_threshold": r.u_threshold, "l_threshold": r.l_threshold}


def _service_fields(s: ServiceConfig) -> dict:
    return {
        "scheduler_name": s.scheduler,
        "scheduler_options": dict(s.scheduler_options),
        "method": s.method,
        "affinity": s.affinity,
        "affinity_prefix": s.affinity_prefix,
        "ah": s.ah,
        "timeouts": Timeouts(s.init_timeout, s.established_timeout),
        "retransmit_threshold": s.retransmit_threshold,
        "soft_limit": s.soft_limit,
        "soft_grace": s.soft_grace,
        "expire_quiescent": s.expire_quiescent,
        "return_path": s.return_path,
        "health": HealthConfig(**dict(s.health)) if s.health else None,
        # SPI labels by real server address (the core maps them to server ids): () = none
        "spi_label": (s.spi_label_mask, tuple((ip_to_int(r.address), r.spi_label, r.esp_spi_min, r.esp_spi_max)
                                              for r in s.servers)) if s.spi_label_mask else (),
        "ingress": s.ingress,  # per-source ingress limits: () = none
    }


class _Ids:
    """Fresh ids never reuse one still in use or still named by table entries of the past run."""

    def __init__(self, used: set[int], limit: int) -> None:
        self.used = set(used)
        self.next = max(used, default=-1) + 1
        self.limit = limit

    def take(self, what: str) -> int:
        for _ in range(self.limit + 1):
            i = self.next
            self.next = (self.next + 1) % self.limit
            if i not in self.used:
                self.used.add(i)
                return i
        raise ConfigError(f"{what}: no free id (at most {self.limit})")


def plan(d: Director, cfg: Config) -> Plan:
    """Everything needed to go from ``d`` to ``cfg``, every object built and checked."""
    p = Plan()
    svc_ids = _Ids(set(d.services), 0xFFFF)
    rs_ids = _Ids({rs for s in d.services.values() for rs in s.servers}, 0xFFFF)
    wanted = {ip_to_int(s.vip): s for s in cfg.services}
    for svc in d.services.values():
        if svc.vip not in wanted:
            p.remove.append(svc.id)
    for i, sc in enumerate(cfg.services):
        where = f"service[{i}]"
        vip = ip_to_int(sc.vip)
        fields = _service_fields(sc)
        svc = d.service_by_vip(vip)
        try:
            _check_ah(where, sc, fields["method"])
            if svc is None:
                servers = {}
                for r in sc.servers:
                    rid = rs_ids.take(f"{where}.server")
                    servers[rid] = RealServer(id=rid, addr=ip_to_int(r.address), **_server_fields(r))
                p.add.append(Service(id=svc_ids.take(where), vip=vip, servers=servers, **fields))
                continue
            change = ServiceChange(svc.id, {}, None)
            for k, v in fields.items():
                if getattr(svc, k) != v:
                    change.fields[k] = v
            if "scheduler_name" in change.fields or "scheduler_options" in change.fields:
                change.scheduler = make_scheduler(sc.scheduler, **dict(sc.scheduler_options))
            by_addr = {int_to_ip(rs.addr): rs for rs in svc.servers.values()}
            wanted_rs = {r.address: r for r in sc.servers}
            change.remove = [rs.id for a, rs in by_addr.items() if a not in wanted_rs]
            for a, r in wanted_rs.items():
                rs = by_addr.get(a)
                if rs is None:
                    rid = rs_ids.take(f"{where}.server")
                    change.add.append(RealServer(id=rid, addr=ip_to_int(a), **_server_fields(r)))
                elif any(getattr(rs, k) != v for k, v in _server_fields(r).items()):
                    change.update.append((rs.id, r))
            p.change.append(change)
        except ValueError as e:
            msg = str(e)
            if msg.startswith("service."):
                msg = where + msg[len("service"):]
            elif not msg.startswith("service["):
                msg = f"{where}.scheduler: {msg}"
            raise ConfigError(msg) from None
    return p


def validate(cfg: Config) -> Director:
    """Everything ``vpn-director run`` checks before it touches the kernel, without the kernel.

    A director built with the daemon's limits (the table sized 1: the capacity is checked by the
    loader, and a real table of millions would only cost memory here), the whole config planned
    and applied to it: every service, real server and scheduler built with its options. ``check``
    calls this, so it refuses what ``run`` refuses. Raises ConfigError (or ValueError) naming the
    field."""
    d = cfg.daemon
    director = Director(1, new_rate=d.new_entries_rate, new_per_source=d.new_entries_per_source,
                        pressure=d.drop_entry_threshold)
    reconcile(director, cfg)
    return director


def _check_ah(where: str, sc: ServiceConfig, method: Method) -> None:
    """A config from director.config obeys the rule already; a hand-made one is checked here, before
    change_service would find out half way."""
    nat = ah_across_nat(sc.ah, method, (r.method for r in sc.servers))
    if nat is not None:
        raise ConfigError(f"{where}.ah: {AH_ACROSS_NAT}" if nat < 0 else f"{where}.server[{nat}].method: {AH_ACROSS_NAT}")


def apply(d: Director, p: Plan) -> None:
    for svc_id in p.remove:
        d.remove_service(svc_id)
    for c in p.change:
        if c.fields or c.scheduler or c.add or c.remove or c.update:
            d.change_service(
                c.svc_id, fields=c.fields, scheduler=c.scheduler, remove=c.remove,
                update=[(rs_id, _server_fields(r)) for rs_id, r in c.update], add=c.add,
            )
    for svc in p.add:
        d.add_service(svc)


def reconcile(d: Director, cfg: Config) -> Plan:
    """Plan and apply; raises ConfigError (and changes nothing) when the plan cannot be made."""
    p = plan(d, cfg)
    apply(d, p)
    return p


@dataclass(frozen=True)
class KernelState:
    """What the kernel must know of the services: the daemon syncs rules and routes to it."""

    vips: tuple[str, ...]
    nat_servers: tuple[str, ...]
    dr_servers: tuple[tuple[int, str], ...]  # (real server id, address)
    return_vips: tuple[str, ...] = ()  # VIPs of services whose DR/TUN replies pass the director


def kernel_state(d: Director) -> KernelState:
    vips, nat, dr = [], set(), []
    for svc in d.services.values():
        vips.append(int_to_ip(svc.vip))
        for rs in svc.servers.values():
            m = svc.method_of(rs)
            if m == Method.NAT:
                nat.add(int_to_ip(rs.addr))
            elif m == Method.DR:
                dr.append((rs.id, int_to_ip(rs.addr)))
    ret = tuple(sorted(int_to_ip(s.vip) for s in d.services.values() if s.return_path == "director"))
    return KernelState(tuple(sorted(vips)), tuple(sorted(nat)), tuple(sorted(dr)), ret)
