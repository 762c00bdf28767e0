"""Per-source ingress limits of one service (pure, clock injected): packets per second of ESP, AH and
IKE that may reach the decision, per client address, before anything else is looked at.

What is limited (docs/operations.md, "Ingress limits"): ESP (raw and ESP-in-UDP) and AH of a client
with no ESTABLISHED entry (in the kernel: a ``clients`` map miss), and IKE (UDP 500/4500, not ESP).
An established client's ESP never reaches a limiter.

The arithmetic is the eBPF programs' (ebpf/include/ingress.h), integer for integer: a token bucket
per source holding at most ``burst`` packets, refilled by ``pps`` per second, time in nanoseconds,
tokens in nano-packets (one packet costs ``NS``). A source seen for the first time starts full. A
source idle for ``IDLE_NS`` or more is full again (only ever the case anyway when ``burst`` is at
most 10 s of its rate; it bounds the products: ``IDLE_NS * PPS_MAX`` fits 64 bits). So over any
interval of length t a source gets at most ``burst + pps * t`` packets through.

Memory is fixed: ``slots`` buckets of two 64-bit integers, a source hashed to one (keyed per
instance, so collisions cannot be aimed from outside). Two sources that collide share a bucket:
only ever stricter for them. The kernel keeps exact per-source state in an LRU hash instead.
"""

from __future__ import annotations

import random
from array import array
from typing import NamedTuple

from director.drop_reasons import DropReason

NS = 1_000_000_000  # one packet, in nano-packets; one second, in nanoseconds
IDLE_NS = 10 * NS  # a source idle this long is full again
PPS_MAX = 1_000_000  # the config's bound on every rate and on burst
ESP, AH, IKE = 0, 1, 2  # the classes (ebpf/include/ingress.h: ING_ESP, ING_AH, ING_IKE)
REASONS = (DropReason.INGRESS_ESP_LIMITED, DropReason.INGRESS_AH_LIMITED, DropReason.INGRESS_IKE_LIMITED)
_MUL = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive addresses over the slots


class IngressConfig(NamedTuple):
    """A service's ``ingress`` table; 0 = no limit for that class, burst 0 = one second of the rate."""

    esp_pps: int = 0
    ah_pps: int = 0
    ike_pps: int = 0
    burst: int = 0

    def rate(self, cls: int) -> int:
        return self[cls]

    def capacity(self, cls: int) -> int:
        """The bucket's size in nano-packets: ``burst`` packets, or one second of the class's rate."""
        return (self.burst or self[cls]) * NS


class SourceLimiter:
    """One class's token buckets for every source of one service (``pps`` > 0)."""

    __slots__ = ("pps", "cap", "mask", "shift", "key", "_tokens", "_last", "_seen", "denied")

    def __init__(self, pps: int, cap: int, slots: int = 65536, key: int | None = None) -> None:
        if not 0 < pps <= PPS_MAX:
            raise ValueError(f"pps: must be 1..{PPS_MAX}, got {pps}")
        if not NS <= cap <= PPS_MAX * NS:
            raise ValueError(f"cap: must be 1..{PPS_MAX} packets, got {cap / NS}")
        if slots < 2 or slots & (slots - 1):
            raise ValueError(f"slots: must be a power of two >= 2, got {slots}")
        self.pps = pps
        self.cap = cap
        self.mask = slots - 1
        self.shift = 64 - slots.bit_length() + 1
        self.key = random.getrandbits(32) if key is None else key
        self._tokens = array("q", [0]) * slots
        self._last = array("q", [0]) * slots
        self._seen = bytearray(slots)  # 0: a slot no source has used yet (it starts full)
        self.denied = 0

    def slot(self, source: int) -> int:
        if source >> 32:  # IPv6: by the /64 prefix (one subscriber), as the eBPF side will
            source = source >> 64
        return (((source ^ self.key) * _MUL) & 0xFFFFFFFFFFFFFFFF) >> self.shift

    def take(self, source: int, now_ns: int) -> bool:
        """True when a packet from ``source`` at ``now_ns`` may pass (it spends one packet). An
        IPv6 source is limited by its /64 prefix: one subscriber holds all 2**64 of its addresses."""
        if source >> 32:
            source = source >> 64
        i = (((source ^ self.key) * _MUL) & 0xFFFFFFFFFFFFFFFF) >> self.shift
        if not self._seen[i]:
            self._seen[i] = 1
            self._tokens[i] = self.cap - NS
            self._last[i] = now_ns
            return True
        elapsed = now_ns - self._last[i]
        if elapsed >= IDLE_NS:
            tokens = self.cap
        else:
            tokens = self._tokens[i]
            if elapsed > 0:
                tokens = min(self.cap, tokens + elapsed * self.pps)
        if elapsed > 0:
            self._last[i] = now_ns
        if tokens < NS:
            self._tokens[i] = tokens
            self.denied += 1
            return False
        self._tokens[i] = tokens - NS
        return True


class ServiceIngress:
    """The limiters of one service by class (None: that class is not limited)."""

    __slots__ = ("config", "limiters")

    def __init__(self, config: IngressConfig, slots: int = 65536, key: int | None = None) -> None:
        self.config = config
        self.limiters = tuple(
            SourceLimiter(config[c], config.capacity(c), slots, key) if config[c] else None for c in (ESP, AH, IKE)
        )

    def refused(self, cls: int, source: int, now_ns: int) -> DropReason | None:
        """The drop reason when the class's limit refuses this packet, else None."""
        lim = self.limiters[cls]
        if lim is None or lim.take(source, now_ns):
            return None
        return REASONS[cls]
