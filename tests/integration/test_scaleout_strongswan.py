"""Scale-out with real peers: strongSwan clients through a BIRD ECMP router and three directors.

The lab (``director/lab/ecmp.py``): a BIRD router merging the three directors' BGP routes for the
VIP into one multipath route, three directors each running the real daemon (``mh``, DR, the
NFQUEUE dataplane) and its own BIRD announcing the VIP over eBGP + BFD, and three strongSwan
responders on the real servers. Six strongSwan clients: IKEv2 and IKEv1 from their own addresses
(c1, c2, c4, c5) and from behind one masquerading NAT (n1, n2: both seen as 198.18.0.13, on ports
the NAT picks).

The first two tests hash by L3 (``fib_multipath_hash_policy = 0``): every packet of one client
address reaches one director, so each director sees whole conversations and ``mh`` alone keeps
them right while the director set is stable. The last two hash by L4 (a client's UDP 500, UDP 4500
and ESP may reach different directors) and give every daemon shared state (``[daemon.sync]`` with
every other director in ``peers``, role ``all``) and route health injection (``[daemon.bgp]``: the
daemon announces through its own BIRD): a director SIGKILLed with its BIRD, coming back, a fourth
one joining, and a drain followed by a stop. No SA may be re-established or moved; the longest
ESP silence per client (pings inside every tunnel every 50 ms, 20 ms for the drain) is printed
and bounded (docs/scale-out.md, "Measured").

Only DR: the lab's NAT mode sends every real server's replies through d1 (docs/scale-out.md), and
its TUN mode needs one decapsulator per real server that these tests would add nothing to. The
director loss and the drain run on both dataplanes (``dataplane``: NFQUEUE, and the eBPF fast
path, where ESP never reaches the daemon); the others on NFQUEUE only
(``VPN_DIRECTOR_DATAPLANE=ebpf`` runs them on the fast path): three daemons and six charons take
15-30 s per test on a 2-core machine.

Times are printed (``-s``).
"""

from __future__ import annotations

import time

import pytest

from director.lab.director_proc import DirectorProcess
from director.lab.ecmp import EcmpLab, bird_exe
from director.lab.netns import LabError, cleanup, list_labs
from director.lab.strongswan import Peers, add_clients, lost_echoes, sa_key, strongswan_prerequisites, PROTECTED
from director.lab.wait import wait_for

from tests.integration.conftest import lab_prerequisites

# client role -> strongSwan connection kind (psk: IKEv2, psk1: IKEv1 main mode)
KINDS = {"c1": "psk", "c2": "psk1", "c4": "psk", "c5": "psk1", "n1": "psk", "n2": "psk1"}
ROUTE_BOUND = 30.0  # BGP sessions up and the three-way route installed (docs/scale-out.md, "Bounds")
MOVE_BOUND = 30.0  # a moved client re-established: DPD (1 s, 3 retransmits) then a new IKE SA


