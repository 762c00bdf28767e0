"""Weighted least connections (IPVS ``wlc``): least overhead/weight.

Overhead = active*256 + inactive (ip_vs_dest_conn_overhead).

Ratios are compared by cross-multiplication, as ip_vs_wlc does, so there are no floats and no
rounding: dest beats least when overhead(least) * weight(dest) > overhead(dest) * weight(least).
Ties go to the earlier server in the list. ``least_weighted`` is shared with sed and nq, which are
the same search with another overhead.
"""

from __future__ import annotations

from typing import Callable, Sequence

from director.schedulers.base import RealServer, Scheduler, register


def conn_overhead(server: RealServer) -> int:
    """IPVS's ip_vs_dest_conn_overhead: an ESTABLISHED entry weighs 256 INIT entries."""
    return (server.active << 8) + server.inactive


def least_weighted(
    servers: Sequence[RealServer], overhead: Callable[[RealServer], int]
) -> RealServer | None:
    """The available server with the least overhead/weight (first wins ties), or None."""
    least: RealServer | None = None
    loh = 0
    for s in servers:
        if not s.available:
            continue
        doh = overhead(s)
        if least is None or loh * s.weight > doh * least.weight:
            least, loh = s, doh
    return least


@register
class WeightedLeastConnectionScheduler(Scheduler):
    name = "wlc"

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        return least_weighted(self._servers, conn_overhead)
