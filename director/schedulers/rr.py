"""Round robin (IPVS ``rr``): available servers in turn, ignoring weights and load."""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register


@register
class RoundRobinScheduler(Scheduler):
    """Like ip_vs_rr: resume after the last server chosen, skip unavailable ones.

    The position survives ``update()``: it resumes after the last chosen server if that server is
    still in the list, so a weight change elsewhere does not hand the first server an extra client.
    """

    name = "rr"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0
        self._last: RealServer | None = None

    def _rebuild(self) -> None:
        servers = self._servers
        if self._last is not None:
            for i, s in enumerate(servers):
                if s is self._last:
                    self._next = i + 1
                    break
        self._next = self._next % len(servers) if servers else 0

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        servers = self._servers
        n = len(servers)
        for k in range(n):
            i = (self._next + k) % n
            s = servers[i]
            if s.available:
                self._next = (i + 1) % n
                self._last = s
                return s
        return None