@pytest.fixture
def make_scaleout():
    """Factory: ``make_scaleout(hash_policy=0, directors=3, running=3, extra=None)`` builds the lab,
    starts a daemon in the first ``running`` directors (each with ``extra(lab, role)`` appended to
    its [daemon] table), makes them announce the VIP (by the lab's BIRD adapter, or by the daemon
    itself when ``extra`` gives it a [daemon.bgp] table: ``daemon_bgp=True``), starts three
    responders (``labels=True``: each labels its SPIs, and the daemons know the labels) and six
    connected clients; returns (lab, directors, peers). Always torn down."""
    missing = lab_prerequisites("dr") + strongswan_prerequisites()
    try:
        bird_exe()
    except LabError as e:
        missing.append(str(e))
    if missing:
        pytest.fail("scale-out lab prerequisites missing: " + "; ".join(missing), pytrace=False)
    made = []

    def make(hash_policy: int = 0, directors: int = 3, running: int = 3, extra=None, daemon_bgp: bool = False,
             labels: bool = False):  # fmt: skip
        lab = EcmpLab("dr", directors=directors, hash_policy=hash_policy)
        made.append([lab, None])
        lab.up()
        for role in add_clients(lab, 2):  # c4, c5 on the wan; the VIP is behind the router
            lab.run(role, ["ip", "route", "add", "default", "via", lab.router_wan])
        lab.add_nat_clients(2)  # n1, n2 behind the NAT
        procs = {}
        for role in lab.director_roles[:running]:
            procs[role] = start_director(lab, role, extra, labelled if labels else None)
        if not daemon_bgp:
            for role in lab.director_roles[:running]:
                bird = lab.bird(role)
                bird.apply(bird.plan({lab.vip}, {lab.vip}))
        t = lab.wait_nexthops(lab.fabric_addrs(lab.director_roles[:running]), ROUTE_BOUND)
        print(f"\n{running}-way route to the VIP after {t:.2f}s")
        peers = Peers(lab)
        made[-1][1] = peers
        peers.start_servers(options=label_options if labels else "")
        for role, kind in KINDS.items():
            peers.client(role, kind)
        peers.start_clients()
        t0 = time.monotonic()
        peers.connect(timeout=30)
        print(f"six clients established in {time.monotonic() - t0:.2f}s")
        return lab, procs, peers

    yield make
    for lab, peers in made:
        if peers is not None:
            try:
                peers.stop()
            except Exception as e:  # teardown goes on: lab.down() kills what is left
                print(f"stopping peers: {e}")
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


def start_director(lab: EcmpLab, role: str, extra=None, edit=None) -> DirectorProcess:
    """The daemon in ``role``: ``extra(lab, role)`` appended to [daemon], then ``edit(text, lab)``
    applied to the whole config (SPI labels)."""
    kw = {"daemon_extra": extra(lab, role)} if extra else {}
    p = DirectorProcess(lab, role, role=role, scheduler="mh", **kw)
    if edit is not None:
        p.config_path.write_text(edit(p.config_path.read_text(), lab))
    return p.start()


@pytest.fixture(params=["nfqueue", "ebpf"])
def dataplane(request, monkeypatch):
    """Both dataplanes, for the tests where the difference matters (every daemon of the test)."""
    monkeypatch.setenv("VPN_DIRECTOR_DATAPLANE", request.param)
    return request.param


@pytest.fixture
def scaleout(make_scaleout):
    """Three daemons (L3 hashing) announcing the VIP, three responders, six connected clients."""
    return make_scaleout()


def sa_keys(peers: Peers) -> dict[str, tuple]:
    """Each client's established IKE SA and its installed CHILD_SAs' SPIs, as the client sees them."""
    keys = {}
    for role, c in peers.clients.items():
        sas = c.established(c.conn)
        assert len(sas) == 1, f"{role}: {len(sas)} established SAs"
        keys[role] = sa_key(sas[0])
    return keys


def servers_of(peers: Peers) -> dict[str, int]:
    """The real server holding each client's current IKE SA (same SPIs on both ends): a server
    that lost a client may still list the client's old SA until it times out."""
    got = {}
    for role, c in peers.clients.items():
        sas = c.established(c.conn)
        assert len(sas) == 1, f"{role}: {len(sas)} established SAs"
        spis = (sas[0]["initiator-spi"], sas[0]["responder-spi"])
        holders = [i for i, s in enumerate(peers.servers)
                   if any((sa["initiator-spi"], sa["responder-spi"]) == spis for sa in s.established())]
        assert len(holders) == 1, f"{role}: SA {spis} held by servers {holders}"
        got[role] = holders[0]
    return got


def ping_all(peers: Peers, count: int = 3) -> dict[str, tuple[int, int]]:
    return {role: peers.ping(role, count=count, interval=0.1) for role in peers.clients}


