"""Virtual services and their settings: what an operator configures per VIP. Pure data + checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from director.health import HealthConfig
from director.isakmp_state import Timeouts
from director.schedulers import RealServer, Scheduler, make_scheduler


class Method(IntEnum):
    """Forwarding method, as ipvsadm's -g / -i / -m. The numbers are mirrored in BPF maps."""

    DR = 0
    TUN = 1
    NAT = 2

    @classmethod
    def parse(cls, text: str) -> "Method":
        try:
            return {"dr": cls.DR, "g": cls.DR, "tun": cls.TUN, "i": cls.TUN, "nat": cls.NAT, "m": cls.NAT}[
                text.lower()
            ]
        except KeyError:
            raise ValueError(f"method: unknown forwarding method '{text}' (dr, tun, nat)") from None


AFFINITY = ("ip", "ip-port")


class ConfigError(ValueError):
    """A bad setting; the message names the field."""


@dataclass(slots=True, eq=False)
class Service:
    """One IPsec virtual service: UDP 500, UDP 4500, ESP and AH of one VIP.

    ``affinity`` is the persistence granularity: ``ip`` sends all conversations of a client IP to
    one real server; ``ip-port`` tells apart many clients behind one NAT by their NAT-T port.
    ``retransmit_threshold`` is the passive health signal: an initial packet repeated this many
    times without an answer reschedules the conversation (0 disables it).
    """

    id: int
    vip: int
    scheduler_name: str = "wlc"
    method: Method = Method.DR
    timeouts: Timeouts = field(default_factory=Timeouts)
    affinity: str = "ip"
    ah: bool = True
    retransmit_threshold: int = 3
    soft_limit: int = 0
    soft_grace: float = 0.0
    scheduler_options: dict = field(default_factory=dict)
    health: HealthConfig | None = None  # None: no probes (servers stay up unless marked)
    servers: dict[int, RealServer] = field(default_factory=dict)
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 0xFFFE:
            raise ConfigError(f"service.id: must be 0..65534, got {self.id}")
        if not 0 < self.vip <= 0xFFFFFFFF:
            raise ConfigError(f"service.vip: not an IPv4 address: {self.vip}")
        if self.affinity not in AFFINITY:
            raise ConfigError(f"service.affinity: must be one of {', '.join(AFFINITY)}, got '{self.affinity}'")
        if self.retransmit_threshold < 0 or self.retransmit_threshold > 255:
            raise ConfigError(f"service.retransmit_threshold: must be 0..255, got {self.retransmit_threshold}")
        try:
            self.scheduler = make_scheduler(self.scheduler_name, **self.scheduler_options)
        except ValueError as e:
            raise ConfigError(f"service.scheduler: {e}") from None
        self.check_ah()
        self.scheduler.update(list(self.servers.values()))

    def check_ah(self) -> None:
        """AH authenticates the IP addresses, so it cannot cross a NAT (RFC 4302 / RFC 3715)."""
        if not self.ah:
            return
        if self.method == Method.NAT:
            raise ConfigError("service.ah: AH cannot cross NAT; a NAT-mode service must not balance AH (ah = false, vpnadm --no-ah)")
        for rs in self.servers.values():
            if rs.method == "nat":
                raise ConfigError(
                    f"server.method: AH cannot cross NAT; real server {rs.id} is NAT in a service with ah = true"
                )

    def method_of(self, rs: RealServer) -> Method:
        return Method.parse(rs.method) if rs.method else self.method

    def refresh_scheduler(self) -> None:
        """Call after membership, weight or up/down changes."""
        self.scheduler.update(list(self.servers.values()))
