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


class SourceBuckets:
    """Per-source token buckets in fixed memory: ``slots`` buckets, a source hashed to one.

    A spoofed flood from a million addresses cannot grow this (two arrays of ``slots`` doubles);
    sources that collide share a bucket, which only ever makes the limit stricter for them.
    The hash is keyed per process (CPython's SipHash on bytes), so collisions cannot be aimed.
    An IPv6 source is one /64 prefix (a subscriber's, RFC 6177), so rotating through its own
    addresses gives an attacker nothing.
    """

    __slots__ = ("rate", "burst", "mask", "_tokens", "_last", "denied")

    def __init__(self, rate: float, burst: float | None = None, slots: int = 65536) -> None:
        from array import array

        if rate <= 0:
            raise ValueError(f"rate: must be > 0, got {rate}")
        if slots & (slots - 1):
            raise ValueError(f"slots: must be a power of two, got {slots}")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.mask = slots - 1
        self._tokens = array("d", [self.burst]) * slots
        self._last = array("d", [0.0]) * slots
        self.denied = 0

    def take(self, source: int, now: float) -> bool:
        # an IPv6 source counts by its /64: one subscriber's prefix, not 2**64 separate sources
        i = hash(source.to_bytes(4, "big") if source >> 32 == 0 else (source >> 64).to_bytes(8, "big")) & self.mask
        tokens = min(self.burst, self._tokens[i] + (now - self._last[i]) * self.rate)
        self._last[i] = now
        if tokens >= 1.0:
            self._tokens[i] = tokens - 1.0
            return True
        self._tokens[i] = tokens
        self.denied += 1
        return False