def start_pings(lab: EcmpLab, peers: Peers, interval: float = 0.05) -> dict:
    """A ping inside every client's tunnel, every ``interval`` s, until stopped (for lost_echoes)."""
    procs = {}
    for role, c in peers.clients.items():
        vip = c.virtual_ip(c.conn)
        procs[role] = lab.popen(role, ["ping", "-n", "-i", str(interval), "-W", "1", "-I", vip, PROTECTED],
                                stdout=-1, stderr=-1, text=True)  # fmt: skip
    return procs


def stop_pings(procs: dict, interval: float = 0.05, lost_seqs: dict | None = None) -> dict[str, tuple[int, float]]:
    """{client: (echoes lost, longest silence in s)} (the longest run of lost echoes x interval);
    ``lost_seqs``, if given, receives each client's lost sequence numbers."""
    import signal

    out = {}
    for role, p in procs.items():
        p.send_signal(signal.SIGINT)
        text, _ = p.communicate(timeout=5)
        sent, lost = lost_echoes(text)
        if lost_seqs is not None:
            lost_seqs[role] = lost
        longest = run = 0
        prev = None
        for seq in lost:
            run = run + 1 if prev == seq - 1 else 1
            longest = max(longest, run)
            prev = seq
        out[role] = (len(lost), longest * interval)
        assert sent > 10, f"{role}: ping sent only {sent}: {text[-300:]}"
    return out


def test_six_clients_spread_over_three_directors_and_pass_traffic(scaleout):
    """Every client established (IKEv1 and IKEv2, two behind the NAT) and pings inside its tunnel;
    each director holds the whole conversation of the clients the router sends it, on the real
    server that holds the client's SA, and no client's conversation is on two directors."""
    lab, directors, peers = scaleout
    for role, (sent, got) in ping_all(peers).items():
        assert got == sent, f"{role}: {got}/{sent} echoes inside the tunnel"
    rs_of = servers_of(peers)
    held: dict[str, list[str]] = {}  # client address as seen -> directors holding it
    for d, proc in directors.items():
        for e in proc.connections():
            if e["state"] == "ESTABLISHED":
                held.setdefault(e["client"], [])
                if d not in held[e["client"]]:
                    held[e["client"]].append(d)
                # the director's choice is the server holding the client's SA
                owners = {lab.rs_addrs[rs_of[r]] for r in peers.clients if lab.seen_as(r) == e["client"]}
                assert e["rs_address"] in owners, (d, e, owners)
    print(f"clients per director: {held}; real server per client: {rs_of}")
    assert set(held) == {lab.seen_as(r) for r in peers.clients}, held
    assert all(len(ds) == 1 for ds in held.values()), f"a client on several directors (L3 hashing): {held}"
    # the NAT's two clients share one public address, one director, and (mh: by address) one server
    assert rs_of["n1"] == rs_of["n2"]


