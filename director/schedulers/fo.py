"""Weighted failover (IPVS ``fo``): every new client to the available server of highest weight.

The weights rank the servers instead of sharing the load: the heaviest available server takes
every new conversation, the next heaviest only once it is down, quiesced (weight 0) or over its
``-x`` threshold. Ties go to the earlier server in the list, as in ip_vs_fo (strictly greater
weight wins). Use it for an active/standby pair of gateways: weight 2 on the active one, 1 on
the standby.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register


@register
class WeightedFailoverScheduler(Scheduler):
    name = "fo"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        best: RealServer | None = None
        for s in self._servers:
            if s.available and (best is None or s.weight > best.weight):
                best = s
        return best
