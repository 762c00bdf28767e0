"""The ingress limiter's bound (docs/operations.md, "Ingress limits"): over ANY interval of length t a
source gets at most burst + pps * t packets through, whatever the arrival times; and while it
sends faster than that it is never starved below the rate."""

from hypothesis import given, settings
from hypothesis import strategies as st

from director.ingress import IDLE_NS, NS, SourceLimiter

SRC = 0xCB007101


@settings(max_examples=300, deadline=None)
@given(
    pps=st.integers(1, 2000),
    burst=st.integers(1, 100),
    gaps=st.lists(st.integers(0, 3 * NS // 2), min_size=1, max_size=300),
)
def test_never_more_than_rate_times_t_plus_burst_in_any_window(pps, burst, gaps):
    lim = SourceLimiter(pps, burst * NS, slots=2, key=0)
    now, passed = 0, []
    for g in gaps:
        now += g
        if lim.take(SRC, now):
            passed.append(now)
    # every window [passed[i], passed[j]] holds j - i + 1 admitted packets
    for i in range(len(passed)):
        for j in range(i, len(passed)):
            t = passed[j] - passed[i]
            assert (j - i + 1) * NS <= burst * NS + t * pps, (i, j, t)


@settings(max_examples=200, deadline=None)
@given(pps=st.integers(1, 1000), burst=st.integers(2, 50), seconds=st.integers(1, 5))
def test_a_steady_flood_gets_exactly_burst_plus_rate(pps, burst, seconds):
    """burst + 2 packets every 1/(4 pps) s for ``seconds`` (the bucket is emptied at every step):
    it admits the burst at once, then one per 1/pps s: burst + floor(pps * t) in all, to the packet.
    (burst >= 2: what a step leaves, under 1.25 packets, never reaches the cap, so none is lost to it;
    with burst 1 the cap clips a fraction now and then and the count is lower, never higher.)"""
    lim = SourceLimiter(pps, burst * NS, slots=2, key=0)
    step = NS // (4 * pps)
    end = seconds * NS
    n = sum(lim.take(SRC, t) for t in range(0, end + 1, step) for _ in range(burst + 2))
    last = (end // step) * step
    assert n == burst + (last * pps) // NS


def test_idle_refill_never_exceeds_the_burst():
    lim = SourceLimiter(1, 5 * NS, slots=2, key=0)
    for t in (0, IDLE_NS, 5 * IDLE_NS):
        assert sum(lim.take(SRC, t) for _ in range(20)) == 5