def test_a_real_server_removed_moves_only_its_clients_and_one_added_moves_none(scaleout):
    lab, directors, peers = scaleout
    before = sa_keys(peers)
    rs_of = servers_of(peers)
    busiest = max(set(rs_of.values()), key=lambda rs: sum(1 for v in rs_of.values() if v == rs))
    moved = {r for r, rs in rs_of.items() if rs == busiest}
    stay = set(peers.clients) - moved
    addr = lab.rs_addrs[busiest]
    print(f"removing rs{busiest + 1} ({addr}) from every director: its clients {sorted(moved)}")

    pings = start_pings(lab, peers)
    t0 = time.monotonic()
    for proc in directors.values():
        assert proc.request("del-server", vip=lab.vip, address=addr)["ok"]

    def moved_back() -> bool:
        for r in moved:
            c = peers.clients[r]
            sas = c.established(c.conn)
            if len(sas) != 1 or sa_key(sas[0]) == before[r] or not sas[0].get("child-sas"):
                return False
        return True

    wait_for(moved_back, MOVE_BOUND, f"{sorted(moved)} re-established elsewhere")
    print(f"moved clients re-established after {time.monotonic() - t0:.2f}s")
    time.sleep(2.0)  # a full DPD period with the pings running: a broken stayer would show
    lost = stop_pings(pings)
    print(f"lost echoes / longest silence: {lost}")
    after = sa_keys(peers)
    for r in stay:
        assert after[r] == before[r], f"{r} was not on rs{busiest + 1} but its SA changed"
        assert lost[r][0] == 0, f"{r} lost {lost[r][0]} echoes though its server stayed"
    rs_now = servers_of(peers)
    for r in moved:
        assert rs_now[r] != busiest, (r, rs_now)
    for r in stay:
        assert rs_now[r] == rs_of[r], (r, rs_of, rs_now)
    for role, (sent, got) in ping_all(peers).items():
        assert got == sent, f"{role}: {got}/{sent} echoes after the removal"

    # the server comes back: mh's table changes for new conversations only
    before = sa_keys(peers)
    pings = start_pings(lab, peers)
    for proc in directors.values():
        assert proc.request("add-server", vip=lab.vip, server={"address": addr, "weight": 1})["ok"]
    time.sleep(3.0)  # three DPD periods: a client whose packets went elsewhere would restart
    lost = stop_pings(pings)
    print(f"after adding rs{busiest + 1} back: lost echoes / longest silence: {lost}")
    assert sa_keys(peers) == before
    assert all(n == 0 for n, _ in lost.values()), lost


# -- shared state (N-peer table sync, role "all") and route health injection by the daemon -------

SYNC_KEY = "5ca1e0075ca1e0075ca1e0075ca1e007"
SILENCE_BOUND = 1.0  # longest ESP silence of any client when a director dies (docs/scale-out.md)


def shared_and_announced(lab: EcmpLab, role: str) -> str:
    """The daemon syncs its table with every other director (LAN side, role all) and announces
    the VIP itself through its BIRD."""
    me = lab.director_lan_addr(role)
    others = ", ".join(f'"{lab.director_lan_addr(r)}"' for r in lab.director_roles if r != role)
    return f"""
[daemon.sync]
peers = [{others}]
bind = "{me}"
key = "{SYNC_KEY}"
role = "all"
state_file = "{lab._tmp() / f"sync-{role}.json"}"

[daemon.bgp]
socket = "{lab.bird_socket(role)}"
include = "{lab.bird_include(role)}"
shutdown_wait = 1.0
"""


def settle(lab: EcmpLab, procs: dict, peers: Peers, timeout: float = 10.0) -> None:
    """Every running director holds every client's ESTABLISHED conversation (the sync's work)."""
    want = {lab.seen_as(r) for r in peers.clients}

    def everywhere() -> bool:
        for p in procs.values():
            if p.proc is None or p.proc.poll() is not None:
                continue
            have = {e["client"] for e in p.connections() if e["state"] == "ESTABLISHED"}
            if not want <= have:
                return False
        return True

    wait_for(everywhere, timeout, "every client's conversation on every director")


LABEL_MASK = 0x00000000FF000000  # byte 4 of the IKE SPI (docs/operations.md, SPI labels)
LABELS = (0x41, 0x42, 0x43)  # real server k's label; its inbound ESP SPIs: label << 24 .. | 0xFFFFFF


def label_options(rs: int) -> str:
    """strongswan.conf settings of real server ``rs``: its label in the IKE SPIs it chooses, its
    inbound ESP SPIs in its range."""
    b = LABELS[rs]
    return (f"  spi_mask = {LABEL_MASK:#018x}\n  spi_label = {b << 24:#018x}\n"
            f"  spi_min = {b << 24:#010x}\n  spi_max = {(b << 24) | 0xFFFFFF:#010x}\n")  # fmt: skip


