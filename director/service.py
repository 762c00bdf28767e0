"""Virtual services and their settings: what an operator configures per VIP. Pure data + checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from director.forwarding.method import AH_ACROSS_NAT, Method, ah_across_nat
from director.health import HealthConfig
from director.isakmp_state import Timeouts
from director.schedulers import RealServer, Scheduler, make_scheduler


__all__ = ["AFFINITY", "RETURN_PATHS", "ConfigError", "Method", "Service"]

AFFINITY = ("ip", "ip-port")
RETURN_PATHS = ("direct", "director")  # DR/TUN replies: straight to the client, or through the director


class ConfigError(ValueError):
    """A bad setting; the message names the field."""


@dataclass(slots=True, eq=False)
class Service:
    """One IPsec virtual service: UDP 500, UDP 4500, ESP and AH of one VIP.

    ``affinity`` is the persistence granularity: ``ip`` sends all conversations of a client IP to
    one real server; ``ip-port`` tells apart many clients behind one NAT by their NAT-T port.
    ``affinity_prefix`` widens ``ip`` to a prefix, as ipvsadm's ``-M``: every client in one /N
    follows the newest live conversation of that prefix (0: the whole address).
    ``retransmit_threshold`` is the passive health signal: an initial packet repeated this many
    times without an answer reschedules the conversation (0 disables it).
    ``expire_quiescent`` (IPVS's expire_quiescent_template, per service here): a client whose live
    state is on a quiesced (weight 0) server has its next new conversation scheduled afresh instead
    of following that state; its live conversations stay where they are.
    """

    id: int
    vip: int
    scheduler_name: str = "wlc"
    method: Method = Method.DR
    timeouts: Timeouts = field(default_factory=Timeouts)
    affinity: str = "ip"
    affinity_prefix: int = 0  # "ip" affinity per /N instead of per address (0: the whole address)
    ah: bool = True
    retransmit_threshold: int = 3
    soft_limit: int = 0
    soft_grace: float = 0.0
    expire_quiescent: bool = False
    scheduler_options: dict = field(default_factory=dict)
    health: HealthConfig | None = None  # None: no probes (servers stay up unless marked)
    # SPI labels (director/spi_label.py): (mask, ((server address, label, esp_min, esp_max), ...)) or ()
    spi_label: tuple = ()
    # per-source ingress limits (director/ingress.py): (esp_pps, ah_pps, ike_pps, burst) or () = none
    ingress: tuple = ()
    # "director": DR/TUN servers' replies come back through the director (their default route), which
    # forwards those of known conversations from their own server and validates conversations by them
    return_path: str = "direct"
    servers: dict[int, RealServer] = field(default_factory=dict)
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 0xFFFE:
            raise ConfigError(f"service.id: must be 0..65534, got {self.id}")
        if not 0 < self.vip < 1 << 128:
            raise ConfigError(f"service.vip: not an IPv4 or IPv6 address: {self.vip}")
        for rs in self.servers.values():
            self.check_family(rs)
        if self.return_path not in RETURN_PATHS:
            raise ConfigError(f"service.return_path: must be one of {', '.join(RETURN_PATHS)}, got '{self.return_path}'")
        if self.affinity not in AFFINITY:
            raise ConfigError(f"service.affinity: must be one of {', '.join(AFFINITY)}, got '{self.affinity}'")
        bits = 32 if self.vip >> 32 == 0 else 128
        if not 0 <= self.affinity_prefix <= bits:
            raise ConfigError(f"service.affinity_prefix: must be 0..{bits}, got {self.affinity_prefix}")
        if self.affinity_prefix and self.affinity != "ip":
            raise ConfigError('service.affinity_prefix: only with affinity = "ip"')
        if self.retransmit_threshold < 0 or self.retransmit_threshold > 255:
            raise ConfigError(f"service.retransmit_threshold: must be 0..255, got {self.retransmit_threshold}")
        try:
            self.scheduler = make_scheduler(self.scheduler_name, **self.scheduler_options)
        except ValueError as e:
            raise ConfigError(f"service.scheduler: {e}") from None
        self.check_ah()
        self.scheduler.update(list(self.servers.values()))

    def prefix_of(self, client: int) -> int:
        """The client's affinity group: its address shifted right past the host bits (``affinity_prefix``)."""
        return client >> ((32 if self.vip >> 32 == 0 else 128) - self.affinity_prefix)

    def check_family(self, rs: RealServer) -> None:
        """A service is one address family: its real servers are of its VIP's (DR, NAT66 and the
        IPv6 envelope all need an IPv6 real server; IPv6-in-IPv4 is not built, see docs/ipv6.md)."""
        if (rs.addr >> 32 == 0) != (self.vip >> 32 == 0):
            raise ConfigError(f"server.address: real server {rs.id} is not of the VIP's address family")

    def check_ah(self, extra: RealServer | None = None) -> None:
        """The AH/NAT rule (forwarding.method) over the servers, and ``extra`` about to join."""
        servers = [*self.servers.values(), *([extra] if extra is not None else [])]
        where = ah_across_nat(self.ah, self.method, (rs.method for rs in servers))
        if where is not None:
            raise ConfigError(f"service.ah: {AH_ACROSS_NAT}" if where < 0 else f"server.method: {AH_ACROSS_NAT}")

    def method_of(self, rs: RealServer) -> Method:
        return self.method if rs.method is None else rs.method

    def refresh_scheduler(self) -> None:
        """Call after membership, weight or up/down changes."""
        self.scheduler.update(list(self.servers.values()))
