"""Weighted round robin (``wrr``), smooth (nginx's) rather than IPVS's gcd/max-weight sequence.

Both give every server exactly ``weight`` picks per cycle of sum(weights) picks; they differ in
order. IPVS's sequence (lower a bar by gcd from the max weight, take each server at or above it)
gives the heaviest server a run of picks at the start of each cycle: 5:1:1 gives A A A A A B C.
Smooth WRR interleaves: 5:1:1 gives A A B A C A A, so a reconnect storm after a failover is not
dealt out to one gateway in bursts. Each pick: every available server's current weight grows by
its weight, the largest wins (ties: first in list) and loses the sum. Unavailable servers sit the
pick out with their current weight frozen, so the others keep exact ratios among themselves.
O(n) per pick, like IPVS's worst case.
"""

from __future__ import annotations

from director.schedulers.base import RealServer, Scheduler, register


@register
class WeightedRoundRobinScheduler(Scheduler):
    name = "wrr"

    def __init__(self) -> None:
        super().__init__()
        self._current: list[int] = []

    def _rebuild(self) -> None:
        # A new weight set starts a new cycle, as IPVS's wrr resets its position on any change.
        self._current = [0] * len(self._servers)

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        current = self._current
        best = -1
        total = 0
        for i, s in enumerate(self._servers):
            if not s.available:
                continue
            current[i] += s.weight
            total += s.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self._servers[best]