def announced(lab: EcmpLab, role: str) -> str:
    """The daemon announces the VIP itself through its BIRD; nothing shared."""
    return f"""
[daemon.bgp]
socket = "{lab.bird_socket(role)}"
include = "{lab.bird_include(role)}"
shutdown_wait = 1.0
"""


def labelled(text: str, lab: EcmpLab) -> str:
    """A daemon config with SPI labels: the service's mask, each real server's label and range."""
    mask = f'\nspi_label = {{ mask = "{LABEL_MASK:#018x}" }}\n'
    text = text.replace("\n[[service.server]]", mask + "\n[[service.server]]", 1)
    for k, addr in enumerate(lab.rs_addrs):
        b = LABELS[k]
        text = text.replace(f'address = "{addr}"\n',
                            f'address = "{addr}"\nspi_label = "{b << 24:#018x}"\n'
                            f"esp_spi_min = {b << 24}\nesp_spi_max = {(b << 24) | 0xFFFFFF}\n")  # fmt: skip
    return text


# shared: every director holds every entry (N-peer sync); labels: no state shared, the SPIs the
# real servers chose name them. Both with L4 hashing, both announced by the daemons.
@pytest.mark.parametrize("mechanism", ["shared", "labels"])
def test_a_director_dies_like_a_box_and_no_sa_moves_then_it_returns_and_a_fourth_joins(make_scaleout, mechanism,
                                                                                      dataplane):
    """L4 hashing (a client's IKE and ESP on different directors): a director SIGKILLed with its
    BIRD moves no SA and silences no client longer than SILENCE_BOUND; back, it moves none; a
    fourth director joins and moves none; a director whose links go down (BFD's case) moves none
    and silences no client longer than SILENCE_BOUND."""
    if mechanism == "shared":
        lab, procs, peers = make_scaleout(hash_policy=1, directors=4, running=3, extra=shared_and_announced,
                                          daemon_bgp=True)  # fmt: skip
        settle(lab, procs, peers)
        extra, edit = shared_and_announced, None
    else:
        lab, procs, peers = make_scaleout(hash_policy=1, directors=4, running=3, extra=announced, daemon_bgp=True,
                                          labels=True)  # fmt: skip
        extra, edit = announced, labelled
        assert sum(p.status()["entries"] for p in procs.values()) > 0
    for role, (sent, got) in ping_all(peers).items():
        assert got == sent, f"{role}: {got}/{sent} echoes inside the tunnel"
    before = sa_keys(peers)

    # d2 dies like a box
    pings = start_pings(lab, peers)
    time.sleep(1.0)
    pids = lab.kill_director("d2")
    assert pids
    t = lab.wait_nexthops(lab.fabric_addrs(["d1", "d3"]), ROUTE_BOUND)
    print(f"d2 killed ({len(pids)} processes): nexthop gone after {t * 1000:.0f} ms")
    time.sleep(3.0)  # three DPD periods: a client that lost its path would restart
    lost = stop_pings(pings)
    print(f"director loss: lost echoes / longest silence per client: {lost}")
    assert sa_keys(peers) == before, "an SA was re-established or moved by a director's loss"
    worst = max(s for _, s in lost.values())
    assert worst <= SILENCE_BOUND, f"longest ESP silence {worst:.2f}s > {SILENCE_BOUND}s: {lost}"

    # d2 comes back: its BIRD and its daemon (a snapshot from the others), then it announces
    pings = start_pings(lab, peers)
    lab.start_bird("d2")
    procs["d2"] = start_director(lab, "d2", extra, edit)
    t = lab.wait_nexthops(lab.fabric_addrs(["d1", "d2", "d3"]), ROUTE_BOUND)
    print(f"d2 back: nexthop after {t:.2f}s")
    time.sleep(3.0)
    lost = stop_pings(pings)
    print(f"director back: lost echoes / longest silence: {lost}")
    assert sa_keys(peers) == before, "an SA moved when a director came back"
    assert max(s for _, s in lost.values()) <= SILENCE_BOUND, lost

    # a fourth director joins
    pings = start_pings(lab, peers)
    procs["d4"] = start_director(lab, "d4", extra, edit)
    t = lab.wait_nexthops(lab.fabric_addrs(lab.director_roles), ROUTE_BOUND)
    print(f"d4 joined: nexthop after {t:.2f}s")
    time.sleep(3.0)
    lost = stop_pings(pings)
    print(f"fourth director: lost echoes / longest silence: {lost}")
    assert sa_keys(peers) == before, "an SA moved when a fourth director joined"
    assert max(s for _, s in lost.values()) <= SILENCE_BOUND, lost

    # d3's links go down on its side (its processes live on): only BFD tells the router
    pings = start_pings(lab, peers)
    time.sleep(0.5)
    for ifname in ("eth0", "eth1"):
        lab.run("d3", ["ip", "link", "set", ifname, "down"])
    t = lab.wait_nexthops(lab.fabric_addrs(["d1", "d2", "d4"]), ROUTE_BOUND)
    print(f"d3's links down: nexthop gone after {t * 1000:.0f} ms (BFD)")
    time.sleep(3.0)
    lost = stop_pings(pings)
    print(f"links down: lost echoes / longest silence: {lost}")
    assert sa_keys(peers) == before, "an SA moved when a director's links went down"
    worst = max(s for _, s in lost.values())
    assert worst <= SILENCE_BOUND, f"longest ESP silence {worst:.2f}s > {SILENCE_BOUND}s: {lost}"
    if mechanism == "labels":
        # The labels did the work: a conversation reaching a director that never saw it was
        # steered by its SPI (each client's flows to 500 and 4500 all hashing to the director of
        # its IKE_SA_INIT, for all six, and none of d2's moving: below 1/700).
        steered = {r: p.status()["stats"]["label_steered"] for r, p in procs.items() if r not in ("d2", "d3")}
        print(f"label_steered: {steered}")
        assert sum(steered.values()) > 0, steered


