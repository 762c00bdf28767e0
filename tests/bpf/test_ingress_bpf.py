"""Per-source ingress limits before the queue (ebpf/include/ingress.h), director_tc and director_xdp alike.

The daemon writes ``ingress_cfg`` (key: the VIP) from the service's ``ingress`` table; the programs
keep a token bucket per (VIP, source, class) in ``ingress_src`` and drop what exceeds it, counted
as INGRESS_ESP_LIMITED / INGRESS_AH_LIMITED / INGRESS_IKE_LIMITED. A `clients` hit is never limited.

Buckets refill in real time (bpf_ktime_get_ns): the tests use 1 packet per second, so a run of
frames well under a second admits exactly the burst; a run that took 0.5 s or more (a loaded
machine) is repeated, so the counts are exact.
"""

from __future__ import annotations

import time

import pytest

from bpf_world import TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, delta
from director.dataplane import bpf_structs as S
from director.drop_reasons import DropReason as R
from director.ingress import NS
from director.lab import craft
from director.packet import Kind as K
from fastpath_cases import C_DR, C_UNKNOWN, NATT_SPORT, VIP, VIP_NOAH, esp_dr, eth, setup_maps
from test_struct_layout import btf_structs

PASS = {"tc": TC_ACT_OK, "xdp": XDP_PASS}
DROP = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}
C2 = C_UNKNOWN + 1  # another source with no entry
ESP_LIMITED, AH_LIMITED, IKE_LIMITED = (f"drops[{int(r)}]" for r in (R.INGRESS_ESP_LIMITED, R.INGRESS_AH_LIMITED,
                                                                      R.INGRESS_IKE_LIMITED))


def run(world, prog: str, frames: list[bytes], ingress: dict[int, tuple]) -> tuple[list[int], dict]:
    """Every frame from fresh buckets, inside half a second (else again, at most 5 times)."""
    for _ in range(5):
        setup_maps(world)
        for vip, cfg in ingress.items():
            world.put("ingress_cfg", S.addr(vip), S.ingress_cfg(*cfg))
        before = world.stats()
        t0 = time.monotonic_ns()
        rets = [world.run(prog, f).retval for f in frames]
        if time.monotonic_ns() - t0 < NS // 2:
            return rets, delta(before, world.stats())
    pytest.fail("could not run the frames inside half a second five times in a row")


def esp(src: int, n: int = 1) -> bytes:
    return eth(craft.esp(src, VIP, 0x5000 + n))


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_esp_flood_without_entry_passes_the_burst_and_drops_the_rest(world, prog):
    frames = [esp(C_UNKNOWN, i) for i in range(12)] + [esp(C2)]
    rets, d = run(world, prog, frames, {VIP: (1, 0, 0, 5)})  # 1/s, burst 5
    assert rets == [PASS[prog]] * 5 + [DROP[prog]] * 7 + [PASS[prog]]  # the second source: its own bucket
    assert d == {f"pass_packets[{int(K.ESP)}]": 6, "miss": 6, ESP_LIMITED: 7}, d
    k = S.ingress_key(VIP, C_UNKNOWN, 0)
    tokens, last_ns = S.unpack_ingress_tb(world.get("ingress_src", k))
    assert tokens < NS and last_ns > 0  # less than a packet left


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_a_clients_hit_is_never_limited(world, prog):
    frames = [eth(esp_dr)] * 20 + [eth(craft.esp_in_udp(C_DR, VIP, 0x1000, sport=NATT_SPORT))] * 5
    rets, d = run(world, prog, frames, {VIP: (1, 1, 1, 1)})
    assert DROP[prog] not in rets and PASS[prog] not in rets  # all forwarded (redirect)
    assert ESP_LIMITED not in d and d[f"fwd_packets[{int(K.ESP)}]"] == 20, d


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_ike_limit_is_separate_from_the_esp_limit(world, prog):
    ike = [eth(craft.ike(C_UNKNOWN, VIP, 0x100 + i, 0x200 + i)) for i in range(4)]  # non-initial
    ike_initial = [eth(craft.ike(C_UNKNOWN, VIP, 0x300))]
    frames = [esp(C_UNKNOWN, i) for i in range(3)] + ike + ike_initial + [eth(craft.ike(C_DR, VIP, 0x400, 0x401))]
    rets, d = run(world, prog, frames, {VIP: (2, 0, 3, 0)})  # ESP 2/s, IKE 3/s, burst: one second each
    assert rets == [PASS[prog]] * 2 + [DROP[prog]] + [PASS[prog]] * 3 + [DROP[prog]] * 2 + [PASS[prog]]
    assert d[ESP_LIMITED] == 1 and d[IKE_LIMITED] == 2, d
    assert d[f"pass_packets[{int(K.IKE)}]"] == 4 and f"pass_packets[{int(K.IKE_INITIAL)}]" not in d, d


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_ah_and_esp_in_udp_classes(world, prog):
    ah = [eth(craft.ah(C_UNKNOWN, VIP, 0x7000))] * 3
    ah_noah = [eth(craft.ah(C_UNKNOWN, VIP_NOAH, 0x7000))] * 3  # a service without AH: the limit holds too
    natt = [eth(craft.esp_in_udp(C_UNKNOWN, VIP, 0x8000, sport=4500))] * 3  # the ESP class
    rets, d = run(world, prog, ah + ah_noah + natt, {VIP: (2, 1, 0, 0), VIP_NOAH: (0, 2, 0, 0)})
    assert rets == ([PASS[prog]] + [DROP[prog]] * 2) + ([PASS[prog]] * 2 + [DROP[prog]]) + (
        [PASS[prog]] * 2 + [DROP[prog]])
    assert d[AH_LIMITED] == 3 and d[ESP_LIMITED] == 1, d


@pytest.mark.parametrize("prog", ["tc", "xdp"])
def test_no_config_no_limit(world, prog):
    rets, d = run(world, prog, [esp(C_UNKNOWN, i) for i in range(50)], {VIP_NOAH: (1, 1, 1, 1)})  # another VIP
    assert rets == [PASS[prog]] * 50 and d == {f"pass_packets[{int(K.ESP)}]": 50, "miss": 50}, d


@pytest.mark.parametrize("obj", ["director_tc.o", "director_xdp.o"])
def test_ingress_structs_mirror_btf(obj):
    from bpf_world import TC_OBJ, XDP_OBJ

    c = btf_structs(TC_OBJ if obj == "director_tc.o" else XDP_OBJ)
    for layout in S.INGRESS_LAYOUTS.values():
        size, members = c[layout.name]
        assert layout.size == size and [(f.name, f.offset, f.size) for f in layout.fields] == members, layout.name
