"""The decision core: one packet's bytes and the time in, one Verdict out. Pure.

The dataplane adapters (NFQUEUE, eBPF map sync) apply verdicts; they never re-derive one. The rules,
in this order for a client packet to a VIP:

- Ingress limits (a service's ``ingress``, director/ingress.py), first: an IKE packet, or ESP, AH or
  ESP-in-UDP with no ESTABLISHED entry (and, for ESP, no SPI label naming a server), over its
  source's rate is dropped, counted, not answered. Off while the eBPF programs enforce them before
  the queue (``ingress_in_core``).

- IKE, responder cookie zero (initial): a known conversation keeps its real server (a repeat is
  counted; past the service's threshold with no sign of life the conversation is rescheduled: the
  passive health signal). A new one follows the client's live state if any (implicit persistence,
  quiesced servers included unless the service sets ``expire_quiescent``) or is scheduled.
- IKE, responder cookie set: a known conversation is refreshed and turns ESTABLISHED (in NAT mode,
  and in DR/TUN with ``return_path = "director"``, only with the responder cookie the real server
  sent). An unknown cookie pair follows the client's real server and is adopted as ESTABLISHED (an
  IKEv2 IKE SA rekey changes SPIs), or is dropped.
- ESP / AH: the client's ESTABLISHED entry decides; none -> ICMP protocol-unreachable.
- ESP-in-UDP: the ESTABLISHED entry of client IP+port; INIT only -> drop; none -> unreachable.
- NAT-keepalive: follows the client's entry; none -> drop.
- ICMP error (types 3, 11, 12) quoting a packet the VIP sent to a client (UDP from port 500 or 4500,
  ESP, AH): relayed to the real server of that client's conversation (the entry of client IP+port
  for UDP, the client's ESTABLISHED entry for ESP/AH), as IPVS relays them; no conversation -> drop.
  It creates and refreshes nothing, so a flood of them cannot fill the table. Other ICMP: the kernel's.

Replies (``decide_reply``): from a NAT real server, the responder SPI recorded and the source
rewritten to the VIP. From a VIP whose service has ``return_path = "director"`` (DR/TUN servers
routing via the director): forwarded to the client only for a conversation of that client held
by the real server that sent it; IKE records the responder SPI; anything else is dropped.
"""

from __future__ import annotations

from array import array
from enum import IntEnum
from typing import NamedTuple

from director.conntrack import NO_RS, NO_SLOT, Table, TableFull, TableListener
from director.ratelimit import SourceBuckets, TokenBucket
from director.drop_reasons import DropReason
from director import ingress as _ing
from director.isakmp_state import Event, State
from director.packet import PROTO_AH, PROTO_ESP, PROTO_UDP, Kind, PacketError, classify, parse_icmp_error
from director.schedulers import RealServer
from director.service import ConfigError, Method, Service
from director.spi_label import ServerLabel, SpiLabels


_SERVICE_FIELDS = frozenset({
    "scheduler_name", "scheduler_options", "method", "affinity", "affinity_prefix", "ah", "timeouts",
    "retransmit_threshold", "soft_limit", "soft_grace", "health", "spi_label", "expire_quiescent",
    "ingress",
    "return_path",
})


class Action(IntEnum):
    PASS = 0  # not ours: let the kernel have it unchanged
    FORWARD = 1  # to real server ``rs`` by ``method`` (or, for a reply, source rewritten to ``addr``)
    DROP = 2
    ICMP_UNREACH = 3  # drop and answer ICMP type 3 code 2 to the sender (IPv6: ICMPv6 parameter problem, code 1)
    RELAY_ICMP = 4  # an ICMP error about a conversation: to real server ``rs`` by ``method`` (NAT also
    # rewrites the quoted source: director.forwarding.rewrite.icmp_error_dnat)


class Verdict(NamedTuple):
    action: Action
    kind: Kind
    reason: int = 0  # DropReason for DROP / ICMP_UNREACH, else 0
    svc: int = -1
    rs: int = NO_RS
    addr: int = 0  # the real server's address (forward), the VIP (NAT reply source) or the client (return path)
    method: int = Method.DR
    reply: bool = False  # reply direction: NAT (``method``) rewrites the source to ``addr``; DR/TUN go to the client


_PASS = {k: Verdict(Action.PASS, k) for k in Kind}
_new = tuple.__new__  # a Verdict without the NamedTuple constructor's Python-level call
# enum members as module constants: an attribute load of an enum member costs ~75 ns per use
_FORWARD, _DROP, _ICMP, _RELAY = Action.FORWARD, Action.DROP, Action.ICMP_UNREACH, Action.RELAY_ICMP
_K_IKE_INITIAL, _K_IKE, _K_ESP, _K_AH, _K_ESP_IN_UDP = Kind.IKE_INITIAL, Kind.IKE, Kind.ESP, Kind.AH, Kind.ESP_IN_UDP
_K_NOT_OURS, _K_FRAGMENT = Kind.NOT_OURS, Kind.FRAGMENT
_INIT, _ESTABLISHED = State.INIT, State.ESTABLISHED

NK = len(Kind)
# per-service counters: [(verdict - 1) * NK + kind] * 2 + (0 packets | 1 bytes), verdict FORWARD..ICMP
SVC_COUNTERS = 3 * NK * 2
# per-real-server counters: [(direction * NK + kind) * 2 + (0 packets | 1 bytes)], then connections
RS_CONNS = 2 * NK * 2
RS_COUNTERS = RS_CONNS + 1


def svc_counter(action: Action, kind: Kind, bytes_: bool = False) -> int:
    """Index into a service's counters (for readers: metrics, listings)."""
    return ((action - 1) * NK + kind) * 2 + bytes_


