"""Real IPsec peers over IPv6: strongSwan road warriors to the IPv6 VIP of a dual-stack director,
charon responders on the real servers, DR, TUN (ip6ip6) and NAT66, both dataplanes (``run_director``). The
tunnels carry IPv4 inside (virtual IPs from each server's pool); the outer packets are IPv6 IKE
and ESP-in-UDP (kernel-libipsec always encapsulates). A missing prerequisite fails, never skips.
"""

from __future__ import annotations

import re
import time

import pytest

from director.lab.strongswan import (
    Peers,
    Pki,
    ike_sa_of,
    installed_children,
    parallel,
    pool_of,
    rs_of_vip,
    sa_key,
    strongswan_prerequisites,
)
from director.lab.wait import wait_for

MODES = ["dr", "tun", "nat"]
NFQUEUE_COPY = 4016
SPLIT = r"splitting IKE message \((\d+) bytes\)"
SENT_4500 = r"sending packet: from \S+\[4500\] to \S+\[4500\] \((\d+) bytes\)"


@pytest.fixture
def ipsec6(make_lab, run_director):
    """Factory: ``ipsec6(mode, pki=False)`` -> (lab, Peers) in a dual-stack lab; peers stop before
    the daemon and the lab."""
    missing = strongswan_prerequisites()
    if missing:
        pytest.fail("strongSwan prerequisites missing: " + "; ".join(missing), pytrace=False)
    made: list[Peers] = []

    def make(mode: str, *, pki: bool = False):
        lab = make_lab(mode, responders=False, ipv6=True)
        peers = Peers(lab, pki=Pki.shared() if pki else None)
        made.append(peers)
        return lab, peers

    yield make
    for peers in made:
        peers.stop()


def rs_addr(lab, peers: Peers, role: str, rs: int) -> str:
    return (lab.rs_addrs6 if peers.clients[role].family == 6 else lab.rs_addrs)[rs]


def on_server(d, peers: Peers, role: str) -> int:
    """The client's SA is on one real server, its virtual IP from that server's pool, and the
    director's entry for the IKE SA (by the client's address of its family) points there."""
    c = peers.clients[role]
    sa = c.wait_established(c.conn)
    rs = peers.server_of(role)
    assert rs is not None, f"no real server has {c.ike_id}'s SA"
    assert rs_of_vip(c.virtual_ip(c.conn)) == rs, f"{role}: virtual IP not from {pool_of(rs)}"
    want = peers.seen_as(role)

    def entry():
        return next((e for e in d.connections() if e["client"] == want and e["spi_i"] == sa["initiator-spi"]), None)

    e = wait_for(entry, 5.0, f"{role}'s IKE SA in the director's table: {d.connections()}")
    assert e["rs_address"] == rs_addr(peers.lab, peers, role, rs) and e["state"] == "ESTABLISHED", e
    return rs


def pings(peers: Peers, roles) -> None:
    roles = list(roles)
    got = dict(zip(roles, parallel([lambda r=r: peers.ping(r, count=3) for r in roles])))
    assert all(v[0] == v[1] for v in got.values()), f"pings lost (sent, received): {got}"


