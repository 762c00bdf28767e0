"""ICMP errors about a client's conversation reach its real server, in every mode and both dataplanes.

A router on the client's path (here c2's namespace, sending from its own address) answers a packet
the VIP sent to c1 with "fragmentation needed": it quotes the VIP's packet (source VIP, destination
c1). The real server that holds c1's conversation must receive it (NAT: with the outer destination
and the quoted source rewritten to its own address, checksums right), no other server may, and an
error about no conversation is dropped and counted. The packets are built by scapy and sent from a
raw socket in the client namespace; the real servers record what their kernel delivered. Both
dataplanes (the eBPF one with its tc hook and its XDP hook).
"""

from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.packet import ike_header

MODES = ["dr", "tun", "nat"]


def _error_about(router: str, vip: str, quoted) -> bytes:
    """What a router sends to the VIP: frag-needed (MTU 1400) quoting header + 8 bytes (RFC 792)."""
    head = bytes(quoted)[:28]
    return bytes(IP(src=router, dst=vip, ttl=63) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(head))


def _wait(pred, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("mode", MODES)
def test_frag_needed_reaches_the_clients_real_server(make_lab, run_director, mode):
    lab = make_lab(mode)
    check_relay(lab, run_director(lab, scheduler="rr"), mode)


@pytest.mark.parametrize("mode", MODES)
def test_frag_needed_reaches_the_clients_real_server_through_the_xdp_hook(make_lab, mode):
    from test_fastpath import XDP, xdp_lab

    lab = make_lab(mode)
    xdp_lab(lab)
    d = DirectorProcess(lab, dataplane="ebpf", daemon_extra=XDP, scheduler="rr").start()
    try:
        check_relay(lab, d, mode)
    finally:
        assert d.stop() == 0, d.log()


def check_relay(lab, d, mode: str) -> None:
    c1, c2 = LabClient(lab, "c1"), LabClient(lab, "c2")
    c1_addr, c2_addr = lab.client_addrs["c1"], lab.client_addrs["c2"]
    c1.ikev2_connect()
    c2.ikev2_connect()
    c1.send_esp(0x1000, 1)
    seen = {}
    for name, addr in (("c1", c1_addr), ("c2", c2_addr)):
        hits = _wait(lambda a=addr: [i for i in range(3) if any(r["src"] == a for r in lab.received(i))])
        assert len(hits) == 1, f"{name} reached {hits}"
        seen[name] = hits[0]
    rs = seen["c1"]
    assert seen["c2"] != rs  # rr: the two conversations sit on different servers

    # the VIP's packets to c1, as the router saw them: an IKE answer on 4500 (where IKEv2 moved the
    # conversation, behind the non-ESP marker) and ESP
    ike_quote = IP(src=lab.vip, dst=c1_addr, flags="DF") / UDP(sport=4500, dport=4500) / Raw(
        bytes(4) + ike_header(0x1111, 0x2222, 35, flags=0x20, body=bytes(1500)))
    esp_quote = IP(src=lab.vip, dst=c1_addr, flags="DF", proto=50) / Raw(bytes.fromhex("c0ffee01") + bytes(1400))
    stranger = IP(src=lab.vip, dst="198.18.0.99", flags="DF") / UDP(sport=500, dport=500) / Raw(bytes(100))
    router = lab.socket("c2", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for quoted in (ike_quote, esp_quote, stranger):
        router.sendto(_error_about(c2_addr, lab.vip, quoted), (lab.vip, 0))

    got = _wait(lambda: len(lab.received_icmp(rs)) >= 2 and lab.received_icmp(rs))
    assert got and len(got) == 2, f"real server {rs}: {[lab.received_icmp(i) for i in range(3)]}\n{d.status()}"
    time.sleep(0.3)  # anything misrouted has had time to arrive too
    assert [lab.received_icmp(i) for i in range(3) if i != rs] == [[], []]
    assert len(lab.received_icmp(rs)) == 2
    rip = lab.rs_addrs[rs]
    addr = rip if mode == "nat" else lab.vip  # NAT: both VIPs become the real server's address
    for rec, proto in zip(sorted(got, key=lambda r: r["quote"]["proto"]), (17, 50)):
        assert (rec["src"], rec["dst"], rec["type"], rec["code"], rec["mtu"]) == (c2_addr, addr, 3, 4, 1400)
        q = rec["quote"]
        assert (q["src"], q["dst"], q["proto"], q["ip_ok"], rec["icmp_ok"]) == (addr, c1_addr, proto, True, True)
        if proto == 17:
            assert (q["sport"], q["dport"]) == (4500, 4500)
    st = d.status()
    assert st["drops"].get("ICMP_NO_ENTRY") == 1, st["drops"]
    in_kernel = st.get("fastpath", {}).get("forwarded", {}).get("NOT_OURS", 0)  # eBPF: DR and TUN relayed there
    assert st["stats"]["icmp_relayed"] + in_kernel == 2 and st["stats"]["internal_errors"] == 0, st
    if d.status()["dataplane"] == "ebpf" and mode != "nat":
        assert in_kernel >= 1, st  # at least the ESP one: c1's ESP conversation is in the clients map
    assert st["entries"] == 2  # the errors created nothing
