"""Route health injection by the real daemon: three vpn-director daemons, one in each director
namespace of the ECMP lab, each driving its own BIRD through [daemon.bgp]. The router's multipath
route for the VIP follows what the daemons decide: all three announce while their real servers
are healthy; `vpnadm --drain` on one (the director, or the VIP) removes exactly its nexthop and
`--undrain` brings it back; a service whose real servers all fail their health checks is
withdrawn everywhere; a daemon that stops withdraws before it exits (its BIRD keeps running).
"""

from __future__ import annotations

import json
import time

import pytest

from director.cli import execute, parse, socket_caller
from director.lab.director_proc import DirectorProcess
from director.lab.ecmp import EcmpLab
from director.lab.netns import cleanup, list_labs


WITHDRAW_BOUND = 1.0  # docs/scale-out.md "Bounds": a BGP withdraw reaches the router's FIB
REJOIN_BOUND = 30.0  # a session (re-)established and the route back
HEALTH = "health = { interval = 0.3, timeout = 0.2, rise = 2, fall = 2 }"
DOWN_BOUND = 5.0  # fall = 2 rounds of 0.3 s, plus the tick that applies the decision, on a loaded machine
SHUTDOWN_WAIT = 1.5


def vpnadm(d: DirectorProcess, *argv: str) -> str:
    """One vpnadm invocation against ``d``'s control socket, as the command line runs it."""
    inv = parse([*argv, "--socket", str(d.control)])
    return execute(inv, socket_caller(inv.socket))


def listing(d: DirectorProcess) -> dict:
    return json.loads(vpnadm(d, "-L", "--json"))[0]


@pytest.fixture
def lab(ecmp_prerequisites):
    lab = EcmpLab("dr", directors=3)
    daemons: list[DirectorProcess] = []
    lab.daemons = daemons
    try:
        lab.up()
        yield lab
    finally:
        for d in daemons:
            d.stop()
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


def start_daemons(lab: EcmpLab, scheduler: str = "mh", health: bool = True) -> dict[str, DirectorProcess]:
    out = {}
    for role in lab.director_roles:
        bgp = (f'[daemon.bgp]\nsocket = "{lab.bird_socket(role)}"\ninclude = "{lab.bird_include(role)}"\n'
               f"shutdown_wait = {SHUTDOWN_WAIT}\n")  # fmt: skip
        d = DirectorProcess(lab, name=f"director-{role}", role=role, scheduler=scheduler,
                            extra_service=HEALTH if health else "", daemon_extra=bgp)
        lab.daemons.append(d)
        out[role] = d.start()
    return out


