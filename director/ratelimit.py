"""A token bucket with injected time (pure): how many of something per second, with a burst."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "_tokens", "_last", "denied")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate < 0:
            raise ValueError(f"rate: must be >= 0, got {rate}")
        self.rate = rate
        # rate 0 means none at all (not one per start): no burst either
        self.burst = burst if burst is not None else (max(rate, 1.0) if rate > 0 else 0.0)
        self._tokens = self.burst
        self._last = now
        self.denied = 0

    def take(self, now: float, n: float = 1.0) -> bool:
        """True (and spend ``n``) when allowed at ``now``; counts refusals in ``denied``."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        self.denied += 1
        return False