def rs_counter(reply: bool, kind: Kind, bytes_: bool = False) -> int:
    """Index into a real server's counters; ``reply`` = NAT replies from the server."""
    return (reply * NK + kind) * 2 + bytes_


class _ServerCounts(TableListener):
    """Keeps every RealServer's active (ESTABLISHED) and inactive (INIT) entry counts true."""

    __slots__ = ("table", "count")

    def __init__(self, table: Table, count) -> None:
        self.table = table
        self.count = count  # Director._count(rs, state, +1/-1)

    def created(self, s: int) -> None:
        self.count(self.table.rs_of(s), _INIT, 1)

    def established(self, s: int) -> None:
        rs = self.table.rs_of(s)
        self.count(rs, _INIT, -1)
        self.count(rs, _ESTABLISHED, 1)

    def moved(self, s: int, old_rs: int, state: int) -> None:
        self.count(old_rs, state, -1)
        self.count(self.table.rs_of(s), state, 1)

    def removed(self, s: int, event: Event, state: int) -> None:
        self.count(self.table.rs_of(s), state, -1)


class _PrefixGroups(TableListener):
    """The live entries of each (service, client prefix), newest last, for services with an
    ``affinity_prefix`` (ipvsadm's -M): a dict per prefix, insertion-ordered, so adding, removing
    and finding the newest are O(1). Bounded by the table: one slot per entry at most."""

    __slots__ = ("d", "groups")

    def __init__(self, director: "Director") -> None:
        self.d = director
        self.groups: dict[tuple[int, int], dict[int, None]] = {}

    def _key(self, s: int) -> tuple[int, int] | None:
        t = self.d.table
        svc = self.d.services.get(t.svc_of(s))
        if svc is None or not svc.affinity_prefix or svc.affinity != "ip":
            return None
        return svc.id, svc.prefix_of(t.client_of(s))

    def created(self, s: int) -> None:
        k = self._key(s)
        if k is not None:
            self.groups.setdefault(k, {})[s] = None

    def removed(self, s: int, event: Event, state: int) -> None:
        k = self._key(s)
        g = self.groups.get(k) if k is not None else None
        if g is not None:
            g.pop(s, None)
            if not g:
                del self.groups[k]

    def newest(self, svc_id: int, prefix: int) -> int:
        g = self.groups.get((svc_id, prefix))
        return next(reversed(g)) if g else NO_SLOT

    def rebuild(self, svc_id: int) -> None:
        """After the service's prefix changed: its groups anew from the table (a scan: operator action)."""
        for k in [k for k in self.groups if k[0] == svc_id]:
            del self.groups[k]
        t = self.d.table
        for s in sorted(t.slots(), key=lambda s: t.view(s).created):
            if t.svc_of(s) == svc_id:
                self.created(s)


class ClientProjection(TableListener):
    """The table as the eBPF fast path's ``clients`` map holds it: for each service and client, the
    real server of the client's newest ESTABLISHED entry, under (VIP, client, 0) for raw ESP/AH
    and (VIP, client, port) for ESP-in-UDP (docs/fastpath.md).

    As a table listener it notes which (service, client, port) an event may have changed (only
    ESTABLISHED entries are in the map); ``drain`` recomputes exactly those keys. ``last_seen``
    (VIP, client, port) -> seconds or None tells the table when the fast path last forwarded for
    a client, so an ESTABLISHED entry whose ESP the table never sees does not expire under it.
    Made and registered by ``Director.client_projection``.
    """

    def __init__(self, director: "Director", last_seen=None) -> None:
        self.d = director
        self.table = director.table
        self.last_seen = last_seen
        self.pending: set[tuple[int, int, int]] = set()

    def _mark(self, s: int, port: int) -> None:
        svc, client, _ = self.table.conversation(s)
        self.pending.add((svc, client, port))

    def established(self, s: int) -> None:
        self._mark(s, self.table.port_of(s))

    def changed(self, s: int, old_port: int) -> None:
        if self.table.state_of(s) == State.ESTABLISHED:
            self._mark(s, old_port)
            self._mark(s, self.table.port_of(s))

    def moved(self, s: int, old_rs: int, state: int) -> None:
        if state == State.ESTABLISHED:
            self._mark(s, self.table.port_of(s))

    def removed(self, s: int, event: Event, state: int) -> None:
        if state == State.ESTABLISHED:
            self._mark(s, self.table.port_of(s))

    def activity(self, s: int) -> float | None:
        if self.last_seen is None:
            return None
        svc_id, client, _ = self.table.conversation(s)
        svc = self.d.services.get(svc_id)
        if svc is None:
            return None
        newest = None
        for port in {0, self.table.port_of(s)}:
            t = self.last_seen(svc.vip, client, port)
            if t is not None and (newest is None or t > newest):
                newest = t
        return newest

    def drain(self) -> list[tuple[int, int, int, int | None]]:
        """(VIP, client, port, real server id or None = no entry: delete the key) for every key
        that may have changed since the last drain; the raw key (port 0) of each client once."""
        if not self.pending:
            return []
        todo = list(self.pending)
        self.pending.clear()
        out = []
        done_raw = set()
        t = self.table
        for svc_id, client, port in todo:
            svc = self.d.services.get(svc_id)
            if svc is None:
                continue
            if (svc_id, client) not in done_raw:
                done_raw.add((svc_id, client))
                out.append((svc.vip, client, 0, self._route(svc, t.established_of_client(svc_id, client)[0])))
            if port:
                out.append((svc.vip, client, port, self._route(svc, t.established_of_natt(svc_id, client, port)[0])))
        return out

    def _route(self, svc: Service, s: int) -> int | None:
        if s == NO_SLOT:
            return None
        rs = self.table.rs_of(s)
        return rs if rs in svc.servers else None