def test_the_daemons_announce_drain_withdraw_on_failure_and_at_shutdown(lab: EcmpLab):
    lab.start_responders()
    ds = start_daemons(lab)
    everyone = lab.fabric_addrs(lab.director_roles)
    t = lab.wait_nexthops(everyone, REJOIN_BOUND)
    print(f"\nthree daemons: 3-way route after {t:.3f}s")
    for role, d in ds.items():
        svc = listing(d)
        assert svc["announcement"] == {"announced": True, "wanted": True, "reason": None}, (role, svc)
    deadline = time.monotonic() + REJOIN_BOUND  # the sessions are read on the daemon's tick
    while listing(ds["d1"])["bgp_sessions"] != {"uplink": "Established"}:
        assert time.monotonic() < deadline, listing(ds["d1"])
        time.sleep(0.1)
    text = vpnadm(ds["d1"], "-L")
    assert f"IPSEC  {lab.vip} mh affinity ip" in text and " announced" in text, text
    assert "BGP sessions: uplink Established" in text, text

    # vpnadm --drain on d2 (the whole director): exactly d2's nexthop leaves; the session stays
    t0 = time.monotonic()
    out = vpnadm(ds["d2"], "--drain")
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d2"]), WITHDRAW_BOUND)
    print(f"vpnadm --drain on d2: nexthop gone after {(time.monotonic() - t0) * 1000:.1f} ms ({out.strip()})")
    assert listing(ds["d2"])["announcement"] == {"announced": False, "wanted": False, "reason": "director_drained"}
    assert "withdrawn(director_drained)" in vpnadm(ds["d2"], "-L")
    assert lab.bird("router").sessions()["d2"] == "Established"
    vpnadm(ds["d2"], "--undrain")
    lab.wait_nexthops(everyone, WITHDRAW_BOUND)

    # ... and of one VIP on d3: the service's drain setting, which `save` keeps
    vpnadm(ds["d3"], "--drain", "-V", lab.vip)
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d3"]), WITHDRAW_BOUND)
    assert listing(ds["d3"])["announcement"]["reason"] == "service_drained"
    assert ds["d3"].request("save")["result"][0]["drain"] is True
    vpnadm(ds["d3"], "--undrain", "-V", lab.vip)
    lab.wait_nexthops(everyone, WITHDRAW_BOUND)
    assert "drain" not in ds["d3"].request("save")["result"][0]

    # every real server fails its health checks: the service is withdrawn on every director
    lab.stop_responders()
    t = lab.wait_nexthops(set(), DOWN_BOUND)
    print(f"real servers silent: every nexthop gone after {t:.3f}s")
    for d in ds.values():
        assert listing(d)["announcement"]["reason"] == "no_healthy_server"
    lab.start_responders()
    t = lab.wait_nexthops(everyone, DOWN_BOUND)
    print(f"real servers back: 3-way route after {t:.3f}s")

    # d1 stops: its route leaves before the process exits; its BIRD still runs
    d1 = ds["d1"]
    t0 = time.monotonic()
    d1.proc.send_signal(15)
    gone_at = exited_at = None
    while exited_at is None:
        gone = gone_at is None and lab.nexthops() == everyone - lab.fabric_addrs(["d1"])
        now = time.monotonic()  # after the read: the route was gone by then
        if gone:
            gone_at = now - t0
        if d1.proc.poll() is not None:
            exited_at = now - t0
        assert now - t0 < 15, "d1 did not exit"
        time.sleep(0.002)
    print(f"d1 stopping: route gone after {gone_at if gone_at is None else round(gone_at * 1000, 1)} ms, "
          f"process exited after {exited_at:.3f}s")
    assert d1.proc.returncode == 0, d1.log()[-2000:]
    assert gone_at is not None and gone_at < exited_at, (gone_at, exited_at)
    assert gone_at < WITHDRAW_BOUND
    assert exited_at >= SHUTDOWN_WAIT  # it waited for the routers before taking the dataplane down
    assert lab.bird("router").sessions()["d1"] == "Established"
    assert lab.nexthops() == everyone - lab.fabric_addrs(["d1"])


def test_bird_changed_behind_the_daemons_back_is_put_right_within_a_tick(lab: EcmpLab):
    """An operator's `birdc disable` of the VIP's protocol, then a restart of d1's BIRD from an
    include that says nothing is announced (a drained run's): the daemon's tick reads BIRD's
    protocols, sees them differ from what it applied, and applies again. And a daemon that
    starts withdraws whatever a crashed run left announced before its dataplane is up."""
    lab.start_responders()
    ds = start_daemons(lab)
    everyone = lab.fabric_addrs(lab.director_roles)
    lab.wait_nexthops(everyone, REJOIN_BOUND)
    bird = lab.bird("d1")
    proto = "vip_" + lab.vip.replace(".", "_")
    t0 = time.monotonic()
    bird.command(f"disable {proto}")
    lab.wait_nexthops(everyone - lab.fabric_addrs(["d1"]), WITHDRAW_BOUND)
    t = lab.wait_nexthops(everyone, 3.0)  # a tick (1 s), the enable, the UPDATE
    print(f"\nbirdc disable on d1: nexthop back {time.monotonic() - t0:.3f}s after it ({t:.3f}s after it left)")
    assert ds["d1"].status()["bgp"]["drifts"] >= 1

    # BIRD restarts reading an include in which the VIP is disabled
    include = lab.bird_include("d1")
    include.write_text(include.read_text().replace("disabled no;", "disabled yes;"))
    lab.stop_bird("d1")
    lab.start_bird("d1")
    t = lab.wait_nexthops(everyone, REJOIN_BOUND)
    print(f"d1's BIRD restarted from a withdrawn include: nexthop back after {t:.3f}s")

    # the daemon is SIGKILLed: its BIRD goes on announcing (nobody withdrew) ...
    ds["d1"].proc.kill()
    ds["d1"].proc.wait()
    time.sleep(2.0)
    assert lab.nexthops() == everyone
    # ... until a new run starts: it withdraws first, then announces once its dataplane is up
    d = ds["d1"].start()  # the same config and log
    lab.wait_nexthops(everyone, REJOIN_BOUND)
    text = d.log()
    assert text.count("bgp.withdrawn_at_start") == 2 and "start_withdraw_failed" not in text, text[-3000:]
    last = text.rindex("bgp.withdrawn_at_start")
    assert text.index("route_injection.applied announce=", last) > last  # withdrawn, then announced