def test_a_drained_director_withdraws_then_stops_and_not_one_esp_packet_is_lost(make_scaleout, dataplane):
    lab, procs, peers = make_scaleout(hash_policy=1, extra=shared_and_announced, daemon_bgp=True)
    settle(lab, procs, peers)
    before = sa_keys(peers)
    pings = start_pings(lab, peers, interval=0.02)
    t_ping = time.monotonic()
    time.sleep(1.0)
    t0 = time.monotonic()
    assert procs["d1"].request("drain")["ok"]
    lab.wait_nexthops(lab.fabric_addrs(["d2", "d3"]), 1.0)
    print(f"d1 drained: nexthop gone after {(time.monotonic() - t0) * 1000:.0f} ms")
    time.sleep(1.0)  # what was in flight toward d1 arrives and is forwarded
    t_stop = time.monotonic()
    assert procs["d1"].stop() == 0
    time.sleep(2.0)
    seqs: dict = {}
    lost = stop_pings(pings, interval=0.02, lost_seqs=seqs)
    # When each lost echo was sent, in seconds after the drain request. This test is about the
    # drain and the stop: an echo lost before the drain request (seen with the eBPF fast path: a
    # client's first echoes of the run, a second before the drain) is printed, not counted here.
    sent_at = {r: [round(t_ping + (q - 1) * 0.02 - t0, 2) for q in qs] for r, qs in seqs.items()}
    before_drain = {r: [t for t in ts if t < 0] for r, ts in sent_at.items() if any(t < 0 for t in ts)}
    across = {r: [t for t in ts if t >= 0] for r, ts in sent_at.items() if any(t >= 0 for t in ts)}
    print(f"drain at +0, stop at +{t_stop - t0:.2f}s: lost echoes per client: {lost}; "
          f"lost before the drain (s): {before_drain}")
    assert not across, f"echoes lost across the drain and the stop (s after the drain request): {across}"
    assert sa_keys(peers) == before
