"""DR with the director as the real servers' gateway (``return_path = "director"``), real peers.

The lab's real servers route everything via the director (``Lab(return_via_director=True)``), the
VIP is on the director's eth0 and on each server's lo. Their replies (source: the VIP) come back
through the director, which forwards those of known conversations from the server that owns them
and drops the rest. Each test runs once per dataplane (``run_director``); DR, and TUN for the first
test only, to keep CI short (TUN replies are the same plain IP packets from the VIP).

A missing prerequisite (root, charon, swanctl, ping) fails, never skips.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest

from director.lab import craft
from director.lab.strongswan import Peers, ike_sa_of, parallel, strongswan_prerequisites
from director.packet import build_ipv4, build_ipv4_udp, ip_to_int
from director.lab.wait import wait_for

RETURN = 'return_path = "director"'


@pytest.fixture
def rp_lab(make_lab, run_director):
    """Factory: ``rp_lab(mode="dr")`` -> (lab, Peers): a DR (or TUN) lab whose real servers route via
    the director.

    Requests ``run_director`` so that the peers stop before the daemon and the lab go."""
    missing = strongswan_prerequisites()
    if missing:
        pytest.fail("strongSwan prerequisites missing: " + "; ".join(missing), pytrace=False)
    made: list[Peers] = []

    def make(mode: str = "dr"):
        lab = make_lab(mode, responders=False, return_via_director=True)
        peers = Peers(lab)
        made.append(peers)
        return lab, peers

    yield make
    for peers in made:
        peers.stop()


def drops(d, reason: str) -> int:
    return d.status()["drops"].get(reason, 0)


def returned(d) -> int:
    """Replies the director forwarded on the return path: the queue's and the eBPF program's."""
    st = d.status()
    return st["stats"]["returned"] + st.get("fastpath", {}).get("returned", 0)


def send_raw(lab, role: str, packets: list[bytes]) -> None:
    """Send crafted IPv4 packets (any source) from ``role`` with an IP_HDRINCL socket."""
    s = lab.socket(role, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in packets:
        s.sendto(p, (socket.inet_ntoa(p[16:20]), 0))


def assert_default_via_director(lab) -> None:
    for role in lab.rs_roles:
        out = lab.run(role, ["ip", "route", "get", lab.client_addrs["c1"], "from", lab.vip]).stdout
        assert f"via {lab.director_lan} " in out, f"{role}: {out}"


@pytest.mark.parametrize("mode", ["dr", "tun"])
def test_clients_establish_ping_rekey_and_stay(rp_lab, run_director, mode):
    """c1, c2 (IKEv2) and c3 (IKEv1 behind the NAT): established through the director both ways,
    pings inside the tunnels, client- and server-initiated rekeys, everyone stays on its server.
    Also in TUN mode (the one test that is: its replies are the same plain packets from the VIP)."""
    lab, peers = rp_lab(mode)
    assert_default_via_director(lab)
    d = run_director(lab, scheduler="rr", extra_service=RETURN)
    peers.start_servers()
    fast = "  delete_rekeyed_delay = 1"
    for role, kind in (("c1", "psk"), ("c2", "psk"), ("c3", "psk1")):
        peers.client(role, kind, options=fast)
    peers.start_clients()
    peers.connect()
    roles = ["c1", "c2", "c3"]
    home = {r: peers.server_of(r) for r in roles}
    assert sorted(home.values()) == [0, 1, 2], home  # rr: one client per server

    def check(step: str) -> None:
        for r in roles:
            assert peers.server_of(r) == home[r], f"after {step}: {r} left rs{home[r] + 1}"
            est = [c for c in d.connections() if c["client"] == peers.seen_as(r) and c["state"] == "ESTABLISHED"]
            assert est and {c["rs_address"] for c in est} == {lab.rs_addrs[home[r]]}, (step, d.connections())
        results = dict(zip(roles, parallel([lambda r=r: peers.ping(r, count=3) for r in roles])))
        assert all(sent == got for sent, got in results.values()), f"after {step}: pings lost {results}"

    check("connect")
    before = returned(d)
    assert before > 0, d.status()  # the servers' answers came through the director

    def current(r):
        return peers.clients[r].wait_established(peers.clients[r].conn)

    def rekeyed(r, old, what):
        def changed():
            sa = current(r)
            if what == "ike":
                return sa["initiator-spi"] != old["initiator-spi"] or sa["uniqueid"] != old["uniqueid"]
            new = {ch["spi-in"] for ch in sa["child-sas"].values() if ch.get("state") == "INSTALLED"}
            had = {ch["spi-in"] for ch in old["child-sas"].values()}
            return new and not (new & had)
        wait_for(changed, 15.0, f"{r}'s {what} rekey:\n{peers.clients[r].log()[-3000:]}")

    for step, what, do in (
        ("client CHILD_SA rekey", "child", lambda r: peers.clients[r].rekey(child=peers.clients[r].conn)),
        ("client IKE_SA rekey", "ike", lambda r: peers.clients[r].rekey(ike_id=current(r)["uniqueid"])),
        ("server IKE_SA rekey", "ike",
         lambda r: peers.servers[home[r]].rekey(ike_id=ike_sa_of(peers.servers[home[r]], peers.clients[r].ike_id)["uniqueid"])),
    ):  # fmt: skip
        old = {r: current(r) for r in roles}
        for r in roles:
            do(r)
        for r in roles:
            rekeyed(r, old[r], what)
        check(step)
    assert returned(d) > before
    st = d.status()
    if st["dataplane"] == "ebpf":  # the tunnels' ESP-in-UDP answers went through the reply program
        assert st["fastpath"]["returned"] > 0, st["fastpath"]
    assert st["stats"]["internal_errors"] == 0, st
    for reason in ("RETURN_NO_CONVERSATION", "RETURN_WRONG_SERVER", "RESPONDER_SPI_MISMATCH"):
        assert drops(d, reason) == 0, (reason, st["drops"], st.get("fastpath"))


def test_forged_replies_from_the_vip_are_dropped_and_counted(rp_lab, run_director):
    """A host on the server LAN that owns no conversation (the lab's ``gw``) and a real server that
    does not own c1's conversation send packets with the VIP as source to c1's IKE and ESP-in-UDP
    ports: none reaches c1; each is counted; c1's tunnel keeps working."""
    lab, peers = rp_lab()
    d = run_director(lab, scheduler="rr", extra_service=RETURN)
    peers.start_servers()
    peers.client("c1", "psk")
    peers.start_clients()
    peers.connect()
    home = peers.server_of("c1")
    other = lab.rs_roles[(home + 1) % 3]
    c1 = lab.client_addr_ints["c1"]
    # gw's own route to c1 is on the wan: send its forgeries the way a real server's go, via the director
    lab.run("gw", ["ip", "route", "replace", f"{lab.client_addrs['c1']}/32", "via", lab.director_lan, "dev", "eth1"])
    sniff = lab.socket("c1", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    sniff.settimeout(0.2)
    marker = b"FORGED-" + random.randbytes(8)
    n = 20
    forged = []
    for i in range(n):  # ESP-in-UDP to c1's NAT-T port, and an IKE message of a made-up IKE SA
        forged.append(build_ipv4_udp(lab.vip_int, c1, 4500, 4500, struct.pack(">II", 0x1000 + i, i + 1) + marker))
        forged.append(craft.ike(lab.vip_int, c1, 0xBAD0 + i, 7, body=marker))
    ping = build_ipv4(lab.vip_int, c1, 1, b"\x08\x00\xf7\xff" + b"\0" * 4)  # ICMP echo: not IPsec
    wrong0, none0, other0 = (drops(d, r) for r in ("RETURN_WRONG_SERVER", "RETURN_NO_CONVERSATION", "RETURN_NOT_IPSEC"))
    for role in ("gw", other):
        send_raw(lab, role, forged + [ping])
    seen = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            data = sniff.recv(4096)
        except (TimeoutError, socket.timeout):
            continue
        if marker in data:
            seen.append(data)
    assert not seen, f"{len(seen)} forged packets reached c1"
    # ESP-in-UDP of c1's conversation from the wrong host: wrong server; the IKE SPIs are nobody's
    # but c1 has a conversation, so those are judged by it (its server): wrong server too
    wait_for(lambda: drops(d, "RETURN_WRONG_SERVER") - wrong0 == 2 * 2 * n, 3.0,
             f"{4 * n} forged packets counted as RETURN_WRONG_SERVER: {d.status()['drops']}")
    assert drops(d, "RETURN_NOT_IPSEC") - other0 == 2, d.status()["drops"]
    assert drops(d, "RETURN_NO_CONVERSATION") == none0
    assert peers.server_of("c1") == home
    sent, got = peers.ping("c1", count=3)
    assert sent == got, (sent, got)


def test_spoofed_ike_sa_init_flood_never_gets_past_init(rp_lab, run_director):
    """200 IKE_SA_INIT from spoofed sources, then an IKE_AUTH from each with a guessed responder
    SPI: every entry stays INIT (the guess is not what the real server answered), every guess is
    counted; a real client connects meanwhile and stays ESTABLISHED."""
    lab, peers = rp_lab()
    d = run_director(lab, scheduler="rr", extra_service=RETURN)
    peers.start_servers()
    n = 200
    base = ip_to_int("198.18.0.128")
    rng = random.Random(7)
    spis = [rng.getrandbits(64) | 1 for _ in range(n)]
    inits = [craft.ike(base + (i % 100), lab.vip_int, spis[i], sport=1000 + i) for i in range(n)]
    send_raw(lab, "c2", inits)
    wait_for(lambda: sum(1 for c in d.connections() if c["state"] == "INIT") >= n, 5.0,
             f"{n} INIT entries: {len(d.connections())}")  # fmt: skip
    mismatch0 = drops(d, "RESPONDER_SPI_MISMATCH")
    guesses = [craft.ike(base + (i % 100), lab.vip_int, spis[i], rng.getrandbits(64) | 1, sport=1000 + i)
               for i in range(n)]  # fmt: skip
    send_raw(lab, "c2", guesses)
    wait_for(lambda: drops(d, "RESPONDER_SPI_MISMATCH") - mismatch0 == n, 5.0,
             f"{n} guesses refused: {d.status()['drops']}")  # fmt: skip
    spoofed = [c for c in d.connections() if ip_to_int(c["client"]) - base in range(100)]
    assert len(spoofed) == n and all(c["state"] == "INIT" for c in spoofed), spoofed
    peers.client("c1", "psk")
    peers.start_clients()
    peers.connect()
    est = [c for c in d.connections() if c["client"] == lab.client_addrs["c1"]]
    assert [c["state"] for c in est] == ["ESTABLISHED"], est