@pytest.mark.parametrize("mode", MODES)
def test_ikev2_and_ikev1_over_ipv6_next_to_an_ipv4_client(ipsec6, run_director, mode):
    """Dual stack at once: c1 IKEv2 PSK and c2 IKEv1 main mode over IPv6, c3 (behind the NAT)
    IKEv2 over IPv4, one cluster; each lands on a server, carries pings inside its tunnel, and
    the rr scheduler of the IPv6 service spreads its two clients."""
    lab, peers = ipsec6(mode)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    peers.client("c1", "psk", family=6)
    peers.client("c2", "psk1", family=6)
    peers.client("c3", "psk")
    peers.start_clients()
    peers.connect()
    home = {role: on_server(d, peers, role) for role in ("c1", "c2", "c3")}
    assert home["c1"] != home["c2"]
    assert peers.clients["c2"].wait_established("psk1")["version"] == "1"
    pings(peers, ["c1", "c2", "c3"])
    vips = {e["vip"] for e in d.connections()}
    assert vips == {lab.vip, lab.vip6}
    assert d.status()["stats"]["internal_errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_certificates_over_ipv6_with_and_without_ike_fragmentation(ipsec6, run_director, mode):
    """A ~5 KB IKE_AUTH over IPv6: split by RFC 7383 for c1, one datagram fragmented by the
    client's kernel (IPv6 fragment headers; only the source fragments) for c2, reassembled before
    the queue; both establish without a retransmission and carry pings."""
    lab, peers = ipsec6(mode, pki=True)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    frag = peers.client("c1", "cert", cert="frag6", fragmentation="yes", family=6)
    whole = peers.client("c2", "cert", cert="nofrag6", fragmentation="no", family=6)
    peers.start_clients()
    peers.connect()
    split = [int(n) for n in re.findall(SPLIT, frag.log())]
    assert split and split[0] > NFQUEUE_COPY, frag.log()[-3000:]
    sizes = [int(n) for n in re.findall(SENT_4500, whole.log())]
    assert sizes and sizes[0] > NFQUEUE_COPY, whole.log()[-3000:]
    for role, c in (("c1", frag), ("c2", whole)):
        on_server(d, peers, role)
        assert [line for line in c.log().splitlines() if "retransmit" in line] == [], c.log()[-3000:]
    pings(peers, ["c1", "c2"])
    assert d.status()["stats"]["internal_errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_rekeys_keep_ipv6_clients_on_their_servers_and_a_dead_server_moves_them(ipsec6, run_director, mode):
    """CHILD_SA and IKE_SA rekeys by the client keep each IPv6 client on its server; then the
    server of c1 is killed and c1 re-establishes elsewhere (the passive health signal moves it)
    while c2 keeps its SAs and its server."""
    lab, peers = ipsec6(mode)
    d = run_director(lab, scheduler="rr")
    peers.start_servers()
    fast = "  delete_rekeyed_delay = 1"
    for role in ("c1", "c2"):
        peers.client(role, "psk", family=6, options=fast)
    peers.start_clients()
    peers.connect()
    home = {role: on_server(d, peers, role) for role in ("c1", "c2")}
    assert home["c1"] != home["c2"]
    for what in ("child", "ike"):
        before = {r: peers.clients[r].wait_established("psk") for r in home}
        for r in home:
            if what == "child":
                peers.clients[r].rekey(child="psk")
            else:
                peers.clients[r].rekey(ike_id=before[r]["uniqueid"])

        def changed(r, b=before, w=what):
            sa = peers.clients[r].wait_established("psk")
            if w == "child":
                old = {ch["spi-in"] for ch in installed_children(b[r])}
                new = {ch["spi-in"] for ch in installed_children(sa)}
                return bool(new) and not new & old
            return sa["initiator-spi"] != b[r]["initiator-spi"]

        for r in home:
            wait_for(lambda r=r: changed(r), 10.0, f"{r}'s {what} rekey")
            assert peers.server_of(r) == home[r], f"{r} moved after the {what} rekey"
        pings(peers, home)
    kept = sa_key(peers.clients["c2"].wait_established("psk"))
    victim = home["c1"]
    peers.servers[victim].kill()
    t0 = time.monotonic()

    def back() -> bool:
        c = peers.clients["c1"]
        return bool(c.established("psk")) and rs_of_vip(c.virtual_ip("psk")) not in (None, victim)

    wait_for(back, 40.0, "c1 to re-establish away from its dead server:\n" + peers.clients["c1"].log()[-2500:])
    assert on_server(d, peers, "c1") != victim
    assert sa_key(peers.clients["c2"].wait_established("psk")) == kept
    assert peers.server_of("c2") == home["c2"] and ike_sa_of(peers.servers[home["c2"]], peers.clients["c2"].ike_id)
    pings(peers, ["c1", "c2"])
    st = d.status()["stats"]
    assert st["internal_errors"] == 0 and st["rescheduled_stuck"] >= 1, st
    print(f"{mode}: c1 moved off rs{victim + 1} in {time.monotonic() - t0:.1f}s")
