"""Admission of initial IKE packets before the queue (director_tc and director_xdp alike).

The daemon writes ``admit`` from daemon.new_entries_rate and daemon.new_entries_per_source; the
programs let at most per_window initial IKE packets per window_ns and per_source per source and
second through to the stack, and drop the rest as RATE_LIMITED (the global limit) or
SOURCE_RATE_LIMITED (a source's), counted like every drop. Non-initial
IKE, ESP and NAT-keepalives are never limited. Windows are real time (bpf_ktime_get_ns, the clock
of time.monotonic_ns): a run that straddles a window boundary is repeated, so the counts are exact.
"""

from __future__ import annotations

import time

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, delta
from director.dataplane import bpf_structs as S
from director.drop_reasons import DropReason as R
from director.lab import craft
from director.packet import Kind as K
from fastpath_cases import C_DR, C_NAT, VIP, esp_dr, eth, setup_maps

PASS = {"tc": TC_ACT_OK, "xdp": XDP_PASS}
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}
LIMITED = f"drops[{int(R.RATE_LIMITED)}]"
SOURCE_LIMITED = f"drops[{int(R.SOURCE_RATE_LIMITED)}]"
INITIAL = f"pass_packets[{int(K.IKE_INITIAL)}]"


def verdicts(world, prog: str, frames: list[bytes], window_ns: int) -> tuple[list[int], dict]:
    """Run every frame, all inside one window (else again, at most 5 times)."""
    for _ in range(5):
        setup_maps(world)
        world.put("admit", S.u32(0), world._admit)
        before = world.stats()
        t0 = time.monotonic_ns()
        rets = [world.run(prog, f).retval for f in frames]
        t1 = time.monotonic_ns()
        if t0 // window_ns == t1 // window_ns:
            return rets, delta(before, world.stats())
    pytest.fail("could not run the frames inside one admission window five times in a row")


def initial(src: int, spi: int) -> bytes:
    return eth(craft.ike(src, VIP, spi))


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_global_limit_per_window_and_nothing_else_limited(world, prog):
    world._admit = S.ADMIT.struct.pack(5, 0, 100_000_000, 0, 0)  # 5 per 100 ms window
    frames = [initial(C_DR + i, 0x100 + i) for i in range(8)]
    frames += [eth(craft.ike(C_DR, VIP, 0x100, 0x200)), eth(esp_dr)]  # non-initial IKE, ESP: never limited
    rets, d = verdicts(world, prog, frames, 100_000_000)
    assert rets[:8] == [PASS[prog]] * 5 + [DROP[prog]] * 3
    assert rets[8] == PASS[prog] and rets[9] != DROP[prog]
    assert d[INITIAL] == 5 and d[LIMITED] == 3, d


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_per_source_limit_leaves_other_sources_alone(world, prog):
    world._admit = S.admit(0, 2)  # no global limit; 2 per source and second
    frames = [initial(C_DR, 0x300 + i) for i in range(4)] + [initial(C_NAT, 0x400 + i) for i in range(2)]
    rets, d = verdicts(world, prog, frames, 1_000_000_000)
    assert rets == [PASS[prog]] * 2 + [DROP[prog]] * 2 + [PASS[prog]] * 2
    assert d[INITIAL] == 4 and d[SOURCE_LIMITED] == 2 and LIMITED not in d, d
    assert S.ADMIT_SRC.struct.unpack(world.get("admit_src", S.addr(C_DR)))[1] == 4  # counted, also the refused


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_no_limits_admits_everything(world, prog):
    world._admit = S.admit(0, 0)
    rets, d = verdicts(world, prog, [initial(C_DR, 0x500 + i) for i in range(50)], 100_000_000)
    assert rets == [PASS[prog]] * 50 and d == {INITIAL: 50}
    assert world.get("admit_src", S.addr(C_DR)) is None  # no state kept when off


def test_admit_value_picks_short_windows_of_at_least_eight_packets():
    assert S.admit_window(20_000) == (20, 1_000_000)  # 1 ms windows: an even stream, not bursts
    assert S.admit_window(1_000) == (8, 8_000_000)
    assert S.admit_window(50) == (8, 160_000_000)
    assert S.admit_window(0.5) == (8, 16_000_000_000)
    assert S.admit_window(1e7) == (10_000, 1_000_000)  # never below 1 ms
    assert S.admit_window(0) == (0, 0)
    for rate in (0.5, 50, 1_000, 20_000, 123_456):  # the long-run rate is the configured one
        per_window, window_ns = S.admit_window(rate)
        assert abs(per_window * 1e9 / window_ns - rate) <= 0.01 * rate
    assert S.unpack_admit(S.admit(20_000, 2.2)) == (20, 3, 1_000_000, 0, 0)  # per source rounds up
    assert S.unpack_admit(S.admit(0, 0)) == (0, 0, 0, 0, 0)
