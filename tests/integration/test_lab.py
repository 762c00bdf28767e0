"""The lab's plumbing, with plain kernel forwarding and no director software.

Each test builds its own namespaces (see conftest.py) and proves one piece works: clients reach
the director, the VIP is ARP-answered by the director and never by a real server, the DR/TUN
return path through gw, the NAT-mode default route, TUN decapsulation (tc for whole envelopes,
the responder's fallback for fragmented ones), the responder's answers and records, and teardown.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time

import pytest

from director.lab.netns import NETNS_DIR, Lab, cleanup, list_labs
from director.packet import (
    FLAG_INITIATOR,
    FLAG_RESPONSE,
    IKE_AUTH,
    IKE_SA_INIT,
    INFORMATIONAL,
    MAIN,
    NATT_KEEPALIVE,
    NON_ESP_MARKER,
    PROTO_AH,
    PROTO_ESP,
    IkeHeader,
    Ipv4Header,
    build_ipv4,
    build_ipv4_udp,
    ike_header,
    ip_to_int,
)

C1 = Lab.client_addrs["c1"]
RS1 = Lab.rs_addrs[0]
PROTO_IPIP = 4
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # <linux/in.h>
QUIET = 0.4  # how long "nothing arrives" is watched


# -- helpers --------------------------------------------------------------------------------------


def udp(lab: Lab, role: str, addr: str, port: int, timeout: float = 2.0) -> socket.socket:
    sock = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    sock.settimeout(timeout)
    return sock


def nothing_arrives(sock: socket.socket, wait: float = QUIET) -> bool:
    sock.settimeout(wait)
    try:
        sock.recvfrom(65535)
    except TimeoutError:
        return True
    return False


def route_c1_to_rs1(lab: Lab) -> str:
    """Give c1 a path to rs1's responder without any director software; returns the address to use.

    nat: rs1's own address, routed by the director (plain forwarding). dr/tun: the VIP, routed by
    gw to rs1 (which holds the VIP on lo), so replies take the real DR return path.
    """
    if lab.mode == "nat":
        lab.ipr("c1").route("add", dst=Lab.lan_net, gateway=Lab.director_wan)
        return RS1
    lab.ipr("c1").route("add", dst=f"{Lab.vip}/32", gateway=Lab.gw_wan)
    lab.ipr("gw").route("add", dst=f"{Lab.vip}/32", gateway=RS1)
    return Lab.vip


def snmp_ip(lab: Lab, role: str) -> dict[str, int]:
    """The ``Ip:`` counters of /proc/net/snmp in ``role``'s namespace."""
    lines = [line.split() for line in lab.run(role, ["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = [line for line in lines if line[0] == "Ip:"][:2]
    return dict(zip(names[1:], map(int, values[1:])))


def mac(lab: Lab, role: str, ifname: str) -> str:
    (link,) = lab.ipr(role).get_links(ifname=ifname)
    return link.get_attr("IFLA_ADDRESS")


def arp_who_has(lab: Lab, role: str, ifname: str, target: str, wait: float = QUIET, first: bool = False) -> set[str]:
    """Broadcast one ARP request from ``role``/``ifname``; the MACs that answered within ``wait``
    (or the first one, with ``first``)."""
    sock = lab.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind((ifname, 0x0806))
    own = bytes.fromhex(mac(lab, role, ifname).replace(":", ""))
    (addr,) = [a for a in lab.ipr(role).get_addr(label=ifname) if a["prefixlen"] < 32]
    spa = socket.inet_aton(addr.get_attr("IFA_ADDRESS"))
    tpa = socket.inet_aton(target)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, own, spa, b"\0" * 6, tpa)
    sock.send(b"\xff" * 6 + own + b"\x08\x06" + arp)
    answered = set()
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame = sock.recv(2048)
        except TimeoutError:
            break
        op, sha, spa_r = struct.unpack_from("!6xH6s4s", frame, 14)
        if op == 2 and spa_r == tpa:
            answered.add(sha.hex(":"))
            if first:
                break
    return answered


def root_snapshot() -> tuple[set[str], set[str], set[str]]:
    """Root-namespace links, routes and iptables rules (counters stripped)."""
    links = set(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.split("\n"))
    links = {re.sub(r"^\d+: ", "", re.split(r"\s+link/", line)[0]) for line in links if line}
    routes = set(subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True,
                                check=True).stdout.splitlines())  # fmt: skip
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout.splitlines()
    rules = {re.sub(r"\[\d+:\d+\]", "", r) for r in rules if r and not r.startswith("#")}
    return links, routes, rules


def assert_root_unchanged(before: tuple[set[str], set[str], set[str]]) -> None:
    after = root_snapshot()
    for what, b, a in zip(("links", "routes", "iptables rules"), before, after):
        assert a <= b, f"root namespace gained {what}: {sorted(a - b)}"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")] if os.path.isdir(NETNS_DIR) else []


def initial_ike(spi_i: int, msg_id: int = 0) -> bytes:
    return ike_header(spi_i, 0, IKE_SA_INIT, flags=FLAG_INITIATOR, msg_id=msg_id)


# -- every mode -----------------------------------------------------------------------------------


def test_clients_reach_director_and_vip_is_arp_answered_by_director(lab):
    assert lab.ping("c1", Lab.director_wan), "c1 -> director wan"
    assert lab.ping("c2", Lab.director_wan), "c2 -> director wan"
    before = snmp_ip(lab, "nat")
    assert lab.ping("c3", Lab.director_wan), "c3 -> director through the NAT"
    assert snmp_ip(lab, "nat")["ForwDatagrams"] >= before["ForwDatagrams"] + 2, "c3's echo bypassed nat"
    # A UDP echo: the director sees c3 only as the NAT's public address, and its answer gets back.
    director = udp(lab, "director", Lab.director_wan, 7)
    c3 = udp(lab, "c3", Lab.client_addrs["c3"], 0)
    c3.sendto(b"echo", (Lab.director_wan, 7))
    data, peer = director.recvfrom(2048)
    assert data == b"echo" and peer[0] == Lab.nat_public
    director.sendto(data, peer)
    assert c3.recvfrom(2048) == (b"echo", (Lab.director_wan, 7))

    assert lab.ping("c1", Lab.vip), "the VIP answers c1"
    neigh = [n for n in lab.ipr("c1").get_neighbours(dst=Lab.vip) if n.get_attr("NDA_LLADDR")]
    assert [n.get_attr("NDA_LLADDR") for n in neigh] == [mac(lab, "director", "eth0")]


def test_sysctls_and_links(lab):
    veths = 0
    for role in lab.ns:
        for dev in ("all", "default"):
            assert lab.sysctl(role, f"net/ipv4/conf/{dev}/rp_filter") == "0", (role, dev)
        for link in lab.ipr(role).get_links():
            dev = link.get_attr("IFLA_IFNAME")
            assert lab.sysctl(role, f"net/ipv4/conf/{dev}/rp_filter") == "0", (role, dev)
            assert link["flags"] & 1, f"{role}/{dev} is down"
            if link.get_attr("IFLA_LINKINFO") and link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "veth":
                assert link.get_attr("IFLA_MTU") == 1500, (role, dev)
                veths += 1
        forwarding = "1" if role in ("director", "gw", "nat") else "0"
        assert lab.sysctl(role, "net/ipv4/ip_forward") == forwarding, role
    assert veths == 2 * 11, "both ends of 10 switch ports and the c3 leg"
    for role in Lab.rs_roles:
        expect = ("1", "2") if lab.mode in ("dr", "tun") else ("0", "0")
        for dev in ("all", "eth0"):
            got = (lab.sysctl(role, f"net/ipv4/conf/{dev}/arp_ignore"),
                   lab.sysctl(role, f"net/ipv4/conf/{dev}/arp_announce"))  # fmt: skip
            assert got == expect, (role, dev)
        lo = {a.get_attr("IFA_ADDRESS") for a in lab.ipr(role).get_addr(label="lo")}
        assert (Lab.vip in lo) == (lab.mode in ("dr", "tun")), (role, lo)
    masq = lab.run("nat", ["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert "-A POSTROUTING -o eth0 -j MASQUERADE" in masq


def test_responder_answers_initial_ike(lab):
    dst = route_c1_to_rs1(lab)
    c1 = udp(lab, "c1", C1, 500)
    spi_i = secrets.randbits(64) | 1
    c1.sendto(initial_ike(spi_i, msg_id=0), (dst, 500))
    reply, peer = c1.recvfrom(65535)
    assert peer == (dst, 500)
    hdr = IkeHeader.from_bytes(reply)
    assert (hdr.spi_i, hdr.exchange, hdr.flags, hdr.msg_id, hdr.length, len(reply)) == (
        spi_i, IKE_SA_INIT, FLAG_RESPONSE, 0, 28, 28,
    )  # fmt: skip
    assert hdr.spi_r != 0

    # A retransmit gets the same responder SPI; a non-initial message is recorded, not answered.
    c1.sendto(initial_ike(spi_i), (dst, 500))
    again = IkeHeader.from_bytes(c1.recvfrom(65535)[0])
    assert again.spi_r == hdr.spi_r
    c1.sendto(ike_header(spi_i, hdr.spi_r, IKE_AUTH, flags=FLAG_INITIATOR, msg_id=1), (dst, 500))
    assert nothing_arrives(c1)

    # On 4500 the answer keeps the non-ESP marker; IKEv1 gets no Response flag (it has none).
    c1_natt = udp(lab, "c1", C1, 4500)
    spi_v1 = secrets.randbits(64) | 1
    c1_natt.sendto(NON_ESP_MARKER + ike_header(spi_v1, 0, MAIN, version=0x10), (dst, 4500))
    natt_reply, peer = c1_natt.recvfrom(65535)
    assert peer == (dst, 4500) and natt_reply[:4] == NON_ESP_MARKER and len(natt_reply) == 32
    v1 = IkeHeader.from_bytes(natt_reply, 4)
    assert (v1.spi_i, v1.version, v1.exchange, v1.flags) == (spi_v1, 0x10, MAIN, 0) and v1.spi_r

    recs = lab.wait_received(0, lambda r: r["spi_i"] == f"{spi_i:016x}" and r["spi_r"] != "0" * 16)
    mine = [r for r in lab.received(0) if r["spi_i"] == f"{spi_i:016x}"]
    assert [(r["kind"], r["src"], r["sport"], r["dst"], r["len"]) for r in mine] == [("ike", C1, 500, dst, 28)] * 3
    assert recs[0]["spi_r"] == f"{hdr.spi_r:016x}"
    lab.wait_received(0, lambda r: r["kind"] == "ike_natt" and r["spi_i"] == f"{spi_v1:016x}" and r["len"] == 32)
    assert lab.received(1) == [] and lab.received(2) == [], "only rs1 was routed to"


def test_responder_records_every_kind(lab):
    dst = route_c1_to_rs1(lab)
    c1 = udp(lab, "c1", C1, 4500)
    c1.sendto(NATT_KEEPALIVE, (dst, 4500))
    c1.sendto(struct.pack("!II", 0x1234, 7) + bytes(16), (dst, 4500))
    c1.sendto(NON_ESP_MARKER + ike_header(0xAB, 0xCD, INFORMATIONAL, flags=FLAG_INITIATOR), (dst, 4500))
    esp = lab.socket("c1", socket.AF_INET, socket.SOCK_RAW, PROTO_ESP)
    esp.sendto(struct.pack("!II", 0x5150, 1) + bytes(40), (dst, 0))
    ah = lab.socket("c1", socket.AF_INET, socket.SOCK_RAW, PROTO_AH)
    ah.sendto(struct.pack("!BBHII", 4, 4, 0, 0x5151, 1) + bytes(12 + 20), (dst, 0))

    def one(kind):
        (rec,) = lab.wait_received(0, lambda r: r["kind"] == kind)
        return {k: v for k, v in rec.items() if k != "t"}

    common = {"src": C1, "dst": dst}
    assert one("keepalive") == {**common, "kind": "keepalive", "sport": 4500, "spi_i": None, "spi_r": None,
                                "spi": None, "len": 1}  # fmt: skip
    assert one("esp_in_udp") == {**common, "kind": "esp_in_udp", "sport": 4500, "spi_i": None, "spi_r": None,
                                 "spi": 0x1234, "len": 24}  # fmt: skip
    assert one("ike_natt") == {**common, "kind": "ike_natt", "sport": 4500, "spi_i": f"{0xAB:016x}",
                               "spi_r": f"{0xCD:016x}", "spi": None, "len": 32}  # fmt: skip
    assert one("esp") == {**common, "kind": "esp", "sport": 0, "spi_i": None, "spi_r": None, "spi": 0x5150,
                          "len": 48}  # fmt: skip
    assert one("ah") == {**common, "kind": "ah", "sport": 0, "spi_i": None, "spi_r": None, "spi": 0x5151,
                         "len": 44}  # fmt: skip
    assert nothing_arrives(c1, 0.1), "nothing here is an initial IKE message: no answers"


@pytest.mark.parametrize("mode", ["dr", "tun", "nat"])
def test_down_leaves_nothing_behind(make_lab, mode):
    before = root_snapshot()
    lab = make_lab(mode)
    names = list(lab.ns.values())
    pids = [p.pid for p in lab.responder_procs.values()]
    tracked = lab.popen("c2", ["sleep", "60"]).pid
    # An untracked orphan: only the namespace scan in down() can find it.
    orphan = int(lab.run("c1", ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
    tmp = lab.tmpdir
    assert sorted(lab_namespaces(lab.prefix)) == sorted(names)
    assert len(pids) == 3 and all(alive(p) for p in [*pids, tracked, orphan])
    assert tmp is not None and tmp.exists()

    lab.down()
    assert lab_namespaces(lab.prefix) == []
    assert [p for p in [*pids, tracked, orphan] if alive(p)] == []
    assert not tmp.exists()
    assert_root_unchanged(before)
    lab.down()  # idempotent



# -- dr / tun -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lab", ["dr", "tun"], indirect=True)
def test_return_path_from_vip_to_client_via_gw(lab):
    c1 = udp(lab, "c1", C1, 500)
    rs1 = lab.socket("rs1")
    rs1.bind((Lab.vip, 0))
    gw_before, dir_before = snmp_ip(lab, "gw"), snmp_ip(lab, "director")
    rs1.sendto(b"return path", (C1, 500))
    data, peer = c1.recvfrom(2048)
    assert (data, peer) == (b"return path", (Lab.vip, rs1.getsockname()[1]))
    assert snmp_ip(lab, "gw")["ForwDatagrams"] == gw_before["ForwDatagrams"] + 1
    assert snmp_ip(lab, "director")["ForwDatagrams"] == dir_before["ForwDatagrams"]


@pytest.mark.parametrize("lab", ["dr", "tun"], indirect=True)
def test_real_servers_never_answer_arp_for_the_vip(lab):
    rs_macs = {mac(lab, role, "eth0") for role in Lab.rs_roles}
    control = arp_who_has(lab, "gw", "eth1", RS1, wait=2.0, first=True)
    assert control == {mac(lab, "rs1", "eth0")}, "control: rs1 answers for its own address"
    answered = arp_who_has(lab, "gw", "eth1", Lab.vip)
    assert not answered & rs_macs, f"a real server answered ARP for the VIP: {answered & rs_macs}"


# -- nat ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lab", ["nat"], indirect=True)
def test_nat_real_servers_route_through_the_director(lab):
    for role in Lab.rs_roles:
        (default,) = lab.ipr(role).get_default_routes()
        assert default.get_attr("RTA_GATEWAY") == Lab.director_lan, role
    c1 = udp(lab, "c1", C1, 500)
    rs1 = lab.socket("rs1")
    before = snmp_ip(lab, "director")
    rs1.sendto(b"via director", (C1, 500))
    assert c1.recvfrom(2048)[0] == b"via director"
    assert snmp_ip(lab, "director")["ForwDatagrams"] == before["ForwDatagrams"] + 1


# -- tun ------------------------------------------------------------------------------------------


def _ipip_watch(lab: Lab) -> socket.socket:
    """A raw IPIP socket on rs1: it sees every envelope that reaches local delivery whole."""
    sock = lab.socket("rs1", socket.AF_INET, socket.SOCK_RAW, PROTO_IPIP)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("lab", ["tun"], indirect=True)
def test_tun_envelope_decapsulated_by_tc(lab):
    c1 = udp(lab, "c1", C1, 500)
    watch = _ipip_watch(lab)
    spi_i = secrets.randbits(64) | 1
    inner = build_ipv4_udp(ip_to_int(C1), Lab.vip_int, 500, 500, initial_ike(spi_i))
    envelope = build_ipv4(Lab.director_lan_int, Lab.rs_addr_ints[0], PROTO_IPIP, inner)
    tx = lab.socket("director", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    tx.sendto(envelope, (RS1, 0))

    (rec,) = lab.wait_received(0, lambda r: r["spi_i"] == f"{spi_i:016x}")
    assert (rec["kind"], rec["src"], rec["sport"], rec["dst"], rec["len"]) == ("ike", C1, 500, Lab.vip, 28)
    reply, peer = c1.recvfrom(2048)
    assert peer == (Lab.vip, 500)
    hdr = IkeHeader.from_bytes(reply)
    assert hdr.spi_i == spi_i and hdr.spi_r and hdr.flags == FLAG_RESPONSE
    # The tc program stripped the envelope: it never reached local delivery as IPIP.
    with pytest.raises(BlockingIOError):
        watch.recv(65535)
    stats = lab.run("rs1", ["tc", "-s", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert "rs_decap" in stats and "direct-action" in stats


@pytest.mark.parametrize("lab", ["tun"], indirect=True)
def test_tun_fragmented_envelope_decapsulated_by_responder(lab):
    c1 = udp(lab, "c1", C1, 500)
    watch = _ipip_watch(lab)
    spi_i = secrets.randbits(64) | 1
    ike = ike_header(spi_i, 0, IKE_SA_INIT, flags=FLAG_INITIATOR, body=bytes(3000 - 28))
    inner = build_ipv4_udp(ip_to_int(C1), Lab.vip_int, 500, 500, ike)  # DF set on the inner header
    assert Ipv4Header.from_bytes(inner).flags_frag == 0x4000 and len(inner) == 3028
    # The kernel builds the outer header (protocol 4) and, with PMTU discovery off, no DF: the
    # 3048-byte envelope leaves the director as fragments, as a real director's would.
    tx = lab.socket("director", socket.AF_INET, socket.SOCK_RAW, PROTO_IPIP)
    tx.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    tx.bind((Lab.director_lan, 0))
    frag_before, reasm_before = snmp_ip(lab, "director"), snmp_ip(lab, "rs1")
    tx.sendto(inner, (RS1, 0))

    (rec,) = lab.wait_received(0, lambda r: r["spi_i"] == f"{spi_i:016x}")
    assert (rec["kind"], rec["src"], rec["dst"], rec["len"]) == ("ike", C1, Lab.vip, 3000)
    hdr = IkeHeader.from_bytes(c1.recvfrom(2048)[0])
    assert hdr.spi_i == spi_i and hdr.spi_r
    assert snmp_ip(lab, "director")["FragCreates"] - frag_before["FragCreates"] == 3
    assert snmp_ip(lab, "rs1")["ReasmOKs"] - reasm_before["ReasmOKs"] == 1
    envelope = watch.recv(65535)  # the reassembled envelope reached local delivery whole
    assert len(envelope) == 3048 and envelope[20:] == inner


# -- responder process, failures, CLI -------------------------------------------------------------


def test_silent_responder_records_but_never_answers(make_lab):
    lab = make_lab("dr", silent=[0])
    dst = route_c1_to_rs1(lab)
    c1 = udp(lab, "c1", C1, 500)
    spi_i = secrets.randbits(64) | 1
    c1.sendto(initial_ike(spi_i), (dst, 500))
    lab.wait_received(0, lambda r: r["spi_i"] == f"{spi_i:016x}")
    assert nothing_arrives(c1)


def test_responder_exits_zero_on_sigterm(make_lab):
    lab = make_lab("nat")
    proc = lab.responder_procs[1]
    assert proc.poll() is None
    start = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=2) == 0
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("mode, stage", [("dr", "_address"), ("tun", "_setup_decap")])
def test_failed_setup_leaves_nothing(make_lab, monkeypatch, mode, stage):
    """A crash in the middle of up() (after part of ``stage`` ran) still tears everything down."""
    real = getattr(Lab, stage)
    crashed: list[Lab] = []

    def half_then_crash(self, *args):
        real(self, *args)
        crashed.append(self)
        raise RuntimeError(f"crash in {stage}")

    monkeypatch.setattr(Lab, stage, half_then_crash)
    before = root_snapshot()
    with pytest.raises(RuntimeError, match="crash in"):
        make_lab(mode)
    (lab,) = crashed
    assert lab_namespaces(lab.prefix) == [], "up() must undo its own partial work"
    assert_root_unchanged(before)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        Lab("ipvs")


def test_cli_up_status_down_removes_a_crashed_run():
    prefix = f"vdl{secrets.token_hex(3)}"
    cli = [sys.executable, "-m", "director.lab"]
    orphan = None
    try:
        up = subprocess.run([*cli, "up", "--mode", "nat", "--prefix", prefix], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert len(lab_namespaces(prefix)) == 10
        # What a crashed test leaves: namespaces nobody will delete, a process still inside one.
        orphan = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-c1", "sleep", "60"])
        time.sleep(0.1)
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=30).stdout
        assert f"{prefix}: 10 namespaces, 1 processes" in status
        down = subprocess.run([*cli, "down", "--prefix", prefix], capture_output=True, text=True, timeout=30)
        assert down.returncode == 0, down.stderr
        assert lab_namespaces(prefix) == [] and list_labs(prefix) == {}
        assert orphan.wait(timeout=3) != 0
    finally:
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        cleanup(prefix)
