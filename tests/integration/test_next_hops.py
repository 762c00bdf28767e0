"""The fast path's cached next hops (daemon.fastpath_fib = "cached", the default) follow the kernel:
a real server's new MAC address, or a route that moves it behind another interface, reaches the
``servers`` map within a second, and its clients' ESP keeps arriving, forwarded in the kernel."""

from __future__ import annotations

import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import RS_ROLES
from director.lab.wait import wait_for

FOLLOW_WITHIN = 1.0  # seconds: docs/fastpath.md, "Next hops"


def esp_at(lab, spi: int) -> dict[int, int]:
    out = {}
    for i in range(3):
        n = sum(1 for r in lab.received(i) if r["kind"] == "esp" and r["spi"] == spi)
        if n:
            out[i] = n
    return out


def established(lab, d) -> tuple[LabClient, int]:
    """c1 established; its ESP forwarded by the kernel; returns the client and its server's index."""
    c1 = LabClient(lab, "c1")
    c1.ikev2_connect()
    wait_for(lambda: d.status()["fastpath"]["clients"] >= 1, what="c1 in the clients map")
    c1.send_esp(0xA1, 1)
    wait_for(lambda: esp_at(lab, 0xA1), what="c1's first ESP at a real server")
    (i,) = esp_at(lab, 0xA1)
    return c1, i


def next_hop(d, addr: str) -> dict:
    return d.status()["fastpath"]["next_hops"][addr]


def mac_of(lab, role: str, dev: str) -> str:
    return lab.run(role, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()


def follow(d, addr: str, want: dict, t0: float) -> float:
    """Seconds from t0 until the daemon's next hop for addr holds ``want``; fails after FOLLOW_WITHIN."""
    wait_for(lambda: all(next_hop(d, addr).get(k) == v for k, v in want.items()), timeout=FOLLOW_WITHIN,
             interval=0.01, what=f"the next hop of {addr} to become {want} (now {next_hop(d, addr)})")  # fmt: skip
    return time.monotonic() - t0


def esp_arrives_in_the_kernel(lab, d, c1: LabClient, i: int, spi: int) -> None:
    slow = d.status()["stats"]["packets"]
    for seq in range(1, 21):
        c1.send_esp(spi, seq)
    wait_for(lambda: esp_at(lab, spi).get(i) == 20, what=f"20 ESP packets at real server {i}")
    assert esp_at(lab, spi) == {i: 20}
    assert d.status()["stats"]["packets"] == slow  # forwarded by the fast path, not the daemon


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_a_real_servers_new_mac_is_followed(make_lab, hook):
    lab = make_lab("dr")
    extra = ""
    if hook == "xdp":
        from test_fastpath import XDP, xdp_lab

        xdp_lab(lab)
        extra = XDP
    d = DirectorProcess(lab, dataplane="ebpf", daemon_extra=extra).start()
    try:
        assert d.status()["fastpath"]["fib"] == "cached"
        c1, i = established(lab, d)
        rs, addr = RS_ROLES[i], lab.rs_addrs[i]
        old = next_hop(d, addr)
        assert old["resolved"] and old["mac"] == mac_of(lab, rs, "eth0")
        new_mac = "02:00:5e:10:00:%02x" % (i + 1)
        # The server is replaced by a box with another MAC; the director's kernel learns it (as from
        # its gratuitous ARP). Until the map follows, its ESP would go to the old MAC and be dropped.
        lab.run(rs, ["ip", "link", "set", "eth0", "address", new_mac])
        t0 = time.monotonic()
        lab.run("director", ["ip", "neigh", "replace", addr, "lladdr", new_mac, "dev", "eth1", "nud", "reachable"])
        took = follow(d, addr, {"resolved": True, "mac": new_mac, "ifindex": old["ifindex"]}, t0)
        print(f"new MAC followed in {took:.3f} s")
        esp_arrives_in_the_kernel(lab, d, c1, i, 0xA2)
    finally:
        assert d.stop() == 0, d.log()


def test_a_real_server_moved_to_another_interface_is_followed(make_lab):
    """A second link between the director and the real server; the route to the server moves to
    it: the next hop's interface and MACs follow, and the ESP arrives over the new link."""
    lab = make_lab("dr")
    d = DirectorProcess(lab, dataplane="ebpf").start()
    try:
        c1, i = established(lab, d)
        rs, addr = RS_ROLES[i], lab.rs_addrs[i]
        lab.run("director", ["ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9", "netns",
                             lab.ns[rs]])  # fmt: skip
        lab.run(rs, ["sysctl", "-qw", "net.ipv4.conf.eth9.rp_filter=0"])
        for role in ("director", rs):
            lab.run(role, ["ip", "link", "set", "eth9", "up"])
        rs_mac = mac_of(lab, rs, "eth9")
        before = {r["spi"] for r in lab.received(i)}
        lab.run("director", ["ip", "neigh", "replace", addr, "lladdr", rs_mac, "dev", "eth9", "nud", "permanent"])
        ifindex = int(lab.run("director", ["cat", "/sys/class/net/eth9/ifindex"]).stdout)
        assert next_hop(d, addr)["ifindex"] != ifindex  # a neighbour entry alone moves nothing
        t0 = time.monotonic()
        lab.run("director", ["ip", "route", "replace", f"{addr}/32", "dev", "eth9"])
        took = follow(d, addr, {"resolved": True, "ifindex": ifindex, "mac": rs_mac,
                                "source_mac": mac_of(lab, "director", "eth9")}, t0)  # fmt: skip
        print(f"moved route followed in {took:.3f} s")
        # the frames now leave by eth9: counted there, not on eth1
        tx9 = int(lab.run("director", ["cat", "/sys/class/net/eth9/statistics/tx_packets"]).stdout)
        esp_arrives_in_the_kernel(lab, d, c1, i, 0xA3)
        assert int(lab.run("director", ["cat", "/sys/class/net/eth9/statistics/tx_packets"]).stdout) - tx9 >= 20
        assert 0xA3 not in before
    finally:
        assert d.stop() == 0, d.log()
