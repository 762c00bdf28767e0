"""Weighted overflow (IPVS ``ovf``): the heaviest server until its active conversations exceed
its weight, then the next heaviest.

Here the weight is a capacity in ESTABLISHED conversations: a server is skipped while
``active > weight`` (so, as in ip_vs_ovf, it takes its last client at ``active == weight`` and
ends with weight + 1), or while it is unavailable (down, quiesced, over ``-x``). Among the others
the highest weight wins, ties to the earlier server in the list. When every server is over its
weight there is no server: size the weights so that overflow has somewhere to go, or put a
last-resort server with a large weight at the end of the ranking. INIT entries do not count (as
in IPVS, which counts activeconns only): a burst of IKE_SA_INITs can overshoot a server's weight
before the first of them turns ESTABLISHED.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register


@register
class WeightedOverflowScheduler(Scheduler):
    name = "ovf"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        best: RealServer | None = None
        for s in self._servers:
            if not s.available or s.active > s.weight:
                continue
            if best is None or s.weight > best.weight:
                best = s
        return best
