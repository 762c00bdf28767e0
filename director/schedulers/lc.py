"""Least connections (IPVS ``lc``): least active*256 + inactive among available servers.

Weights only gate availability (weight 0 = quiesced); they do not scale the load, see ``wlc``.
Ties go to the earlier server in the list, as in ip_vs_lc.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register
from director.schedulers.wlc import conn_overhead


@register
class LeastConnectionScheduler(Scheduler):
    name = "lc"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        least: RealServer | None = None
        loh = 0
        for s in self._servers:
            if not s.available:
                continue
            doh = conn_overhead(s)
            if least is None or doh < loh:
                least, loh = s, doh
        return least
