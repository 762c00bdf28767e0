"""Never queue (IPVS ``nq``): the first available idle server (active == 0), else ``sed``.

An idle server is taken whatever its weight, so a slow server is never left idle while others
queue; when every available server is busy the choice is shortest expected delay.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register
from director.schedulers.sed import sed_overhead
from director.schedulers.wlc import least_weighted


@register
class NeverQueueScheduler(Scheduler):
    name = "nq"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        for s in self._servers:
            if s.active == 0 and s.available:
                return s
        return least_weighted(self._servers, sed_overhead)
