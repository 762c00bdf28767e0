"""Route health injection for real: three directors' BIRDs announce the VIP over eBGP + BFD to a
BIRD router, which installs one three-way multipath route; a drain, a hung director, a killed one
and one whose link went down each remove exactly their nexthop within the documented bound, and a
restart (or the link back up) brings it back. The router spreads flows over every announcing
director (L4 hashing) or keeps a client on one (L3).

Times are printed (run with ``-s`` to see them) and asserted against docs/scale-out.md's bounds,
which are loose enough for a loaded 2-core machine and still tell BFD from a hold timer.
"""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest

import director.dataplane.bgp as bgp
from director.announce import DirectorState, ServiceState, Withdrawn
from director.lab.ecmp import BFD_INTERVAL_MS, BFD_MULTIPLIER, HOLD_TIME, EcmpLab
from director.lab.netns import cleanup, list_labs
from director.route_injection import RouteInjector


# Bounds from docs/scale-out.md (section "Bounds")
WITHDRAW_BOUND = 1.0  # a drain (BGP withdraw) or a dead process (TCP closes): measured in ms
BFD_BOUND = 1.0  # a hung director: BFD's 3 x 100 ms plus scheduling slack; a hold timer takes 9 s
REJOIN_BOUND = 30.0  # BGP session re-established and the route back (connect/error timers 1 s)


