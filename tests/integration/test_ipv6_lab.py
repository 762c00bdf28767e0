"""IPv6 services in the lab: a dual-stack director (an IPv4 and an IPv6 VIP on the same real
servers) in DR, TUN (ip6ip6, decapsulated by the lab's real servers) and NAT66, with the NFQUEUE
dataplane alone and with the eBPF fast path loaded (DR and NAT66 forwarded in the kernel, the
rest passed to the queue). Real packets from real sockets, observed by the real servers'
responders."""

from __future__ import annotations

import socket
import time

import pytest

from director.lab.client import LabClient
from director.packet import EspHeader, build_ipv6, ip_to_int
from test_dataplane import where
from test_fastpath import XDP, esp_at, xdp_lab

MODES = ["dr", "tun", "nat"]
FASTPATH_MODES = ["dr", "nat"]  # the eBPF programs forward IPv6 by DR and NAT66; TUN envelopes are the queue's
V6 = socket.AF_INET6


def wait_where(lab, pred, timeout: float = 3.0) -> dict[int, list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        hits = where(lab, pred)
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
def test_dual_stack_clients_establish_and_their_esp_follows(make_lab, run_director, mode):
    lab = make_lab(mode, ipv6=True)
    d = run_director(lab, scheduler="rr")
    c1, c2 = LabClient(lab, "c1", V6), LabClient(lab, "c2", V6)
    c1v4 = LabClient(lab, "c1")
    for c in (c1, c2, c1v4):
        spi_i, spi_r, src = c.ikev2_connect()
        assert src == c.vip  # answered from the VIP of its family (NAT66: rewritten on the way back)
        c.send_esp(0x1000, 1)
        if mode != "nat":
            c.send_ah(0x2000)
        c.send_ike(spi_i, spi_r, natt=True)
    want = {"ike", "ike_natt", "esp"} | ({"ah"} if mode != "nat" else set())
    seen = {}
    for c in (c1, c2, c1v4):
        hits = wait_where(lab, lambda r, a=c.addr: r["src"] == a and r["kind"] == "esp")
        hits = where(lab, lambda r, a=c.addr: r["src"] == a)
        assert len(hits) == 1, f"{c.addr}'s packets reached several real servers: {hits}"
        (rs, records), = hits.items()
        assert {r["kind"] for r in records} == want, records
        if mode in ("dr", "tun"):
            assert {r["dst"] for r in records} == {c.vip}  # DR, or TUN once decapsulated: addressed to the VIP
        else:
            assert {r["dst"] for r in records} == {(lab.rs_addrs6 if c.family == V6 else lab.rs_addrs)[rs]}
        seen[c.addr] = rs
    assert seen[c1.addr] != seen[c2.addr]  # rr over the IPv6 service's two new clients
    conns = {c["client"]: c for c in d.connections()}
    assert set(conns) == {"2001:db8:18::11", "2001:db8:18::12", lab.client_addrs["c1"]}  # RFC 5952 text
    assert all(c["state"] == "ESTABLISHED" for c in conns.values())
    assert {c["vip"] for c in conns.values()} == {lab.vip, "2001:db8:18::100"}
    assert d.status()["stats"]["internal_errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_esp_from_a_stranger_gets_parameter_problem(make_lab, run_director, mode):
    lab = make_lab(mode, ipv6=True)
    d = run_director(lab)
    c2 = LabClient(lab, "c2", V6)
    c2.send_esp(0xDEAD)
    got = c2.recv_param_problem()
    # type 4 code 1 (unrecognized next header), from the VIP, pointing at the IPv6 header's next
    # header field (offset 6), which names ESP
    assert got == [(4, 1, lab.vip6, 6, 50)]
    time.sleep(0.3)
    assert where(lab, lambda r: r["src"] == c2.addr) == {}
    assert d.status()["stats"]["icmp_sent"] == 1
    assert d.status()["drops"] == {"NO_ENTRY": 1}


@pytest.mark.parametrize("mode", MODES)
def test_extension_headers_and_fragments(make_lab, run_director, mode):
    """ESP behind destination options and a hop-by-hop header follows its client's entry; a
    6000-byte IKE message, fragmented by the client's kernel (only the source fragments in IPv6),
    reaches a real server whole; a chain longer than the director walks is dropped and counted."""
    lab = make_lab(mode, ipv6=True)
    d = run_director(lab)
    c1 = LabClient(lab, "c1", V6)
    c1.ikev2_connect()
    raw = lab.socket("c1", V6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, vip = ip_to_int(c1.addr), lab.vip6_int
    dstopt, hbh = (60, b"\x01\x04\x00\x00\x00\x00"), (0, b"\x01\x04\x00\x00\x00\x00")
    esp = EspHeader(0xE5E5, 1).to_bytes() + b"\x42" * 48
    raw.sendto(build_ipv6(src, vip, 50, esp, ext=(hbh, dstopt)), (lab.vip6, 0))
    hits = wait_where(lab, lambda r: r["kind"] == "esp" and r["spi"] == 0xE5E5)
    (rs, _), = hits.items()
    ike_rs = {i for i, rec in where(lab, lambda r: r["src"] == c1.addr and r["kind"] == "ike").items()}
    assert ike_rs == {rs}  # the same real server as the client's IKE
    body = bytes(range(256)) * 23 + b"\x00" * 84
    c1.send_ike(LabClient.new_spi(), body=body)
    big = wait_where(lab, lambda r: r["kind"] == "ike" and r["len"] == 6000)
    assert big, "the fragmented 6000-byte IKE message did not arrive whole"
    raw.sendto(build_ipv6(src, vip, 50, esp, ext=(dstopt,) * 9), (lab.vip6, 0))
    deadline = time.monotonic() + 2.0
    while d.status()["drops"].get("IP6_EXT_CHAIN_TOO_LONG") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.status()["drops"].get("IP6_EXT_CHAIN_TOO_LONG") == 1
    assert d.status()["stats"]["internal_errors"] == 0


def test_vpnadm_takes_and_prints_ipv6_addresses(make_lab, run_director):
    """The operator's commands on the IPv6 service: listing, quiescing, a bad address, a new
    IPv6 service and its ip6tables rules, the connection listing, -S/-R; addresses printed in
    RFC 5952 form whatever form they were typed in."""
    import subprocess
    import sys

    from director.lab.netns import REPO

    lab = make_lab("dr", ipv6=True)
    d = run_director(lab, scheduler="rr")

    def vpnadm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "director.cli", "--socket", str(d.control), *args],
                              input=stdin, capture_output=True, text=True, timeout=30, cwd=str(REPO))

    def ok(*args: str, stdin: str | None = None) -> str:
        p = vpnadm(*args, stdin=stdin)
        assert (p.returncode, p.stderr) == (0, ""), f"vpnadm {' '.join(args)}: {p.stderr}"
        return p.stdout

    rs1, rs2, rs3 = lab.rs_addrs6
    listing = ok("-L", "-n")
    assert f"IPSEC  {lab.vip6} rr" in listing and f"-> {rs1}" in listing
    ok("-e", "-V", "2001:DB8:18:0:0::100", "-r", "2001:db8:18:1:0::11", "-w", "0")  # quiesce rs1, spelled long
    assert [line.split()[3] for line in ok("-L", "-n").splitlines() if line.split()[:2] == ["->", rs1]] == ["0"]
    for role in ("c1", "c2"):
        LabClient(lab, role, V6).ikev2_connect()
    conns = [line.split() for line in ok("-L", "-c").splitlines()[2:]]
    assert sorted(c[3] for c in conns) == ["[2001:db8:18::11]:4500", "[2001:db8:18::12]:4500"]  # RFC 5952 section 6
    assert sorted(c[5] for c in conns) == [rs2, rs3]  # rr over the two left
    bad = vpnadm("-a", "-V", lab.vip6, "-r", "198.18.1.11")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "address" in bad.stderr
    bad = vpnadm("-e", "-V", "2001:db8:18::zz", "-r", rs1, "-w", "1")
    assert bad.returncode != 0 and "vip: not an IPv4 or IPv6 address" in bad.stderr
    ok("-A", "-V", "2001:db8:18::200", "-s", "mh")
    ok("-a", "-V", "2001:db8:18::200", "-r", rs2)
    rules = lab.run("director", ["ip6tables-legacy-save"]).stdout
    assert "-A VPN_DIRECTOR_RAW -d 2001:db8:18::200/128 -p esp -j CT --notrack" in rules
    assert "-A PREROUTING -d 2001:db8:18::200/128 -i eth0 -j VPN_DIRECTOR" in rules
    saved = ok("-S")
    assert "-A -V 2001:db8:18::200 -s mh" in saved and f"-a -V 2001:db8:18::200 -r {rs2}" in saved
    ok("-C")
    assert ok("-S") == ""
    ok("-R", stdin=saved)
    assert ok("-S") == saved


def test_health_probes_over_ipv6_take_a_silent_server_out(make_lab, run_director):
    """IKE probes and ICMPv6 echoes to the IPv6 real servers: every round needs both; a server
    whose IKE daemon stops answering goes down and gets none of 30 new IPv6 conversations (rr
    would give it 10; a random choice would miss it with probability (2/3)**30 = 5.2e-6)."""
    lab = make_lab("dr", ipv6=True)
    health = "health = { interval = 0.3, timeout = 0.2, rise = 2, fall = 2, icmp = true }"
    d = run_director(lab, scheduler="rr", extra_service=health + '\naffinity = "ip-port"')

    def servers6() -> dict[str, dict]:
        return {s["address"]: s for svc in d.status()["services"] if svc["vip"] == lab.vip6 for s in svc["servers"]}

    def wait(pred, what: str, timeout: float = 6.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out: {what}: {servers6()}"
            time.sleep(0.05)

    wait(lambda: all(s["health"] and s["health"]["checks"] >= 2 for s in servers6().values()), "probes")
    assert all(s["up"] and s["health"]["last_error"] == "" for s in servers6().values())
    quiet = lab.rs_addrs6[1]
    lab.start_responders(silent=(1,), only=(1,))
    wait(lambda: not servers6()[quiet]["up"], "rs2 marked down")
    assert servers6()[quiet]["health"]["last_error"] == "timeout"
    for i in range(30):
        s = lab.socket("c1", V6, socket.SOCK_DGRAM)
        s.bind(("2001:db8:18::11", 23000 + i))
        s.sendto(LabClient.ike_bytes(LabClient.new_spi()), (lab.vip6, 500))
    wait(lambda: len([c for c in d.connections() if c["client"] == "2001:db8:18::11"]) == 30, "30 conversations")
    counts = {}
    for c in d.connections():
        counts[c["rs_address"]] = counts.get(c["rs_address"], 0) + 1
    assert quiet not in counts and len(counts) == 2, counts


@pytest.mark.parametrize("hook", ["tc", "xdp"])
@pytest.mark.parametrize("mode", FASTPATH_MODES)
def test_established_ipv6_esp_stays_in_the_kernel(make_lab, mode, hook):
    """The eBPF fast path forwards an established IPv6 client's raw ESP and ESP-in-UDP (DR, or
    NAT66 with the UDP checksum rewritten: the real server's UDP socket takes only a valid one)
    at tc and at XDP; not one reaches the daemon. The IPv4 client beside it is forwarded too."""
    from director.lab.director_proc import DirectorProcess
    from director.lab.wait import wait_for

    lab = make_lab(mode, ipv6=True)
    if hook == "xdp":
        xdp_lab(lab)
    d = DirectorProcess(lab, dataplane="ebpf", daemon_extra=XDP if hook == "xdp" else "").start()
    try:
        c1, c2v4 = LabClient(lab, "c1", V6), LabClient(lab, "c2")
        c1.ikev2_connect()
        c2v4.ikev2_connect()
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 4, what="both clients' keys in the maps")
        slow_before = d.status()["stats"]["packets"]
        for seq in range(1, 51):
            c1.send_esp(0x6E1, seq)
            c1.send_esp_in_udp(0x6E2, seq)
            c2v4.send_esp(0x4E1, seq)

        wait_for(lambda: [sum(esp_at(lab, s).values()) for s in (0x6E1, 0x6E2, 0x4E1)] == [50, 50, 50],
                 what="150 ESP packets at the real servers")
        st = d.status()
        assert st["stats"]["packets"] == slow_before, st["stats"]  # not one reached the daemon
        assert st["fastpath"]["forwarded"]["ESP"] == 100 and st["fastpath"]["forwarded"]["ESP_IN_UDP"] == 50
        raw, natt = esp_at(lab, 0x6E1), esp_at(lab, 0x6E2)
        assert len(raw) == 1 and raw.keys() == natt.keys()  # one server for the client
        rs = next(iter(esp_at(lab, 0x6E1)))
        want_dst = lab.vip6 if mode == "dr" else lab.rs_addrs6[rs]
        assert {r["dst"] for r in lab.received(rs) if r["spi"] in (0x6E1, 0x6E2)} == {want_dst}
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("mode", MODES)
def test_packet_too_big_reaches_the_clients_real_server(make_lab, run_director, mode):
    """A router on c1's path answers an ESP packet the IPv6 VIP sent to c1 with ICMPv6 packet too
    big (RFC 4443 type 2, MTU 1280): the director relays it to the real server of c1's conversation
    (NAT66: outer destination and quoted source rewritten to the server, checksum right, or its
    kernel would not deliver it), no other server gets it, and one about no conversation is dropped."""
    from director.lab import craft

    lab = make_lab(mode, ipv6=True)
    d = run_director(lab, scheduler="rr")
    c1 = LabClient(lab, "c1", V6)
    c1.ikev2_connect()
    c1.send_esp(0x7000)
    (rs, _), = wait_where(lab, lambda r: r["kind"] == "esp" and r["spi"] == 0x7000).items()
    router = ip_to_int(lab.client_addrs6["c2"])  # a router on the way, for the test's purpose
    raw = lab.socket("c2", V6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    about = craft.esp(lab.vip6_int, ip_to_int(c1.addr), 0xC1C1)  # what the VIP (the server) sent c1
    raw.sendto(craft.icmp6_error(router, lab.vip6_int, about, mtu=1280), (lab.vip6, 0))
    stranger = craft.esp(lab.vip6_int, ip_to_int("2001:db8:18::77"), 0xC2C2)
    raw.sendto(craft.icmp6_error(router, lab.vip6_int, stranger, mtu=1280), (lab.vip6, 0))
    deadline = time.monotonic() + 3.0
    while not lab.received_icmp(rs) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = lab.received_icmp(rs)
    assert len(got) == 1, got
    e = got[0]
    want_quoted_src = lab.vip6 if mode in ("dr", "tun") else lab.rs_addrs6[rs]
    assert (e["type"], e["code"], e["mtu"], e["quote"]["src"], e["quote"]["dst"], e["quote"]["proto"]) == \
        (2, 0, 1280, want_quoted_src, c1.addr, 50)
    assert [lab.received_icmp(i) for i in range(3) if i != rs] == [[], []]
    st = d.status()
    assert st["stats"]["icmp_relayed"] == 1 and st["drops"].get("ICMP_NO_ENTRY") == 1, st
