"""Real IPsec peers through the real daemon: strongSwan's charon as clients and as real servers.

Every test runs in DR, TUN and NAT mode, once per dataplane (``run_director``: nfqueue, ebpf).
Clients are charon road warriors (one per namespace: c1, c2, c3 behind the masquerading NAT, and
c4.. added on the wan bridge); every real server runs a charon responder that hands out virtual
IPs from its own pool (10.77.<rs>.0/24) and protects 10.88.0.1 (on its lo), so traffic is sent
INSIDE each tunnel with ``ping`` and ``iperf3``. No kernel ESP here: the kernel-libipsec plugin
does ESP in user space, always UDP-encapsulated (ESP-in-UDP on 4500).

A missing prerequisite (root, charon, swanctl, pki, ping, iperf3, plugins) fails, never skips.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter

import pytest

from director.lab.strongswan import (
    PROTECTED,
    Peers,
    Pki,
    add_clients,
    ike_sa_of,
    installed_children,
    lost_echoes,
    parallel,
    pool_of,
    rs_of_vip,
    sa_key,
    strongswan_prerequisites,
)
from director.lab.wait import wait_for

MODES = ["dr", "tun", "nat"]
NFQUEUE_COPY = 4016  # NetfilterQueue copies at most this many bytes of a packet (docs/architecture.md)
SPLIT = r"splitting IKE message \((\d+) bytes\)"  # charon log: RFC 7383 fragmentation
SENT_4500 = r"sending packet: from \S+\[4500\] to \S+\[4500\] \((\d+) bytes\)"


@pytest.fixture
def ipsec(make_lab, run_director):
    """Factory: ``ipsec(mode, pki=False, extra_clients=0)`` -> (lab, Peers).

    Requests ``run_director`` itself so that teardown runs peers (clients first, then servers)
    before the daemon stops and before the lab goes down (which kills anything left, removes the
    namespaces, charon's TUN devices with them, and the lab's temp dir with every charon's files).
    """
    missing = strongswan_prerequisites()
    if missing:
        pytest.fail("strongSwan prerequisites missing: " + "; ".join(missing), pytrace=False)
    made: list[Peers] = []

    def make(mode: str, *, pki: bool = False, extra_clients: int = 0):
        lab = make_lab(mode, responders=False)
        if extra_clients:
            add_clients(lab, extra_clients)
        peers = Peers(lab, pki=Pki.shared() if pki else None)
        made.append(peers)
        return lab, peers

    yield make
    for peers in made:
        peers.stop()


# -- helpers --------------------------------------------------------------------------------------


def table(d) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "expires_in"} for c in d.connections()]


def entry_of(d, client: str, spi_i: str) -> dict | None:
    """The director's entry for (client address, initiator SPI)."""
    for c in d.connections():
        if c["client"] == client and c["spi_i"] == spi_i:
            return c
    return None


def rs_addresses_of(d, client: str) -> set[str]:
    return {c["rs_address"] for c in d.connections() if c["client"] == client}


def assert_pings(peers: Peers, roles, count: int = 3, d=None) -> None:
    """Every client's ``count`` echoes come back. On a loss the message says what the client and
    the director held then, and what a second ping 2 s later got (which tells a lasting break
    from a late route); the assertion still fails."""
    roles = list(roles)
    results = dict(zip(roles, parallel([lambda r=r: peers.ping(r, count=count) for r in roles])))
    bad = {r: v for r, v in results.items() if v[1] != v[0]}
    if bad:
        time.sleep(2.0)
        lines = []
        for r in bad:
            c = peers.clients[r]
            lines.append(f"--- {r}: SAs {c.established(c.conn)}; server_of={peers.server_of(r)}; "
                         f"2 s later: {peers.ping(r, count=count)}\n{c.log()[-3000:]}")  # fmt: skip
        if d is not None:
            lines.append(f"--- director table:\n{table(d)}\nstats {d.status()['stats']}")
        raise AssertionError(f"pings through the tunnel lost (sent, received): {bad}\n" + "\n".join(lines))


def assert_on_server(d, peers: Peers, role: str, *, in_table: bool = True) -> int:
    """The client's current SA is held by one real server, its virtual IP is from that server's
    pool, and the director's entry for that IKE SA points there; returns the server index.

    ``in_table``: also wait for the current IKE SA's own entry. A rekeyed IKE SA (new SPIs) shows
    up there only with its first message through the director (here: the client's DPD after 1 s
    without traffic), so not while traffic flows.
    """
    c = peers.clients[role]
    sa = c.wait_established(c.conn)
    rs = peers.server_of(role)
    assert rs is not None, f"no real server has {c.ike_id}'s SA: {[s.list_sas() for s in peers.servers]}"
    vip = c.virtual_ip(c.conn)
    assert rs_of_vip(vip) == rs, f"{role}: virtual IP {vip} is not from {pool_of(rs)}"
    if in_table:
        e = wait_for(lambda: entry_of(d, peers.seen_as(role), sa["initiator-spi"]), 5.0,
                     f"{role}'s IKE SA {sa['initiator-spi']} in the director's table:\n{table(d)}")  # fmt: skip
        assert e["rs_address"] == peers.lab.rs_addrs[rs], f"{role}: director says {e}, but rs{rs + 1} has the SA"
        assert e["state"] == "ESTABLISHED"
    return rs


def retransmits(charon) -> list[str]:
    return [line for line in charon.log().splitlines() if "retransmit" in line]


def no_internal_errors(d) -> None:
    st = d.status()
    assert st["stats"]["internal_errors"] == 0, st
    assert d.proc.poll() is None, d.log()


def six_clients(peers: Peers) -> list[str]:
    """The real servers and road warriors c1..c6 (IKEv2 PSK; c3 behind the NAT), all connected."""
    peers.start_servers()
    roles = ["c1", "c2", "c3", "c4", "c5", "c6"]
    clients = [peers.client(role) for role in roles]
    peers.start_clients(clients)
    peers.connect(clients)
    return roles


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_six_clients_spread_and_carry_traffic(ipsec, run_director, mode):
    lab, peers = ipsec(mode, extra_clients=3)
    d = run_director(lab, scheduler="rr")
    roles = six_clients(peers)

    est = [c for c in d.connections() if c["state"] == "ESTABLISHED"]
    assert len(est) == 6, table(d)
    assert len({c["client"] for c in est}) == 6
    assert sorted(Counter(c["rs"] for c in est).values()) == [2, 2, 2], table(d)  # rr over three servers
    for role in roles:
        assert_on_server(d, peers, role)
    for i, s in enumerate(peers.servers):  # every server holds exactly the clients the director sent it
        held = {sa["remote-id"] for sa in s.established()}
        sent = {peers.clients[r].ike_id for r in roles if peers.server_of(r) == i}
        assert held == sent and len(held) == 2

    assert_pings(peers, roles)
    end = peers.iperf("c1", seconds=2)
    mbit = end["sum_received"]["bits_per_second"] / 1e6
    assert mbit > 5, f"iperf3 through c1's tunnel: {mbit:.1f} Mbit/s"
    print(f"{mode}: iperf3 inside c1's tunnel {mbit:.0f} Mbit/s")
    again = {r: retransmits(peers.clients[r]) for r in roles if retransmits(peers.clients[r])}
    if again:  # not a failure (a loaded machine can be slower than the 0.5 s timeout), but worth a look
        print(f"{mode}: retransmissions: {again}")
    no_internal_errors(d)


@pytest.mark.parametrize("mode", MODES)
def test_certificate_ikev2_with_and_without_ike_fragmentation(ipsec, run_director, mode):
    lab, peers = ipsec(mode, pki=True)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    frag = peers.client("c1", "cert", cert="frag", fragmentation="yes")
    whole = peers.client("c2", "cert", cert="nofrag", fragmentation="no")
    peers.start_clients()
    peers.connect()

    # RFC 7383: the ~5 KB IKE_AUTH request is split into IKE fragments (each < MTU)
    split = [int(n) for n in re.findall(SPLIT, frag.log())]
    assert split and split[0] > NFQUEUE_COPY, frag.log()[-3000:]
    # without it: one UDP datagram above 4016 bytes, IP-fragmented on the wire
    sizes = [int(n) for n in re.findall(SENT_4500, whole.log())]
    assert sizes and sizes[0] > NFQUEUE_COPY, whole.log()[-3000:]
    # the answers (server certificate) are large too: split for c1, one big datagram for c2
    for role, c in (("c1", frag), ("c2", whole)):
        rs = assert_on_server(d, peers, role)
        srv = peers.servers[rs].log()
        answer = re.findall(SPLIT if c is frag else SENT_4500, srv)
        assert answer and int(answer[0]) > NFQUEUE_COPY, srv[-3000:]
        # a lost large message would show up as a retransmission (charon resends after 0.5 s)
        assert retransmits(c) == [], f"{role} had to retransmit:\n" + "\n".join(retransmits(c))
    assert_pings(peers, ["c1", "c2"])
    no_internal_errors(d)
    print(f"{mode}: IKE_AUTH request {split[0]} bytes in IKE fragments, {sizes[0]} bytes as one datagram")


@pytest.mark.parametrize("mode", MODES)
def test_ikev1_main_mode_psk(ipsec, run_director, mode):
    lab, peers = ipsec(mode)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    peers.client("c1", "psk1")
    peers.client("c3", "psk1")  # behind the NAT: main mode floats to 4500 at message 5
    peers.start_clients()
    peers.connect()
    for role in ("c1", "c3"):
        sa = peers.clients[role].wait_established("psk1")
        assert sa["version"] == "1"
        assert_on_server(d, peers, role)
    assert peers.server_of("c1") != peers.server_of("c3")  # rr
    assert_pings(peers, ["c1", "c3"])
    no_internal_errors(d)


@pytest.mark.parametrize("mode", MODES)
def test_rekeying_keeps_every_client_on_its_real_server(ipsec, run_director, mode):
    """Client- and server-initiated CHILD_SA and IKE_SA rekeys (IKEv2 c1, c2; IKEv1 c3 behind NAT)."""
    lab, peers = ipsec(mode)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    # charon keeps rekeyed CHILD_SAs (DELETED) for delete_rekeyed_delay (5 s) and will not
    # reauthenticate before they are gone ("unable to reauthenticate in CHILD_SA DELETED state")
    fast = "  delete_rekeyed_delay = 1"
    peers.client("c1", "psk", options=fast)
    peers.client("c2", "psk", options=fast)
    peers.client("c3", "psk1", options=fast)
    peers.start_clients()
    peers.connect()
    roles = ["c1", "c2", "c3"]
    home = {role: assert_on_server(d, peers, role) for role in roles}
    assert sorted(home.values()) == [0, 1, 2]

    def current(role):
        c = peers.clients[role]
        return c.wait_established(c.conn)

    def rekeyed(role, before, what):
        """Wait until the client's installed SA differs from ``before`` in ``what``."""
        def changed():
            sa = current(role)
            if what == "child":
                old = {ch["spi-in"] for ch in installed_children(before)}
                new = {ch["spi-in"] for ch in installed_children(sa)}
                return sa if new and not (new & old) else None
            return sa if sa["initiator-spi"] != before["initiator-spi"] else None
        return wait_for(changed, 10.0, f"{role}'s {what} rekey: {peers.clients[role].log()[-3000:]}")

    def check_all(step, in_table=True):
        for role in roles:
            rs = assert_on_server(d, peers, role, in_table=in_table)
            assert rs == home[role], f"after {step}: {role} moved from rs{home[role] + 1} to rs{rs + 1}"
            assert rs_addresses_of(d, peers.seen_as(role)) == {lab.rs_addrs[home[role]]}, (step, table(d))
        assert_pings(peers, roles)

    def server_sa(role):
        return ike_sa_of(peers.servers[home[role]], peers.clients[role].ike_id)

    def client_child(role):
        peers.clients[role].rekey(child=peers.clients[role].conn)

    def client_ike(role):  # by unique id: by name would also rekey IKEv1 SAs still REKEYING
        peers.clients[role].rekey(ike_id=current(role)["uniqueid"])

    def client_reauth(role):  # IKEv2: a new IKE_SA_INIT (break-before-make); IKEv1: a new main mode
        peers.clients[role].rekey(ike_id=current(role)["uniqueid"], reauth=True)

    def server_child(role):  # the real server starts CREATE_CHILD_SA (IKEv1: quick mode) itself
        peers.servers[home[role]].rekey(child_id=installed_children(server_sa(role))[0]["uniqueid"])

    def server_ike(role):  # IKEv2: the new IKE SA's initiator SPI is the server's; IKEv1: new main mode
        peers.servers[home[role]].rekey(ike_id=server_sa(role)["uniqueid"])

    marks = []  # (time, step): to place a lost echo

    def run(step, what, do, in_table=True):
        marks.append((time.time(), step))
        t0 = time.monotonic()
        before = {role: current(role) for role in roles}
        for role in roles:
            do(role)
        for role in roles:
            rekeyed(role, before[role], what)
        t1 = time.monotonic()
        check_all(step, in_table)
        print(f"{mode}: {step}: done in {t1 - t0:.2f}s, checked in {time.monotonic() - t1:.2f}s")

    # rekeys are make-before-break: a 20/s ping inside every tunnel keeps flowing across all four.
    # Tolerated (and printed): one lost echo, two for IKEv1 (c3). Seen twice in ~130 runs on a
    # loaded machine: one echo (nfqueue-dr), and c3 lost one at each of its two CHILD_SA rekeys
    # (nfqueue-nat); not reproduced in isolation (60 quick-mode rekeys at 100/s, 15 runs of this
    # sequence). A stall would lose many.
    vips = {role: peers.clients[role].virtual_ip(peers.clients[role].conn) for role in roles}
    started = time.time()
    pings = {role: lab.popen(role, ["ping", "-n", "-i", "0.05", "-W", "1", "-I", vips[role], PROTECTED],
                             stdout=subprocess.PIPE, text=True) for role in roles}  # fmt: skip
    try:
        run("client CHILD_SA rekey", "child", client_child, False)
        run("client IKE_SA rekey", "ike", client_ike, False)
        run("server CHILD_SA rekey", "child", server_child, False)
        run("server IKE_SA rekey", "ike", server_ike, False)
    finally:
        time.sleep(0.3)  # the last echo's answer
        for p in pings.values():
            p.send_signal(signal.SIGINT)
        summary = {role: p.communicate(timeout=5)[0] for role, p in pings.items()}
    for role, out in summary.items():
        sent, lost = lost_echoes(out)
        when = [(n, round((n - 1) * 0.05, 2)) for n in lost]  # (seq, ~seconds after start)
        steps = [(round(t - started, 2), step) for t, step in marks]
        if lost:
            print(f"{mode}: {role} lost echoes across the rekeys (seq, ~s): {when}; steps at {steps}")
        assert sent > 20 and len(lost) <= (2 if role == "c3" else 1), (f"{role}: echoes lost across the rekeys (seq, ~s): {when}; steps "
                                              f"at {steps}\n{out[-600:]}\n{peers.clients[role].log()[-4000:]}")  # fmt: skip
    check_all("the rekeys, traffic stopped")  # now DPD runs in the newest IKE SAs: in the table
    for role in ("c1", "c2"):
        wait_for(lambda r=role: all(ch.get("state") == "INSTALLED" for ch in current(r)["child-sas"].values()),
                 5.0, f"{role}'s rekeyed CHILD_SAs to go")  # fmt: skip
    run("client reauthentication", "ike", client_reauth)
    # every replaced conversation is superseded: it leaves within the INIT timeout (30 s here)
    # instead of counting as an active connection for the established timeout (3600 s)
    st = d.status()
    assert st["table"]["superseded"] >= len(roles), st["table"]
    for role in roles:
        newest = current(role)["initiator-spi"]
        for c in d.connections():
            if c["client"] == peers.seen_as(role) and c["state"] == "ESTABLISHED" and c["spi_i"] != newest:
                assert c["expires_in"] <= 30.5, (role, newest, d.connections())
    no_internal_errors(d)


@pytest.mark.parametrize("mode", MODES)
def test_client_restarted_reconnects_to_a_live_server(ipsec, run_director, mode):
    """c1 restarts cleanly, c2 after a crash: both back on their (live) servers; c3's server dies
    while c3 is down: the restarted c3 lands on a live one."""
    lab, peers = ipsec(mode)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    roles = ["c1", "c2", "c3"]
    for role in roles:
        peers.client(role)
    peers.start_clients()
    peers.connect()
    home = {role: assert_on_server(d, peers, role) for role in roles}
    c1, c2, c3 = (peers.clients[r] for r in roles)

    c1.stop()  # clean: charon deletes its SAs on the way out
    c2.kill()  # crash: its server still holds the old SA (replaced on INITIAL_CONTACT)
    c3.stop()
    dead = home["c3"]
    peers.servers[dead].kill()
    peers.start_clients([c1, c2, c3])
    peers.connect([c1, c2, c3], timeout=30)
    for role in roles:
        rs = assert_on_server(d, peers, role)
        if role == "c3":
            assert rs != dead
        else:
            assert rs == home[role]  # the server is alive: implicit persistence keeps the client there
        held = [sa for sa in peers.servers[rs].established() if sa["remote-id"] == peers.clients[role].ike_id]
        assert len(held) == 1, f"rs{rs + 1} holds {len(held)} SAs for {role}"
    assert_pings(peers, roles)
    no_internal_errors(d)
    assert d.status()["stats"]["rescheduled_stuck"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_cookie_and_invalid_ke_retries_stay_on_one_server(ipsec, run_director, mode):
    """IKE_SA_INIT three times with one SPI: COOKIE (RFC 7296 2.6), then INVALID_KE_PAYLOAD.

    The servers demand cookies as soon as one half-open SA exists (``cookie_threshold = 1``):
    "primers" c4..c6 (rr: one per server) send IKE_SA_INIT and then never reach 4500. The
    clients propose MODP-3072 first, the servers want Curve25519.
    """
    lab, peers = ipsec(mode, extra_clients=3)
    d = run_director(lab, scheduler="rr")
    peers.start_servers(options="  cookie_threshold = 1", ike_proposals="aes128-sha256-x25519")
    primers = [peers.client(r) for r in ("c4", "c5", "c6")]
    for p in primers:
        lab.run(p.role, ["iptables", "-w", "-A", "OUTPUT", "-p", "udp", "--dport", "4500", "-j", "DROP"])
    peers.start_clients(primers)
    parallel([lambda p=p: p.swanctl("--initiate", "--child", "psk", "--timeout", "1", check=False) for p in primers])
    for s in peers.servers:
        wait_for(lambda s=s: any(sa.get("state") == "CONNECTING" for sas in s.list_sas().values() for sa in sas),
                 5.0, f"a half-open SA on {s.name}")  # fmt: skip
    roles = ["c1", "c2", "c3"]
    clients = [peers.client(r, ike_proposals="aes128-sha256-modp3072,aes128-sha256-x25519") for r in roles]
    peers.start_clients(clients)
    peers.connect(clients)
    for role, c in zip(roles, clients):
        log = c.log()
        assert "received COOKIE notify" in log and "N(INVAL_KE)" in log, log[-3000:]
        inits = re.findall(r"sending packet: from \S+\[500\] to \S+\[500\] \((\d+) bytes\)", log)
        assert len(inits) >= 3, inits  # one SPI, three different IKE_SA_INIT messages
        assert_on_server(d, peers, role)
    assert sorted(peers.server_of(r) for r in roles) == [0, 1, 2]
    st = d.status()["stats"]
    assert st["rescheduled_stuck"] == 0 and st["internal_errors"] == 0, st  # retries are not retransmits
    assert_pings(peers, roles)


@pytest.mark.parametrize("how", ["crash", "stop"])
@pytest.mark.parametrize("mode", MODES)
def test_dead_real_server_moves_only_its_clients(ipsec, run_director, mode, how):
    """crash: SIGKILL, clients notice by DPD (1 s) + retransmits; stop: SIGTERM, the server sends
    DELETE and its clients re-initiate at once (close_action = start). Either way the director
    first sends them back to the dead server (implicit persistence) until the third retransmit of
    their IKE_SA_INIT (the passive health signal) moves them."""
    lab, peers = ipsec(mode, extra_clients=3)
    d = run_director(lab, scheduler="rr")
    roles = six_clients(peers)
    home = {role: assert_on_server(d, peers, role) for role in roles}
    victim = home["c1"]
    moved = [r for r in roles if home[r] == victim]
    stayed = [r for r in roles if home[r] != victim]
    assert len(moved) == 2
    before = {r: sa_key(peers.clients[r].wait_established("psk")) for r in stayed}

    t0 = time.monotonic()
    if how == "crash":
        peers.servers[victim].kill()
    else:
        peers.servers[victim].stop()

    def back(role):
        c = peers.clients[role]
        sas = c.established("psk")
        return bool(sas) and rs_of_vip(c.virtual_ip("psk")) not in (None, victim)

    wait_for(lambda: all(back(r) for r in moved), 40.0,
             "the dead server's clients to re-establish elsewhere:\n"
             + "\n".join(f"--- {r}\n{peers.clients[r].log()[-2500:]}" for r in moved))  # fmt: skip
    took = time.monotonic() - t0
    for role in moved:
        rs = assert_on_server(d, peers, role)
        assert rs != victim
    assert_pings(peers, roles, d=d)
    for role in stayed:  # the others never noticed: same IKE SA, same CHILD_SA, same server
        assert sa_key(peers.clients[role].wait_established("psk")) == before[role], role
        assert assert_on_server(d, peers, role) == home[role]
    status = d.status()
    st = status["stats"]
    assert st["internal_errors"] == 0
    assert st["rescheduled_stuck"] == len(moved), st
    active = {s["address"]: s["active"] for s in status["services"][0]["servers"]}
    print(f"{mode}/{how}: failover of {moved} took {took:.1f}s; active per server {active}; stats {st}")


# A false "down" here expires live clients' entries (expire_on_down): the timeout leaves room for a
# loaded machine (0.2 s was seen to time out while a benchmark saturated the other core).
HEALTH = "health = { interval = 0.5, timeout = 0.4, rise = 2, fall = 2, expire_on_down = true }"
INIT_RETRANSMIT = re.compile(r"retransmit \d+ of request with message ID 0\b")


@pytest.mark.parametrize("mode", MODES)
def test_health_checks_move_a_dead_servers_clients_at_their_first_try(ipsec, run_director, mode):
    """IKE probes with real charon responders: rs of c1 is killed, the probes mark it down within
    fall x interval, its entries go (expire_on_down), and its clients' new IKE_SA_INIT (after their
    DPD gives up) lands on a live server at once (within its first retransmission at most), with
    no passive-signal reschedule. The server comes back: the probes bring it up and it takes new clients again."""
    lab, peers = ipsec(mode, extra_clients=6)
    d = run_director(lab, scheduler="rr", extra_service=HEALTH)
    roles = six_clients(peers)

    def servers():
        return {s["address"]: s for s in d.status()["services"][0]["servers"]}

    wait_for(lambda: all(s["health"]["checks"] >= 2 and s["up"] for s in servers().values()), 5.0,
             f"every charon to answer the probes: {servers()}")  # fmt: skip
    home = {role: assert_on_server(d, peers, role) for role in roles}
    for s in peers.servers:  # probes are refused (NO_PROPOSAL_CHOSEN) and leave no half-open SA
        assert "received proposals unacceptable" in s.log() or "no IKE config found" in s.log(), s.log()[-2000:]
        assert not [sa for sas in s.list_sas().values() for sa in sas if sa.get("remote-host") == lab.director_lan], \
            s.list_sas()
    victim = home["c1"]
    victim_addr = lab.rs_addrs[victim]
    moved = [r for r in roles if home[r] == victim]
    stayed = [r for r in roles if home[r] != victim]
    before = {r: sa_key(peers.clients[r].wait_established("psk")) for r in stayed}
    inits_before = {r: len(INIT_RETRANSMIT.findall(peers.clients[r].log())) for r in moved}

    t0 = time.monotonic()
    peers.servers[victim].kill()
    wait_for(lambda: not servers()[victim_addr]["up"], 4.0, f"rs{victim + 1} marked down: {servers()}")
    down_after = time.monotonic() - t0
    assert not any(c["rs_address"] == victim_addr for c in d.connections()), table(d)  # expire_on_down

    def back(role):
        c = peers.clients[role]
        return bool(c.established("psk")) and rs_of_vip(c.virtual_ip("psk")) not in (None, victim)

    wait_for(lambda: all(back(r) for r in moved), 30.0,
             "the dead server's clients to re-establish elsewhere:\n"
             + "\n".join(f"--- {r}\n{peers.clients[r].log()[-2500:]}" for r in moved))  # fmt: skip
    moved_after = time.monotonic() - t0
    for role in moved:
        assert assert_on_server(d, peers, role) != victim
        again = len(INIT_RETRANSMIT.findall(peers.clients[role].log())) - inits_before[role]
        # expected 0; 1 tolerated: a packet lost to a busy machine (seen only while another lab
        # flooded the shared per-CPU backlog). Without the probes the passive signal needs 3.
        assert again <= 1, f"{role} had to retransmit its IKE_SA_INIT {again} times:\n{peers.clients[role].log()[-3000:]}"
    for role in stayed:  # the others never noticed
        assert sa_key(peers.clients[role].wait_established("psk")) == before[role], role
        assert assert_on_server(d, peers, role) == home[role]
    assert_pings(peers, roles)
    st = d.status()["stats"]
    assert st["rescheduled_stuck"] == 0, st  # the probes, not the passive signal, moved them
    assert servers()[victim_addr]["health"]["last_error"] == "timeout"

    # it comes back: up after `rise` answers, and rr gives it one of the next three clients
    peers.servers[victim].start()
    peers.servers[victim].load()
    wait_for(lambda: servers()[victim_addr]["up"], 4.0, f"rs{victim + 1} back up: {servers()}")
    up_after = time.monotonic() - t0
    late = [peers.client(r) for r in ("c7", "c8", "c9")]
    peers.start_clients(late)
    peers.connect(late)
    assert sorted(assert_on_server(d, peers, r) for r in ("c7", "c8", "c9")) == [0, 1, 2]
    assert_pings(peers, ["c7", "c8", "c9"])
    assert d.status()["stats"]["health_flips"] == 2
    no_internal_errors(d)
    print(f"{mode}: rs{victim + 1} down after {down_after:.2f}s, its clients {moved} elsewhere after "
          f"{moved_after:.2f}s, back up after {up_after:.2f}s")