def mac(lab: EcmpLab, role: str, ifname: str) -> bytes:
    return bytes.fromhex(lab.run(role, ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip().replace(":", ""))


def send_direct(lab: EcmpLab, role: str, packets: list[bytes]) -> None:
    """Frames from the router's fabric port straight to ``role``'s eth0, whatever ECMP would pick."""
    import socket as so

    s = lab.socket("router", so.AF_PACKET, so.SOCK_RAW, so.htons(0x0800))
    s.bind(("eth1", 0))
    header = mac(lab, role, "eth0") + mac(lab, "router", "eth1") + b"\x08\x00"
    for p in packets:
        s.send(header + p)
    s.close()


N_CONVERSATIONS = 60


@pytest.mark.parametrize("scheduler, same", [("mh", True), ("rr", False)])
def test_every_director_picks_the_same_server_for_a_new_conversation_with_mh(lab: EcmpLab, scheduler, same):
    """60 new conversations (distinct clients), sent to each of d1, d2 and d3 directly, in a
    different order on each: with mh every director picks the same real server for each client;
    with rr the choice follows each director's own history, so the tables differ (the test can
    fail). The tables are read with vpnadm -L -c --json."""
    import random

    from director.lab import craft
    from director.packet import ip_to_int

    ds = start_daemons(lab, scheduler=scheduler, health=False)  # no probes: every server stays up
    vip = ip_to_int(lab.vip)
    conversations = [(ip_to_int("198.18.0.100") + n, 0xC0FFEE00 + n) for n in range(N_CONVERSATIONS)]
    tables = {}
    for k, (role, d) in enumerate(ds.items()):
        order = list(conversations)
        random.Random(k).shuffle(order)
        send_direct(lab, role, [craft.ike(c, vip, spi) for c, spi in order])
        deadline = time.monotonic() + 10
        while True:
            conns = json.loads(vpnadm(d, "-L", "-c", "--json"))
            if len(conns) >= N_CONVERSATIONS or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        tables[role] = {(c["client"], c["spi_i"]): c["rs_address"] for c in conns}
        assert len(tables[role]) == N_CONVERSATIONS, (role, len(tables[role]), d.log()[-2000:])
    spread = {}
    for rs in tables["d1"].values():
        spread[rs] = spread.get(rs, 0) + 1
    print(f"\n{scheduler}: d1's choices per real server {spread}")
    assert len(spread) == 3  # every server chosen: the agreement is not "all to one"
    agree = sum(tables["d1"][k] == tables["d2"][k] == tables["d3"][k] for k in tables["d1"])
    print(f"{scheduler}: {agree} of {N_CONVERSATIONS} conversations on the same real server on all three")
    if same:
        assert tables["d1"] == tables["d2"] == tables["d3"]
    else:
        assert agree < N_CONVERSATIONS