class Director:
    """Services, real servers and the table; ``decide`` is the per-packet entry point."""

    def __init__(self, capacity: int = 65536, *, now: float = 0.0, new_rate: float = 0.0,
                 new_per_source: float = 0.0, pressure: float = 1.0, seed: int | None = None) -> None:
        """``new_rate`` / ``new_per_source``: new ISAKMP entries per second allowed in all and per
        client address (0 = no limit); ``pressure``: table fill above which drop-entry starts."""
        self.table = Table(capacity, now=now, pressure=pressure, seed=seed)
        self.table.listen(_ServerCounts(self.table, self._count))
        self._prefixes = _PrefixGroups(self)
        self.table.listen(self._prefixes)
        self._new_limit = TokenBucket(new_rate, now=now) if new_rate > 0 else None
        self._source_limit = SourceBuckets(new_per_source) if new_per_source > 0 else None
        self.services: dict[int, Service] = {}
        self._by_vip: dict[int, Service] = {}
        self._servers: dict[int, RealServer] = {}  # every real server by its global id
        self._rs_service: dict[int, int] = {}
        self._nat_by_addr: dict[int, list[tuple[Service, RealServer]]] = {}
        self.drops = array("Q", [0]) * 100  # by DropReason value
        self.by_kind = array("Q", [0]) * len(Kind)
        self.stats = {
            "forwarded": 0,
            "passed": 0,
            "icmp_unreach": 0,
            "scheduled": 0,
            "persisted": 0,
            "rescheduled_dead": 0,
            "rescheduled_stuck": 0,
            "rescheduled_quiesced": 0,
            "adopted": 0,
            "replies": 0,
            "icmp_relayed": 0,
            "label_steered": 0,  # conversations with no entry here sent where their SPI label says
        }
        self.stuck_by_rs: dict[int, int] = {}
        self.svc_counters: dict[int, array] = {}
        self.rs_counters: dict[int, array] = {}
        self._rs_method: dict[int, Method] = {}  # each real server's effective method, kept current
        self._labels: dict[int, SpiLabels] = {}  # SPI label decoders by service id (services with labels)
        # per-source ingress limits by service id (services with an ``ingress`` table); off while
        # the eBPF fast path enforces them before the queue (the daemon clears it), so a packet
        # the kernel let through is not judged twice
        self._ingress: dict[int, _ing.ServiceIngress] = {}
        self.ingress_in_core = True

    # -- configuration -----------------------------------------------------------------------
    def add_service(self, svc: Service) -> None:
        if svc.id in self.services:
            raise ConfigError(f"service.id: service {svc.id} exists")
        if svc.vip in self._by_vip:
            raise ConfigError(f"service.vip: a service for this VIP exists (id {self._by_vip[svc.vip].id})")
        for rs in svc.servers.values():
            self._check_new_server(rs)
        self.services[svc.id] = svc
        self._by_vip[svc.vip] = svc
        self.svc_counters[svc.id] = array("Q", [0]) * SVC_COUNTERS
        self.table.set_timeouts(svc.id, svc.timeouts)
        self.table.set_soft_expiry(svc.id, svc.soft_limit, svc.soft_grace)
        for rs in svc.servers.values():
            self._index_server(svc, rs)
        self._build_labels(svc)
        self._build_ingress(svc)

    def _build_labels(self, svc: Service) -> None:
        """The service's SPI label decoder, by real server id (the config validated the labels)."""
        self._labels.pop(svc.id, None)
        if not svc.spi_label:
            return
        mask, servers = svc.spi_label
        ids = {rs.addr: rs.id for rs in svc.servers.values()}
        self._labels[svc.id] = SpiLabels.build(mask, {ids[a]: ServerLabel(label, lo, hi)
                                                      for a, label, lo, hi in servers if a in ids})  # fmt: skip

    def _build_ingress(self, svc: Service) -> None:
        """The service's ingress limiters; kept (with their state) while its settings stay."""
        old = self._ingress.get(svc.id)
        if not svc.ingress:
            self._ingress.pop(svc.id, None)
        elif old is None or tuple(old.config) != tuple(svc.ingress):
            self._ingress[svc.id] = _ing.ServiceIngress(_ing.IngressConfig(*svc.ingress))

    def remove_service(self, svc_id: int) -> int:
        """Remove a service, its real servers and its entries (a scan: operator action only)."""
        svc = self._service(svc_id)
        for rs_id in list(svc.servers):
            self.remove_server(svc_id, rs_id)
        del self.services[svc_id]
        del self._by_vip[svc.vip]
        self._prefixes.rebuild(svc_id)  # the service is gone: its prefix groups go too
        self._labels.pop(svc_id, None)
        self._ingress.pop(svc_id, None)
        del self.svc_counters[svc_id]
        t = self.table
        doomed = [s for s in t.slots() if t.svc_of(s) == svc_id]
        for s in doomed:
            t.remove(s)
        return len(doomed)

    def change_service(
        self,
        svc_id: int,
        *,
        fields: dict | None = None,
        scheduler=None,
        remove: list[int] = (),
        update: list[tuple[int, dict]] = (),
        add: list[RealServer] = (),
    ) -> None:
        """One atomic change of a running service (the reconciler validated the end state).

        ``fields`` are Service settings, ``scheduler`` a ready Scheduler for a new scheduler name
        or options, ``update`` (real server id, {weight, method, u_threshold, l_threshold}).
        Entries stay: new timeouts apply from each entry's next refresh (IPVS semantics).
        """
        svc = self._service(svc_id)
        for rs_id in remove:
            self.remove_server(svc_id, rs_id)
        grouping = (svc.affinity, svc.affinity_prefix)
        for k, v in (fields or {}).items():
            if k not in _SERVICE_FIELDS:
                raise ConfigError(f"service.{k}: not a service setting")
            setattr(svc, k, v)
        if (svc.affinity, svc.affinity_prefix) != grouping:
            self._prefixes.rebuild(svc.id)
        if scheduler is not None:
            svc.scheduler = scheduler
        for rs_id, f in update:
            rs = self._server(rs_id)
            rs.weight, rs.method, rs.u_threshold, rs.l_threshold = (
                f["weight"], f["method"], f["u_threshold"], f["l_threshold"])
            rs.update_overload()
        for rs in add:
            self._check_new_server(rs)
            svc.check_family(rs)
            svc.servers[rs.id] = rs
            self._index_server(svc, rs)
        svc.check_ah()
        self.table.set_timeouts(svc.id, svc.timeouts)
        self.table.set_soft_expiry(svc.id, svc.soft_limit, svc.soft_grace)
        self._reindex_nat(svc)
        self._build_labels(svc)
        self._build_ingress(svc)
        svc.refresh_scheduler()

    def _reindex_nat(self, svc: Service) -> None:
        for rs in svc.servers.values():
            self._rs_method[rs.id] = svc.method_of(rs)
        for pairs in self._nat_by_addr.values():
            pairs[:] = [p for p in pairs if p[0] is not svc]
        for rs in svc.servers.values():
            if svc.method_of(rs) == Method.NAT:
                self._nat_by_addr.setdefault(rs.addr, []).append((svc, rs))

    def server(self, rs_id: int) -> RealServer | None:
        return self._servers.get(rs_id)

    def service_of(self, rs_id: int) -> int | None:
        return self._rs_service.get(rs_id)

    def service_by_vip(self, vip: int) -> Service | None:
        return self._by_vip.get(vip)

    def add_server(self, svc_id: int, rs: RealServer) -> None:
        svc = self._service(svc_id)
        self._check_new_server(rs)
        svc.check_family(rs)
        svc.check_ah(extra=rs)
        svc.servers[rs.id] = rs
        self._index_server(svc, rs)
        svc.refresh_scheduler()

    def remove_server(self, svc_id: int, rs_id: int) -> None:
        """Its clients are rescheduled on their next initial packet (and counted then)."""
        svc = self._service(svc_id)
        rs = svc.servers.pop(rs_id, None)
        if rs is None:
            raise ConfigError(f"server.id: no real server {rs_id} in service {svc_id}")
        del self._servers[rs_id]
        del self._rs_service[rs_id]
        del self.rs_counters[rs_id]
        del self._rs_method[rs_id]
        pairs = self._nat_by_addr.get(rs.addr, [])
        pairs[:] = [p for p in pairs if p[1] is not rs]
        svc.refresh_scheduler()

    def set_weight(self, rs_id: int, weight: int) -> None:
        if not 0 <= weight <= 65535:
            raise ConfigError(f"server.weight: must be 0..65535, got {weight}")
        rs = self._server(rs_id)
        rs.weight = weight
        self.services[self._rs_service[rs_id]].refresh_scheduler()

    def set_up(self, rs_id: int, up: bool) -> None:
        rs = self._server(rs_id)
        rs.up = up
        self.services[self._rs_service[rs_id]].refresh_scheduler()

    def expire_server_entries(self, rs_id: int) -> int:
        """Remove every entry on a real server (IPVS expire_nodest_conn): its clients reschedule
        on their next initial packet. A scan of the table: an operator or health event only."""
        t = self.table
        doomed = [s for s in t.slots() if t.rs_of(s) == rs_id]
        for s in doomed:
            t.remove(s)
        return len(doomed)

    def _check_new_server(self, rs: RealServer) -> None:
        if not 0 <= rs.id < NO_RS:
            raise ConfigError(f"server.id: must be 0..65534, got {rs.id}")
        if rs.id in self._servers:
            raise ConfigError(f"server.id: real server {rs.id} exists")
        if not 0 <= rs.weight <= 65535:
            raise ConfigError(f"server.weight: must be 0..65535, got {rs.weight}")
        if rs.method is not None and not isinstance(rs.method, Method):
            raise ConfigError(f"server.method: must be a Method or None, got {rs.method!r}")

    def _index_server(self, svc: Service, rs: RealServer) -> None:
        self._servers[rs.id] = rs
        self._rs_service[rs.id] = svc.id
        self.rs_counters.setdefault(rs.id, array("Q", [0]) * RS_COUNTERS)
        self._rs_method[rs.id] = svc.method_of(rs)
        if svc.method_of(rs) == Method.NAT:
            self._nat_by_addr.setdefault(rs.addr, []).append((svc, rs))

    def _service(self, svc_id: int) -> Service:
        try:
            return self.services[svc_id]
        except KeyError:
            raise ConfigError(f"service.id: no service {svc_id}") from None

    def _server(self, rs_id: int) -> RealServer:
        try:
            return self._servers[rs_id]
        except KeyError:
            raise ConfigError(f"server.id: no real server {rs_id}") from None

    # -- the table for the modules that mirror it (fast path, failover sync) -------------------
    def listen(self, listener: TableListener) -> None:
        """Table events to ``listener`` (conntrack.TableListener) from now on."""
        self.table.listen(listener)

    def unlisten(self, listener: TableListener) -> None:
        self.table.unlisten(listener)

    def client_projection(self, last_seen=None) -> ClientProjection:
        """A ClientProjection of this director's table, registered for its events."""
        p = ClientProjection(self, last_seen)
        self.listen(p)
        return p

    def adopt_client(self, vip: int, client: int, port: int, rs_id: int, spi_i: int, now: float) -> bool:
        """An ESTABLISHED entry for a client found forwarded elsewhere (the fast path's map left
        by an earlier daemon), unless its service or real server is gone or it exists. Raises
        TableFull."""
        svc = self._by_vip.get(vip)
        if svc is None or rs_id not in svc.servers or self.table.lookup(svc.id, client, spi_i) != NO_SLOT:
            return False
        s = self.table.create(svc.id, client, port, spi_i, rs_id, now)
        self.table.establish(s, 0, now)
        self.stats["adopted"] += 1
        return True

    def entry_record(self, s: int) -> tuple | None:
        """(the entry's view, its service's VIP, its real server's address) for a peer that knows
        services by VIP and servers by address; None if either is gone."""
        v = self.table.view(s)
        svc = self.services.get(v.svc)
        rs = self._servers.get(v.rs)
        if svc is None or rs is None:
            return None
        return v, svc.vip, rs.addr

    def _count(self, rs_id: int, state: int, delta: int) -> None:
        rs = self._servers.get(rs_id)
        if rs is None:
            return
        if state == State.ESTABLISHED:
            rs.active += delta
        else:
            rs.inactive += delta
        if rs.u_threshold:
            was = rs.overloaded
            rs.update_overload()
            if was != rs.overloaded:
                self.services[self._rs_service[rs_id]].refresh_scheduler()

    # -- per packet ----------------------------------------------------------------------------
    def decide(self, data: bytes, now: float) -> Verdict:
        """Verdict for a packet arriving from a client (toward a VIP)."""
        try:
            c = classify(data)
        except PacketError as e:
            self.drops[e.reason] += 1
            return Verdict(Action.DROP, Kind.NOT_OURS, e.reason)
        kind = c.kind
        svc = self._by_vip.get(c.dst)
        if kind == _K_NOT_OURS and (c.proto == 1 or c.proto == 58) and svc is not None:
            return self._icmp_error(svc, data)
        if svc is None or kind == _K_NOT_OURS or kind == _K_FRAGMENT:
            self.stats["passed"] += 1
            return _PASS[kind]
        self.by_kind[kind] += 1
        v = self._decide(svc, c, now)
        n = c.wire_len
        ctr = self.svc_counters[svc.id]
        i = ((v.action - 1) * NK + kind) * 2
        ctr[i] += 1
        ctr[i + 1] += n
        if v.action == _FORWARD:
            r = self.rs_counters[v.rs]
            r[kind * 2] += 1
            r[kind * 2 + 1] += n
        return v

    def _decide(self, svc: Service, c, now: float) -> Verdict:
        kind = c.kind
        if kind == _K_ESP or kind == _K_AH:
            if kind == _K_AH and not svc.ah:
                refused = self._ingress_refused(svc, _ing.AH, c.src, now)
                return self._drop(kind, refused or DropReason.NO_ENTRY, svc, icmp=refused is None)
            s, _ = self.table.established_of_client(svc.id, c.src)
            if s < 0:
                if kind == _K_ESP and self._names_a_server(svc, c.spi):
                    return self._label_esp(svc, c, now)
                # no ESTABLISHED entry, no label: within the source's ingress limit
                refused = self._ingress_refused(svc, _ing.AH if kind == _K_AH else _ing.ESP, c.src, now)
                if refused:
                    return self._drop(kind, refused, svc)
                return self._drop(kind, DropReason.NO_ENTRY, svc, icmp=True)
            return self._forward_entry(svc, kind, s, now)
        if kind == _K_IKE_INITIAL or kind == _K_IKE:
            refused = self._ingress_refused(svc, _ing.IKE, c.src, now)  # every IKE packet
            if refused:
                return self._drop(kind, refused, svc)
            return self._ike_initial(svc, c, now) if kind == _K_IKE_INITIAL else self._ike(svc, c, now)
        if kind == _K_ESP_IN_UDP:
            s, saw_init = self.table.established_of_natt(svc.id, c.src, c.sport)
            if s < 0:
                if not saw_init and self._names_a_server(svc, c.spi):
                    return self._label_esp(svc, c, now)
                refused = self._ingress_refused(svc, _ing.ESP, c.src, now)  # no ESTABLISHED entry, no label
                if refused:
                    return self._drop(kind, refused, svc)
                if saw_init:
                    return self._drop(kind, DropReason.ENTRY_NOT_ESTABLISHED, svc)
                return self._drop(kind, DropReason.NO_ENTRY, svc, icmp=True)
            return self._forward_entry(svc, kind, s, now)
        # NAT-keepalive: keeps the NAT mapping, not the entry; follows the client's real server
        s = self.table.natt_head(svc.id, c.src, c.sport)
        if s < 0:
            s = self.table.client_head(svc.id, c.src)
        if s < 0:
            return self._drop(kind, DropReason.NO_ENTRY, svc)
        return self._forward_entry(svc, kind, s, None)

    def _icmp_error(self, svc: Service, data) -> Verdict:
        """An ICMP packet to a VIP: an error about a conversation goes to its real server."""
        try:
            e = parse_icmp_error(data)
        except PacketError as x:
            self.drops[x.reason] += 1
            return _new(Verdict, (_DROP, _K_NOT_OURS, x.reason, svc.id, NO_RS, 0, Method.DR, False))
        if e is None or e.qsrc != svc.vip:  # not an error, or about a packet the VIP did not send
            self.stats["passed"] += 1
            return _PASS[_K_NOT_OURS]
        t = self.table
        if e.qproto == PROTO_UDP and (e.qsport == 500 or e.qsport == 4500):
            s, _ = t.established_of_natt(svc.id, e.qdst, e.qdport)
            if s < 0:  # an IKE conversation still INIT (a large IKE_SA_INIT answer, say)
                s = t.natt_head(svc.id, e.qdst, e.qdport)
        elif e.qproto == PROTO_ESP or e.qproto == PROTO_AH:
            s, _ = t.established_of_client(svc.id, e.qdst)
        else:  # a quote without its UDP ports, or a protocol the director does not balance
            self.stats["passed"] += 1
            return _PASS[_K_NOT_OURS]
        if s < 0:
            return self._drop(_K_NOT_OURS, DropReason.ICMP_NO_ENTRY, svc)
        rs = self._servers.get(t.rs_of(s))
        if rs is None:
            return self._drop(_K_NOT_OURS, DropReason.REAL_SERVER_GONE, svc)
        self.stats["icmp_relayed"] += 1
        return _new(Verdict, (_RELAY, _K_NOT_OURS, 0, svc.id, rs.id, rs.addr, self._rs_method[rs.id], False))

    def _ike_initial(self, svc: Service, c, now: float) -> Verdict:
        t = self.table
        s = t.lookup(svc.id, c.src, c.spi_i)
        if s >= 0:
            rs = self._servers.get(t.rs_of(s))
            if t.state_of(s) == _INIT:
                n = t.retransmit(s, now, c.wire_len)
                self._follow_port(t, s, c, now)
                if rs is None or not rs.up:
                    rs = self._reschedule(svc, c, s, "rescheduled_dead")
                elif (
                    svc.retransmit_threshold
                    and n >= svc.retransmit_threshold
                    and not t.spi_r_from_server(s)
                ):
                    self.stuck_by_rs[rs.id] = self.stuck_by_rs.get(rs.id, 0) + 1
                    rs = self._reschedule(svc, c, s, "rescheduled_stuck", exclude=rs.id)
                if rs is None:
                    return self._drop(_K_IKE_INITIAL, DropReason.NO_REAL_SERVER, svc)
            elif rs is None:
                return self._drop(_K_IKE_INITIAL, DropReason.REAL_SERVER_GONE, svc)
            return self._forward(svc, _K_IKE_INITIAL, rs)
        # a new conversation: admission (DoS limits), persistence, then the scheduler
        refused = self._refuse_new(c.src, now)
        if refused:
            return self._drop(_K_IKE_INITIAL, refused, svc)
        rs = None
        a = self._affinity_slot(svc, c)
        if a >= 0:
            rs = self._servers.get(t.rs_of(a))
            if rs is not None and rs.up and self._rs_service.get(rs.id) == svc.id:
                if rs.weight == 0 and svc.expire_quiescent:
                    rs = None  # quiescent expiry: the client's live state no longer binds it
                    self.stats["rescheduled_quiesced"] += 1
                else:
                    self.stats["persisted"] += 1
            else:
                rs = None
                self.stats["rescheduled_dead"] += 1
        if rs is None:
            rs = svc.scheduler.pick(c.src, c.dst, c.sport)
            if rs is None:
                return self._drop(_K_IKE_INITIAL, DropReason.NO_REAL_SERVER, svc)
            self.stats["scheduled"] += 1
        try:
            t.create(svc.id, c.src, c.sport, c.spi_i, rs.id, now, ike_len=c.wire_len, natt=c.natt)
        except TableFull:
            return self._drop(_K_IKE_INITIAL, DropReason.TABLE_FULL, svc)
        self.rs_counters[rs.id][RS_CONNS] += 1
        return self._forward(svc, _K_IKE_INITIAL, rs)

    def _ike(self, svc: Service, c, now: float) -> Verdict:
        t = self.table
        s = t.lookup(svc.id, c.src, c.spi_i)
        if s < 0:
            rs = None
            labels = self._labels.get(svc.id)
            if labels is not None:  # the SPI the real server chose names it: it holds this IKE SA
                rs = self._labelled(svc, labels.decode_ike(c.spi_i, c.spi_r, c.ike_version, c.flags))
            stat = "label_steered"
            if rs is None:
                a = self._affinity_slot(svc, c)
                rs = self._servers.get(t.rs_of(a)) if a >= 0 else None
                stat = "adopted"
                if rs is None or not rs.up:
                    return self._drop(_K_IKE, DropReason.UNKNOWN_IKE_SA, svc)
            refused = self._refuse_new(c.src, now)
            if refused:
                return self._drop(_K_IKE, refused, svc)
            try:
                s = t.create(svc.id, c.src, c.sport, c.spi_i, rs.id, now, natt=c.natt)
            except TableFull:
                return self._drop(_K_IKE, DropReason.TABLE_FULL, svc)
            t.establish(s, c.spi_r, now)
            self.stats[stat] += 1
            self.rs_counters[rs.id][RS_CONNS] += 1
            return self._forward(svc, _K_IKE, rs)
        rs = self._servers.get(t.rs_of(s))
        if rs is None:
            return self._drop(_K_IKE, DropReason.REAL_SERVER_GONE, svc)
        if t.state_of(s) == _INIT and (self._rs_method[rs.id] == Method.NAT or svc.return_path == "director"):
            # anti-spoofing: the responder cookie must be the one the real server sent us (its
            # replies pass the director: NAT, or DR/TUN with the return path through the director)
            if t.server_spi_r(s) != c.spi_r:
                return self._drop(_K_IKE, DropReason.RESPONDER_SPI_MISMATCH, svc)
        t.establish(s, c.spi_r, now)  # refreshes an ESTABLISHED entry too
        self._follow_port(t, s, c, now)
        return self._forward(svc, _K_IKE, rs)

    def _labelled(self, svc: Service, rs_id: int | None) -> RealServer | None:
        """The service's real server a label named (None: no label, or a server gone since).
        Its health does not matter: it holds the SA, no other server could take the packet."""
        return svc.servers.get(rs_id) if rs_id is not None else None

    def _names_a_server(self, svc: Service, spi: int) -> bool:
        """The service has SPI labels and this ESP SPI lies in one of its servers' ranges: the
        conversation is forwarded by its label (docs/fastpath.md), never held to the ingress limit
        of clients without an entry, in the kernel or here."""
        labels = self._labels.get(svc.id)
        return labels is not None and self._labelled(svc, labels.decode_esp(spi)) is not None

    def _label_esp(self, svc: Service, c, now: float) -> Verdict:
        """ESP (or ESP-in-UDP) with no entry: the real server whose inbound SPI range holds the
        SPI gets it, and an ESTABLISHED entry is made so what follows behaves as if the director
        had seen the IKE exchange (counters, persistence, the fast path's map)."""
        kind = c.kind
        rs = self._label_entry(svc, kind == _K_ESP_IN_UDP, c.src, c.sport, c.spi, now)
        if isinstance(rs, DropReason):
            return self._drop(kind, rs, svc, icmp=rs == DropReason.NO_ENTRY)
        return self._forward(svc, kind, rs)

    def _label_entry(self, svc: Service, natt: bool, src: int, sport: int, spi: int,
                     now: float) -> RealServer | DropReason:  # fmt: skip
        """The ESTABLISHED entry of a labelled ESP SPI's conversation (made or moved): its real
        server, or why not (NO_ENTRY: the SPI names no server of the service; admission; table full)."""
        rs = self._labelled(svc, self._labels[svc.id].decode_esp(spi))
        if rs is None:
            return DropReason.NO_ENTRY
        refused = self._refuse_new(src, now)
        if refused:
            return refused
        t = self.table
        s = t.lookup(svc.id, src, 0)  # keyed by cookie 0: the director never saw the IKE SPIs
        if s >= 0:  # an earlier label-steered entry of this client (another NAT-T port, or a server change)
            if t.rs_of(s) != rs.id:
                t.move(s, rs.id)
            if sport != t.port_of(s):
                t.set_port(s, sport, now)
            if natt:
                t.mark_natt(s)
            t.establish(s, 0, now)
            return rs
        try:
            s = t.create(svc.id, src, sport, 0, rs.id, now, natt=natt)
        except TableFull:
            return DropReason.TABLE_FULL
        t.establish(s, 0, now)
        self.stats["label_steered"] += 1
        self.rs_counters[rs.id][RS_CONNS] += 1
        return rs

    # -- SPI labels in the eBPF fast path (director/dataplane/ebpf.py) ---------------------------
    def spi_labels(self, svc_id: int) -> SpiLabels | None:
        """The service's SPI label decoder (None: the service has no labels)."""
        return self._labels.get(svc_id)

    def label_forwarded(self, vip: int, client: int, port: int, spi: int, now: float) -> int | DropReason | None:
        """The fast path forwarded labelled ESP (``port`` 0) or ESP-in-UDP (from ``port``) of a
        client it had no entry for: make the ESTABLISHED entry, as the slow path does for such a
        packet (``_label_esp``: the same decode, admission limits and counters; the packet itself
        was counted by the kernel). Returns the real server id of the entry made or moved, None
        if the client already has an ESTABLISHED entry (or the service is gone, or has no labels
        now), or the DropReason that refused it."""
        svc = self._by_vip.get(vip)
        if svc is None or svc.id not in self._labels:
            return None
        t = self.table
        if port:
            s, saw_init = t.established_of_natt(svc.id, client, port)
            if saw_init:  # an IKE exchange in progress: its entry decides, not the label
                return None
        else:
            s, _ = t.established_of_client(svc.id, client)
        if s >= 0:
            return None
        rs = self._label_entry(svc, bool(port), client, port, spi, now)
        return rs if isinstance(rs, DropReason) else rs.id

    def _ingress_refused(self, svc: Service, cls: int, source: int, now: float) -> DropReason | None:
        """The service's ingress limit for this class and source (None: within it, or no limit).
        IPv6 sources always: the eBPF programs do not judge IPv6 (docs/ipv6.md)."""
        ing = self._ingress.get(svc.id) if self.ingress_in_core or source >> 32 else None
        return ing.refused(cls, source, int(now * 1e9)) if ing is not None else None

    def _refuse_new(self, source: int, now: float) -> DropReason | None:
        """Per-source limit first (a spoofer's excess costs nobody else), then the global one;
        the reason names the limit that refused (None: admitted)."""
        if self._source_limit is not None and not self._source_limit.take(source, now):
            return DropReason.SOURCE_RATE_LIMITED
        if self._new_limit is not None and not self._new_limit.take(now):
            return DropReason.RATE_LIMITED
        return None

    @staticmethod
    def _follow_port(t: Table, s: int, c, now: float) -> None:
        if c.sport != t.port_of(s):
            t.set_port(s, c.sport, now)
        if c.natt:
            t.mark_natt(s)

    def _affinity_slot(self, svc: Service, c) -> int:
        """The client's newest live entry at the service's affinity granularity."""
        if svc.affinity == "ip-port":
            return self.table.natt_head(svc.id, c.src, c.sport)
        if svc.affinity_prefix:
            return self._prefixes.newest(svc.id, svc.prefix_of(c.src))
        return self.table.client_head(svc.id, c.src)

    def _reschedule(self, svc: Service, c, s: int, stat: str, exclude: int = NO_RS) -> RealServer | None:
        rs = svc.scheduler.pick(c.src, c.dst, c.sport)
        if rs is None or rs.id == exclude:
            others = [r for r in svc.servers.values() if r.available and r.id != exclude]
            rs = min(others, key=lambda r: (r.active * 256 + r.inactive) / r.weight, default=None)
        if rs is not None:
            self.table.move(s, rs.id)
            self.stats[stat] += 1
            self.rs_counters[rs.id][RS_CONNS] += 1
        return rs

    def _forward_entry(self, svc: Service, kind: Kind, s: int, now: float | None) -> Verdict:
        rs = self._servers.get(self.table.rs_of(s))
        if rs is None:
            return self._drop(kind, DropReason.REAL_SERVER_GONE, svc)
        if now is not None:
            self.table.touch(s, now)
        return self._forward(svc, kind, rs)

    def _forward(self, svc: Service, kind: Kind, rs: RealServer) -> Verdict:
        self.stats["forwarded"] += 1
        return _new(Verdict, (_FORWARD, kind, 0, svc.id, rs.id, rs.addr, self._rs_method[rs.id], False))

    def _drop(self, kind: Kind, reason: DropReason, svc: Service, *, icmp: bool = False) -> Verdict:
        self.drops[reason] += 1
        if icmp:
            self.stats["icmp_unreach"] += 1
            return _new(Verdict, (_ICMP, kind, reason, svc.id, NO_RS, 0, Method.DR, False))
        return _new(Verdict, (_DROP, kind, reason, svc.id, NO_RS, 0, Method.DR, False))

    def decide_reply(self, data: bytes, now: float, sender: int = NO_RS) -> Verdict:
        """Real server -> client. NAT mode: record the responder SPI, rewrite the source to the VIP.
        From a VIP whose service has ``return_path = "director"`` (DR/TUN): see ``_return``;
        ``sender`` is the real server the packet came from by its link-layer address (NO_RS: no
        real server's), as the dataplane knows it."""
        try:
            c = classify(data, reply=True)
        except PacketError as e:
            self.drops[e.reason] += 1
            return Verdict(Action.DROP, Kind.NOT_OURS, e.reason)
        rsvc = self._by_vip.get(c.src)
        if rsvc is not None and rsvc.return_path == "director":
            return self._return(rsvc, c, sender)
        pairs = self._nat_by_addr.get(c.src)
        if not pairs or c.kind == Kind.NOT_OURS or c.kind == Kind.FRAGMENT:
            self.stats["passed"] += 1
            return _PASS[c.kind]
        svc, rs = pairs[0]
        if c.kind == Kind.IKE or c.kind == Kind.IKE_INITIAL:
            for svc_i, rs_i in pairs:
                s = self.table.lookup(svc_i.id, c.dst, c.spi_i)
                if s >= 0 and self.table.rs_of(s) == rs_i.id:
                    svc, rs = svc_i, rs_i
                    self.table.record_reply(s, c.spi_r)
                    break
        self.stats["replies"] += 1
        r = self.rs_counters[rs.id]
        j = (NK + c.kind) * 2
        r[j] += 1
        r[j + 1] += c.wire_len
        return Verdict(Action.FORWARD, c.kind, 0, svc.id, rs.id, svc.vip, Method.NAT, True)

    # -- the return path through the director (DR/TUN, return_path = "director") ---------------
    def _return(self, svc: Service, c, sender: int) -> Verdict:
        """A packet with the VIP as source from the server side: forwarded to the client (``reply``,
        method DR/TUN: the dataplane sends it on unchanged but for the TTL) only if it belongs to a
        conversation of that client held by ``sender``; anything else is dropped (anti-spoofing).
        IKE answering an entry records the responder SPI (the entry is "answered", and its client
        must echo that SPI to become ESTABLISHED); IKE of another IKE SA of the client (a rekeyed
        one, new SPIs) passes if the client's newest entry is on ``sender``."""
        kind = c.kind
        t = self.table
        client = c.dst
        s = NO_SLOT
        spi_r = -1
        if kind == _K_IKE or kind == _K_IKE_INITIAL:
            s = t.lookup(svc.id, client, c.spi_i)
            if s >= 0:
                spi_r = c.spi_r
            else:
                s = t.natt_head(svc.id, client, c.dport)
                if s < 0:
                    s = t.client_head(svc.id, client)
        elif kind == _K_ESP or kind == _K_AH:
            s, _ = t.established_of_client(svc.id, client)
        elif kind == _K_ESP_IN_UDP:
            s, _ = t.established_of_natt(svc.id, client, c.dport)
        elif kind == Kind.NATT_KEEPALIVE:
            s = t.natt_head(svc.id, client, c.dport)
        else:
            return self._drop(kind, DropReason.RETURN_NOT_IPSEC, svc)
        if s < 0:
            return self._drop(kind, DropReason.RETURN_NO_CONVERSATION, svc)
        rs_id = t.rs_of(s)
        if rs_id != sender or rs_id not in self._servers:
            return self._drop(kind, DropReason.RETURN_WRONG_SERVER, svc)
        if spi_r >= 0:
            t.record_reply(s, spi_r)
        self.stats["replies"] += 1
        r = self.rs_counters[rs_id]
        j = (NK + kind) * 2
        r[j] += 1
        r[j + 1] += c.wire_len
        return _new(Verdict, (_FORWARD, kind, 0, svc.id, rs_id, client, self._rs_method[rs_id], True))

    def expire(self, now: float) -> int:
        return self.table.expire(now)

    def zero_counters(self, svc_id: int | None = None) -> None:
        """ipvsadm -Z: the packet, byte and connection counters of one service (or all)."""
        for sid, svc in self.services.items():
            if svc_id is not None and sid != svc_id:
                continue
            self.svc_counters[sid] = array("Q", [0]) * SVC_COUNTERS
            for rs_id in svc.servers:
                self.rs_counters[rs_id] = array("Q", [0]) * RS_COUNTERS
