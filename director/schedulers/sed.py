"""Shortest expected delay (IPVS ``sed``): least (active + 1) / weight among available servers.

The +1 counts the client being scheduled: its expected delay on a server is the queue it joins.
INIT entries are not counted (as in ip_vs_sed). Compared by cross-multiplication, like ``wlc``.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register
from director.schedulers.wlc import least_weighted


def sed_overhead(server: RealServer) -> int:
    return server.active + 1


@register
class ShortestExpectedDelayScheduler(Scheduler):
    name = "sed"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        return least_weighted(self._servers, sed_overhead)
