"""The NFQUEUE dataplane in the lab: real packets through the real daemon, observed at the real servers.

Every test runs in DR, TUN and NAT mode. Clients are real sockets in client namespaces (c3 sits
behind a masquerading NAT); the real servers record what their sockets received (a UDP socket only
gets datagrams with valid checksums) and answer initial IKE messages.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import REPO

MODES = ["dr", "tun", "nat"]
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2  # <linux/in.h>; Python's socket module lacks the names


def where(lab, pred) -> dict[int, list[dict]]:
    """Records matching ``pred`` per real server index (only those with matches)."""
    out = {}
    for i in range(3):
        hits = [r for r in lab.received(i) if pred(r)]
        if hits:
            out[i] = hits
    return out


def entries(d) -> list[dict]:
    """The connection table without the countdown column (time passes between two looks)."""
    return [{k: v for k, v in c.items() if k != "expires_in"} for c in d.connections()]


def settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)


@pytest.mark.parametrize("mode", MODES)
def test_clients_spread_and_every_packet_follows_its_client(make_lab, run_director, mode):
    lab = make_lab(mode)
    d = run_director(lab, scheduler="rr")
    c1, c2, c3 = (LabClient(lab, r) for r in ("c1", "c2", "c3"))
    for c in (c1, c2):
        spi_i, spi_r, src = c.ikev2_connect()
        assert src == lab.vip  # the answer comes from the VIP (NAT: rewritten on the way back)
        c.send_esp(0x1000, 1)
        c.send_esp(0x1000, 2)
        if mode != "nat":
            c.send_ah(0x2000)
        c.send_ike(spi_i, spi_r, natt=True)  # a later IKE message (e.g. an INFORMATIONAL)
    spi_i, spi_r, src = c3.ikev1_connect()  # main mode through the NAT, floating to 4500
    assert src == lab.vip
    c3.send_esp_in_udp(0x3000)
    c3.send_keepalive()
    settle()
    kinds = {"c1": {"ike", "ike_natt", "esp"}, "c2": {"ike", "ike_natt", "esp"}}
    if mode != "nat":
        kinds["c1"].add("ah")
        kinds["c2"].add("ah")
    kinds["c3"] = {"ike", "ike_natt", "esp_in_udp", "keepalive"}
    seen_at = {}
    for role, addr in (("c1", lab.client_addrs["c1"]), ("c2", lab.client_addrs["c2"]), ("c3", lab.nat_public)):
        hits = where(lab, lambda r, a=addr: r["src"] == a)
        assert len(hits) == 1, f"{role}'s packets reached several real servers: {hits}"
        (rs, records), = hits.items()
        assert {r["kind"] for r in records} == kinds[role]
        seen_at[role] = rs
    assert sorted(seen_at.values()) == [0, 1, 2]  # rr over three new clients
    conns = d.connections()
    assert len(conns) == 3 and all(c["state"] == "ESTABLISHED" for c in conns)
    assert d.status()["stats"]["internal_errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_wlc_spreads_by_weight(make_lab, run_director, mode):
    lab = make_lab(mode)
    d = run_director(lab, scheduler="wlc", weights=(1, 2, 3),
                     extra_service='affinity = "ip-port"')
    socks = []
    for i in range(12):  # twelve conversations from distinct ports: twelve "clients" behind c1
        s = lab.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 20000 + i))
        s.sendto(LabClient.ike_bytes(LabClient.new_spi()), (lab.vip, 500))
        socks.append(s)
    settle()
    per_rs = [len([r for r in lab.received(i) if r["kind"] == "ike"]) for i in range(3)]
    assert per_rs == [2, 4, 6]
    assert sum(s["inactive"] for s in d.status()["services"][0]["servers"]) == 12


@pytest.mark.parametrize("mode", MODES)
def test_esp_from_a_stranger_gets_protocol_unreachable(make_lab, run_director, mode):
    lab = make_lab(mode)
    d = run_director(lab)
    c2 = LabClient(lab, "c2")
    c2.send_esp(0xDEAD)
    got = c2.recv_icmp_unreachable()
    assert got and got[0][:3] == (3, 2, lab.vip) and got[0][3] == 50
    settle()
    assert where(lab, lambda r: r["src"] == lab.client_addrs["c2"]) == {}
    assert d.status()["stats"]["icmp_sent"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_init_entry_drops_esp_in_udp_then_expires(make_lab, run_director, mode):
    lab = make_lab(mode, silent=(0, 1, 2))  # nobody answers: the conversation stays INIT
    d = run_director(lab, init_timeout=2.0)
    c1 = LabClient(lab, "c1")
    c1.send_ike(LabClient.new_spi(), natt=True)  # an initial message straight to 4500
    settle()
    assert [c["state"] for c in d.connections()] == ["INIT"]
    c1.send_esp_in_udp(0x77)
    settle()
    assert where(lab, lambda r: r["kind"] == "esp_in_udp") == {}
    assert d.status()["drops"] == {"ENTRY_NOT_ESTABLISHED": 1}
    deadline = time.monotonic() + 5.0
    while d.connections() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.connections() == []
    assert d.status()["table"]["expired_init"] == 1
    c1.send_esp_in_udp(0x77)  # now there is no entry at all: unreachable
    assert c1.recv_icmp_unreachable()


@pytest.mark.parametrize("mode", MODES)
def test_large_ike_message_arrives_whole(make_lab, run_director, mode):
    lab = make_lab(mode)
    run_director(lab)
    c1 = LabClient(lab, "c1")
    body = bytes(range(256)) * 23 + b"\x00" * 84  # 5972 bytes: a 6000-byte IKE message
    c1.send_ike(LabClient.new_spi(), body=body)  # the kernel fragments it on the wire
    hits = where(lab, lambda r: r["kind"] == "ike")
    deadline = time.monotonic() + 3.0
    while not hits and time.monotonic() < deadline:
        time.sleep(0.05)
        hits = where(lab, lambda r: r["kind"] == "ike")
    (records,) = hits.values()
    # delivered to a UDP socket, so reassembled with a valid UDP checksum, all 6000 bytes
    assert [r["len"] for r in records] == [6000]


@pytest.mark.parametrize("mode", MODES)
def test_malformed_barrage_leaves_daemon_and_clients_alone(make_lab, run_director, mode):
    lab = make_lab(mode)
    d = run_director(lab)
    c1, c2 = LabClient(lab, "c1"), LabClient(lab, "c2")
    spi_i, spi_r, _ = c1.ikev2_connect()
    settle()
    before = entries(d)
    garbage = [
        (c2.s500, b"\x01" * 10),  # truncated IKE
        (c2.s500, LabClient.ike_bytes(5)[:27]),
        (c2.s500, b"\x00" * 8 + LabClient.ike_bytes(5)[8:]),  # zero initiator SPI
        (c2.s500, LabClient.ike_bytes(5).replace(b"\x20", b"\x70", 1)),  # version 7
        (c2.s4500, b"\x01\x02\x03"),  # garbage on 4500
        (c2.s4500, b"\x00\x00\x00\x00" + b"\x55" * 10),  # marker then a truncated header
    ]
    for _ in range(50):
        for s, payload in garbage:
            s.sendto(payload, (lab.vip, s.getsockname()[1]))
        c2.esp.sendto(b"\x00\x00\x00\x00" + b"\x00" * 20, (lab.vip, 0))  # ESP SPI 0
    settle(0.5)
    status = d.status()
    assert d.proc.poll() is None and status["stats"]["internal_errors"] == 0
    assert sum(status["drops"].values()) == 50 * 7
    assert entries(d) == before
    c1.send_esp(0x4242)
    settle()
    hits = where(lab, lambda r: r["kind"] == "esp" and r["spi"] == 0x4242)
    assert list(hits) == [before[0]["rs"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dataplane", ["nfqueue", "ebpf"])
def test_stopping_the_daemon_restores_the_namespace(make_lab, mode, dataplane):
    """Stop removes rules and routes; the eBPF path stays by design until `vpn-director cleanup`."""
    lab = make_lab(mode)

    def snapshot():
        return (
            lab.run("director", ["iptables-legacy-save"]).stdout.count("VPN_DIRECTOR"),
            lab.run("director", ["ip", "rule", "show"]).stdout,
            lab.run("director", ["ip", "route", "show", "table", "all"]).stdout,
        )

    def filters():
        return "".join(lab.run("director", ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
                       for dev in ("eth0", "eth1"))

    before, filters_before = snapshot(), filters()
    d = DirectorProcess(lab, dataplane=dataplane).start()
    during = snapshot()
    assert during[0] > 0
    if mode == "dr":
        assert "fwmark" in during[1]
    assert d.stop() == 0
    assert snapshot() == before
    if dataplane == "ebpf":
        assert "director_tc" in filters() and d.pin_dir.is_dir()  # keeps forwarding while no daemon runs
        r = lab.run("director", [sys.executable, "-m", "director.main", "cleanup", "--config", str(d.config_path)],
                    cwd=str(REPO), nsenter=True)
        assert r.returncode == 0, r.stderr
    assert filters() == filters_before and not d.pin_dir.exists()
    assert snapshot() == before


def test_ah_on_a_nat_service_is_refused_at_configuration(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[service]]\nvip = "192.0.2.1"\nmethod = "nat"\nah = true\n'
                   '[[service.server]]\naddress = "192.0.2.2"\n')
    r = subprocess.run([sys.executable, "-m", "director.main", "check", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 2
    assert r.stderr.strip() == ("vpn-director: service[0].ah: AH cannot cross NAT; a service that forwards by NAT "
                                "must not balance AH (ah = false, vpnadm --no-ah)")


@pytest.mark.parametrize("mode", MODES)
def test_full_size_df_esp_gets_through(make_lab, run_director, mode):
    """1500 bytes with DF on a 1500-MTU path: TUN's 1520-byte envelope is fragmented, not the packet."""
    lab = make_lab(mode)
    d = run_director(lab)
    c1 = LabClient(lab, "c1")
    c1.ikev2_connect()
    c1.esp.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # DF on
    c1.send_esp(0x6161, size=1472)  # SPI + sequence + 1472 = 1480 bytes of ESP, 1500 on the wire
    deadline = time.monotonic() + 3.0
    while not (hits := where(lab, lambda r: r["kind"] == "esp" and r["spi"] == 0x6161)):
        assert time.monotonic() < deadline, f"the 1500-byte DF packet never arrived:\n{d.log()}"
        time.sleep(0.05)
    (records,) = hits.values()
    assert [r["len"] for r in records] == [1480]
