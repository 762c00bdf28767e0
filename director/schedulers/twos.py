"""Weighted random two choices (IPVS ``twos``): two servers drawn at random in proportion to their
weights; the one with the lower connection overhead per weight (``wlc``'s measure) takes the client.

Mitzenmacher's power of two choices: one random draw spreads by weight but lets a server's load
drift by chance; comparing two draws keeps every server's load per weight close to the mean, with
two looks instead of a search over every server, and without ``wlc``'s determinism (every
director that sees the same counts picks the same least-loaded server). On a tie the first draw
stays. Draws are independent (both may be the same server).

The draws are uniform over [0, total weight): ip_vs_twos draws over [0, total] and so gives its
first server one extra share in total + 1, which is a large bias for small weights (weights 1:1:1
give the first server half the first draws). Only available servers (up, weight > 0, under ``-x``)
are drawn.

The random source is the constructor's ``rng`` (anything with ``randrange``, e.g. a seeded
``random.Random``); by default a private ``random.Random`` seeded by the system, never the
``random`` module's shared state. It is not a config option: tests inject it.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from typing import Protocol

from director.schedulers.base import RealServer, Scheduler, register
from director.schedulers.wlc import conn_overhead


class RandomSource(Protocol):
    def randrange(self, stop: int) -> int: ...


@register
class TwoChoicesScheduler(Scheduler):
    name = "twos"

    def __init__(self, rng: RandomSource | None = None) -> None:
        super().__init__()
        self.rng: RandomSource = rng if rng is not None else random.Random()

    def pick(self, client: int, vip: int, port: int = 0) -> RealServer | None:
        avail = []
        bounds = []  # cumulative weights: server i owns [bounds[i-1], bounds[i])
        total = 0
        for s in self._servers:
            if s.available:
                total += s.weight
                avail.append(s)
                bounds.append(total)
        if not avail:
            return None
        rng = self.rng
        a = avail[bisect_right(bounds, rng.randrange(total))]
        b = avail[bisect_right(bounds, rng.randrange(total))]
        # b wins only if strictly better: overhead(b)/weight(b) < overhead(a)/weight(a)
        if conn_overhead(a) * b.weight > conn_overhead(b) * a.weight:
            return b
        return a
