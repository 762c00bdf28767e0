"""Route health injection: which VIPs this director announces by BGP. Pure.

A director announces a VIP only while it can serve it: its dataplane is up, it is not shutting
down or drained (as a whole or for that VIP), and the service has at least one healthy real
server. Everything else withdraws the VIP, so the routers' ECMP stops sending its traffic here.
The decision is data (:class:`Announcement`, with the reason for each VIP withdrawn); the BGP
adapter (``director/dataplane/bgp.py``) applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Announcement", "DirectorState", "ServiceState", "Withdrawn", "decide"]


class Withdrawn(IntEnum):
    """Why a VIP is not announced (first reason that applies, in this order)."""

    SHUTDOWN = 1  # the director is stopping
    DATAPLANE_DOWN = 2  # the dataplane is not attached / not forwarding
    DIRECTOR_DRAINED = 3  # the operator drained the whole director
    SERVICE_DRAINED = 4  # the operator drained this VIP
    NO_HEALTHY_SERVER = 5  # every real server of every service on this VIP is down
    TABLE_SYNCING = 6  # shared state: the peers' snapshot is not in yet (a joining director)


@dataclass(frozen=True, slots=True)
class ServiceState:
    """One service as the announcement sees it (several services, e.g. UDP 500 and 4500, can share
    a VIP: the VIP is served while any of them has a healthy server)."""

    vip: str
    healthy_servers: int
    drained: bool = False

    def __post_init__(self) -> None:
        if self.healthy_servers < 0:
            raise ValueError(f"healthy_servers must be >= 0, not {self.healthy_servers}")


@dataclass(frozen=True, slots=True)
class DirectorState:
    dataplane_up: bool
    drained: bool = False
    shutting_down: bool = False
    table_synced: bool = True  # shared state: False until a peer's snapshot is applied (bounded wait)


@dataclass(frozen=True, slots=True)
class Announcement:
    announce: frozenset[str]
    withdrawn: dict[str, Withdrawn]  # every known VIP not announced, with its reason

    @property
    def known(self) -> frozenset[str]:
        return self.announce | frozenset(self.withdrawn)


def decide(director: DirectorState, services: list[ServiceState]) -> Announcement:
    """The VIPs to announce, and why each other known VIP is withdrawn."""
    by_vip: dict[str, list[ServiceState]] = {}
    for s in services:
        by_vip.setdefault(s.vip, []).append(s)
    announce: set[str] = set()
    withdrawn: dict[str, Withdrawn] = {}
    for vip, group in by_vip.items():
        if director.shutting_down:
            withdrawn[vip] = Withdrawn.SHUTDOWN
        elif not director.dataplane_up:
            withdrawn[vip] = Withdrawn.DATAPLANE_DOWN
        elif not director.table_synced:
            # a joining director announced before its peers' snapshot arrived would take clients
            # whose conversations it does not know yet
            withdrawn[vip] = Withdrawn.TABLE_SYNCING
        elif director.drained:
            withdrawn[vip] = Withdrawn.DIRECTOR_DRAINED
        elif any(s.drained for s in group):
            # A drain names the VIP: draining one of its services drains the address (routers
            # cannot steer per port).
            withdrawn[vip] = Withdrawn.SERVICE_DRAINED
        elif not any(s.healthy_servers > 0 for s in group):
            withdrawn[vip] = Withdrawn.NO_HEALTHY_SERVER
        else:
            announce.add(vip)
    return Announcement(frozenset(announce), withdrawn)