def wait(pred, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def make_ecmp(ecmp_prerequisites):
    """Factory: ``make_ecmp(**kw)`` -> an EcmpLab (not yet up), always torn down after the test."""
    labs: list[EcmpLab] = []

    def make(**kw) -> EcmpLab:
        labs.append(EcmpLab("dr", **kw))
        return labs[-1]

    yield make
    for lab in labs:
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


@pytest.fixture
def ecmp(make_ecmp) -> EcmpLab:
    return make_ecmp(directors=3).up()


def announce(lab: EcmpLab, role: str, on: bool) -> None:
    bird = lab.bird(role)
    bird.apply(bird.plan({lab.vip} if on else set(), {lab.vip}))


def test_three_directors_announce_drain_hang_die_and_return(ecmp: EcmpLab):
    lab = ecmp
    assert lab.sysctl("router", "net/ipv4/fib_multipath_hash_policy") == "1"
    everyone = lab.fabric_addrs(lab.director_roles)

    for role in lab.director_roles:
        announce(lab, role, True)
    t = lab.wait_nexthops(everyone, REJOIN_BOUND)
    print(f"\nall three announced: 3-way route after {t:.3f}s")
    assert lab.bird("router").sessions() == {d: "Established" for d in lab.director_roles}
    assert lab.bird("d1").sessions() == {"uplink": "Established"}
    assert lab.bird("d1").announcing() == {lab.vip}

    # drain d2: BGP withdraw; exactly its nexthop leaves
    t0 = time.monotonic()
    announce(lab, "d2", False)
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d2"]), WITHDRAW_BOUND)
    t = time.monotonic() - t0
    print(f"drain d2: nexthop gone after {t * 1000:.1f} ms (bound {WITHDRAW_BOUND}s)")
    assert lab.bird("router").sessions()["d2"] == "Established"  # the session stays: only the route goes
    announce(lab, "d2", True)
    t = lab.wait_nexthops(everyone, WITHDRAW_BOUND)
    print(f"undrain d2: nexthop back after {t * 1000:.1f} ms")

    # d3 hangs (its BIRD stopped, TCP still open): only BFD can tell
    pid3 = lab.bird_pid("d3")
    os.kill(pid3, signal.SIGSTOP)
    try:
        t = lab.wait_nexthops(everyone - lab.fabric_addrs(["d3"]), BFD_BOUND)
    finally:
        os.kill(pid3, signal.SIGCONT)
    print(f"d3 hung: nexthop gone after {t * 1000:.1f} ms (BFD {BFD_MULTIPLIER} x {BFD_INTERVAL_MS} ms; "
          f"hold time would be {HOLD_TIME}s; bound {BFD_BOUND}s)")
    assert t > BFD_INTERVAL_MS / 1000  # it took BFD's detection, not an instant close
    t = lab.wait_nexthops(everyone, REJOIN_BOUND)
    print(f"d3 resumed: nexthop back after {t:.3f}s")

    # d1 dies like a box: every process of its namespace SIGKILLed
    pids = lab.kill_director("d1")
    assert pids, "d1 had no process to kill"
    t = lab.wait_nexthops(everyone - lab.fabric_addrs(["d1"]), WITHDRAW_BOUND)
    print(f"d1 killed ({len(pids)} processes): nexthop gone after {t * 1000:.1f} ms (bound {WITHDRAW_BOUND}s)")
    assert lab.bird("router").sessions()["d1"] != "Established"

    # d1 restarts: its BIRD reads the include the adapter left (VIP enabled) and re-announces
    t0 = time.monotonic()
    lab.start_bird("d1")
    lab.wait_nexthops(everyone, REJOIN_BOUND)
    t = time.monotonic() - t0
    print(f"d1 restarted: nexthop back {t:.3f}s after BIRD started")
    wait(lambda: lab.bird("router").sessions()["d1"] == "Established", 5, "d1 session Established")

    # d2's link goes down on its side (the router's port on the switch stays up): BFD again
    lab.run("d2", ["ip", "link", "set", "eth0", "down"])
    t = lab.wait_nexthops(everyone - lab.fabric_addrs(["d2"]), BFD_BOUND)
    print(f"d2 link down: nexthop gone after {t * 1000:.1f} ms (bound {BFD_BOUND}s)")
    lab.run("d2", ["ip", "link", "set", "eth0", "up"])
    t = lab.wait_nexthops(everyone, REJOIN_BOUND)
    print(f"d2 link up: nexthop back after {t:.3f}s")


def test_a_withdrawn_vip_survives_a_bird_restart_withdrawn(ecmp: EcmpLab):
    """The include states the desired state: a drained director that restarts stays drained."""
    lab = ecmp
    for role in lab.director_roles:
        announce(lab, role, True)
    everyone = lab.fabric_addrs(lab.director_roles)
    lab.wait_nexthops(everyone, REJOIN_BOUND)
    announce(lab, "d3", False)
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d3"]), WITHDRAW_BOUND)
    lab.stop_bird("d3")
    lab.start_bird("d3")
    wait(lambda: lab.bird("router").sessions()["d3"] == "Established", REJOIN_BOUND, "d3 session back")
    time.sleep(1.0)  # routes follow the session's first UPDATE: give it time to arrive if it would
    assert lab.nexthops() == everyone - lab.fabric_addrs(["d3"])


def test_a_refused_change_keeps_the_previous_announcement(ecmp: EcmpLab, monkeypatch):
    """BIRD refuses a bad include (here: a VIP protocol BIRD cannot parse): the previous include
    is restored, BIRD keeps announcing, and the adapter's applied state is unchanged."""
    lab = ecmp
    bird = lab.bird("d2")
    bird.apply(bird.plan({lab.vip}, {lab.vip}))
    lab.wait_nexthops(lab.fabric_addrs(["d2"]) | lab.nexthops(), REJOIN_BOUND)
    before = lab.bird_include("d2").read_text()
    real = bgp.render_include
    broken = "protocol static broken { ipv4; route 1.2.3.4/33 blackhole; }\n"  # /33: BIRD refuses it
    monkeypatch.setattr(bgp, "render_include", lambda known: real(known) + broken)
    with pytest.raises(bgp.BirdError, match="configure"):
        bird.apply(bird.plan({lab.vip}, {lab.vip, "198.18.10.101"}))
    monkeypatch.undo()
    assert lab.bird_include("d2").read_text() == before
    assert bird.applied == {lab.vip: True}
    assert bird.announcing() == {lab.vip}
    assert lab.fabric_addrs(["d2"]) <= lab.nexthops()


def spread(lab: EcmpLab, traffic: str, count: int) -> dict[str, int]:
    """``count`` packets from c1 to the VIP, counted by a socket on the VIP in every director (the
    VIP is on each director's lo): {director: packets received}. ``traffic``:

    - ``udp-ports``: UDP, one source port per packet (like many flows of one client);
    - ``esp-spis``: raw ESP (IP protocol 50), one SPI per packet;
    - ``natt-spis``: ESP-in-UDP 4500 -> 4500 (what kernel-libipsec sends), one SPI per packet.
    """
    import socket as so

    esp = traffic == "esp-spis"
    port = 4500 if traffic == "natt-spis" else 40000
    sinks = {}
    for role in lab.director_roles:
        if esp:
            s = lab.socket(role, so.AF_INET, so.SOCK_RAW, 50)
        else:
            s = lab.socket(role, so.AF_INET, so.SOCK_DGRAM)
            s.bind((lab.vip, port))
        s.setsockopt(so.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE: all of them may land here (L3)
        s.setblocking(False)
        sinks[role] = s
    # resolve the neighbours first: a burst into an unresolved neighbour overflows its queue
    assert lab.ping("c1", lab.router_wan)
    for role in lab.director_roles:
        assert lab.ping("router", lab.director_fabric(role))
    if traffic == "udp-ports":
        for i in range(count):
            tx = lab.socket("c1", so.AF_INET, so.SOCK_DGRAM)
            tx.bind((lab.client_addrs["c1"], 20000 + i))
            tx.sendto(b"x", (lab.vip, port))
            tx.close()
    else:
        tx = lab.socket("c1", so.AF_INET, so.SOCK_RAW, 50) if esp else lab.socket("c1", so.AF_INET, so.SOCK_DGRAM)
        if not esp:
            tx.bind((lab.client_addrs["c1"], 4500))
        for i in range(count):
            spi = 0x1000 + i * 7919  # distinct, non-zero, spread over the bits
            tx.sendto(struct.pack("!II", spi, 1) + bytes(16), (lab.vip, port if not esp else 0))
        tx.close()
    got = {role: 0 for role in sinks}
    deadline = time.monotonic() + 2.0
    while sum(got.values()) < count and time.monotonic() < deadline:
        for role, s in sinks.items():
            try:
                while True:
                    s.recv(2048)
                    got[role] += 1
            except BlockingIOError:
                pass
        time.sleep(0.01)
    return got


@pytest.mark.parametrize("hash_policy", [1, 0])
def test_the_router_spreads_flows_over_every_announcing_director(make_ecmp, hash_policy):
    """L4 hashing (policy 1) spreads one client's UDP flows by port and its raw ESP by SPI over the
    three directors, but ESP-in-UDP 4500 -> 4500 stays on one (same ports, whatever the SPI);
    L3 hashing (policy 0) keeps every packet of one client address on one director."""
    lab = make_ecmp(directors=3, hash_policy=hash_policy).up()
    for role in lab.director_roles:
        announce(lab, role, True)
    lab.wait_nexthops(lab.fabric_addrs(lab.director_roles), REJOIN_BOUND)
    n = 300
    for traffic in ("udp-ports", "esp-spis", "natt-spis"):
        got = spread(lab, traffic, n)
        print(f"\nhash policy {hash_policy}, {traffic}: {n} packets from one client -> {got}")
        assert sum(got.values()) == n, (traffic, got)  # nothing lost
        if hash_policy == 1 and traffic != "natt-spis":
            # binomial(300, 1/3): below 50 on one director has probability ~1e-7
            assert min(got.values()) >= 50, (traffic, got)
        else:
            assert sorted(got.values()) == [0, 0, n], (traffic, got)


def test_route_injection_follows_health_drain_and_shutdown(ecmp: EcmpLab):
    """The decision and the adapter together, against real BIRDs: a director whose service has no
    healthy server withdraws, one that shuts down withdraws, and health coming back re-announces."""
    lab = ecmp
    up = DirectorState(dataplane_up=True)
    inj = {role: RouteInjector(lab.bird(role)) for role in lab.director_roles}
    for role in lab.director_roles:
        inj[role].update(up, [ServiceState(lab.vip, 3)])
    everyone = lab.fabric_addrs(lab.director_roles)
    lab.wait_nexthops(everyone, REJOIN_BOUND)
    assert {r: [s.announced for s in i.status()] for r, i in inj.items()} == {r: [True] for r in inj}

    inj["d1"].update(up, [ServiceState(lab.vip, 0)])  # every real server down, as d1 sees it
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d1"]), WITHDRAW_BOUND)
    assert inj["d1"].status()[0].reason == Withdrawn.NO_HEALTHY_SERVER
    inj["d2"].update(DirectorState(dataplane_up=True, shutting_down=True), [ServiceState(lab.vip, 3)])
    lab.wait_nexthops(lab.fabric_addrs(["d3"]), WITHDRAW_BOUND)
    inj["d1"].update(up, [ServiceState(lab.vip, 1)])
    lab.wait_nexthops(lab.fabric_addrs(["d1", "d3"]), WITHDRAW_BOUND)
    assert inj["d1"].sessions() == {"uplink": "Established"}
    assert all(i.error is None for i in inj.values())


def test_a_crashed_ecmp_lab_is_cleaned_up_by_prefix(make_ecmp):
    """After a crash (no down()), cleanup(prefix) finds the router and director namespaces too,
    kills their BIRDs and removes every namespace."""
    lab = make_ecmp(directors=2).up()
    names = set(lab.ns.values())
    assert set(list_labs(lab.prefix)[lab.prefix]) == names
    birds = [lab.bird_pid(r) for r in ("router", "d1", "d2")]
    removed = cleanup(lab.prefix)
    assert set(removed) == names
    assert list_labs(lab.prefix) == {}
    for pid in birds:
        wait(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             5, f"bird {pid} gone")  # fmt: skip
