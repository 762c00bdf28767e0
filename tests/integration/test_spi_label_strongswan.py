"""Which SPIs real strongSwan (kernel-libipsec) labels: the experiment behind SPI steering.

Two real servers with ``charon.spi_mask``/``spi_label`` (rs1 label 0x41, rs2 0x42 in byte 4 of
the 8-byte IKE SPI) and ``spi_min``/``spi_max`` (their ESP inbound SPIs in 0x41000000-0x41ffffff
and 0x42000000-0x42ffffff); an IKEv2 client (c1 -> rs1) and an IKEv1 client (c2 -> rs2) connect
straight to the servers' own addresses (no director: this is about strongSwan), then every kind of
rekey runs from both ends. After every step the server's SAs are read with ``swanctl --list-sas``
and checked: the server's own IKE SPI carries its label (in the responder field when the client
started the IKE SA, in the **initiator** field when the server did), the decoder in
``director/spi_label.py`` names the right server from the header fields a director sees, and
every server inbound ESP SPI (what the client puts on ESP toward the server) is in its range.
The same is checked **on the wire**: a packet socket in each server's namespace records every
frame from its client (pings run inside each tunnel after every step), and each non-initial IKE
message and each ESP-in-UDP packet, classified by ``director.packet.classify`` as the director
would, must decode to its server. Findings are written up in docs/scale-out.md ("SPI labels").
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from director.lab.ecmp import EcmpLab, bird_exe
from director.lab.netns import LabError, cleanup, list_labs
from director.lab.strongswan import (
    Charon, add_protected, client_swanctl, installed_children, responder_swanctl, strongswan_prerequisites,
)  # fmt: skip
from director.packet import FLAG_INITIATOR, Kind, classify, ip_to_int
from director.lab.strongswan import PROTECTED
from director.spi_label import ServerLabel, SpiLabels
from director.lab.wait import wait_for
from tests.integration.conftest import lab_prerequisites

MASK = 0x00000000FF000000
LABELS = {0: 0x41, 1: 0x42}  # rs index -> label byte


def server_options(rs: int) -> str:
    b = LABELS[rs]
    return (f"  spi_mask = {MASK:#018x}\n  spi_label = {b << 24:#018x}\n"
            f"  spi_min = {b << 24:#010x}\n  spi_max = {(b << 24) | 0xFFFFFF:#010x}\n"
            "  delete_rekeyed_delay = 1\n")  # fmt: skip


SPI_LABELS = SpiLabels.build(MASK, {rs: ServerLabel(b << 24, b << 24, (b << 24) | 0xFFFFFF) for rs, b in LABELS.items()})


@pytest.fixture
def peers():
    missing = lab_prerequisites("dr") + strongswan_prerequisites()
    try:
        bird_exe()
    except LabError as e:
        missing.append(str(e))
    if missing:
        pytest.fail("prerequisites missing: " + "; ".join(missing), pytrace=False)
    lab = EcmpLab("dr", directors=1)
    charons: list[Charon] = []
    try:
        lab.up()
        add_protected(lab)
        servers, clients = {}, {}
        for rs in LABELS:
            # The server answers on its own address: a stand-in "lab" whose VIP is the RIP.
            own = SimpleNamespace(vip=lab.rs_addrs[rs], mode="nat", rs_addrs=lab.rs_addrs)
            servers[rs] = Charon(lab, lab.rs_roles[rs], responder_swanctl(own, rs), options=server_options(rs))
        for role, rs, kind in (("c1", 0, "psk"), ("c2", 1, "psk1")):
            target = SimpleNamespace(vip=lab.rs_addrs[rs], mode="nat", rs_addrs=lab.rs_addrs)
            c = Charon(lab, role, client_swanctl(target, role, kind=kind), options="  delete_rekeyed_delay = 1\n")
            c.conn = kind
            clients[role] = (c, rs)
        charons = [*servers.values(), *(c for c, _ in clients.values())]
        for ch in charons:
            ch.start(wait=False)
        for ch in charons:
            ch.wait_ready()
            ch.load()
        yield lab, servers, clients
    finally:
        for c in charons[len(LABELS):]:
            c.stop()
        for s in charons[: len(LABELS)]:
            s.stop()
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


class Sniffer:
    """Every IPv4 frame arriving on eth0 of a lab namespace, recorded by a thread (AF_PACKET)."""

    def __init__(self, lab: EcmpLab, role: str) -> None:
        self.sock = lab.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)  # SO_RCVBUFFORCE
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING:
                self.frames.append(data)

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(timeout=2)
        return self.frames


def server_sas(server: Charon, conn: str) -> list[dict]:
    return [sa for sa in server.list_sas().get(conn, []) if sa.get("state") == "ESTABLISHED" and installed_children(sa)]


def check(step: str, server: Charon, rs: int, conn: str, findings: list) -> dict:
    """Every established SA of ``conn`` on the server: label where expected, decoder right, ESP in range."""
    sas = server_sas(server, conn)
    assert sas, f"{step}: no established {conn} SA on rs{rs + 1}"
    version = 2 if conn == "psk" else 1
    for sa in sas:
        spi_i, spi_r = int(sa["initiator-spi"], 16), int(sa["responder-spi"], 16)
        server_started = sa.get("initiator") == "yes"
        own = spi_i if server_started else spi_r
        assert own & MASK == LABELS[rs] << 24, f"{step}: server SPI {own:#018x} lacks label {LABELS[rs]:#x}: {sa}"
        # What a director sees in a packet from the client: the I flag is set by the SA's
        # original initiator, i.e. when the client started this IKE SA.
        flags = 0 if server_started else FLAG_INITIATOR
        assert SPI_LABELS.decode_ike(spi_i, spi_r, version, flags) == rs, (step, sa)
        for child in installed_children(sa):
            spi_in = int(child["spi-in"], 16)
            assert SPI_LABELS.decode_esp(spi_in) == rs, f"{step}: ESP SPI {spi_in:#010x} out of rs{rs + 1}'s range"
            findings.append((step, conn, "server" if server_started else "client",
                             f"{own:#018x}", f"{spi_in:#010x}"))  # fmt: skip
    return max(sas, key=lambda sa: int(sa["uniqueid"]))


def ping_inside(lab: EcmpLab, clients: dict) -> None:
    for role, (c, _rs) in clients.items():
        vip = c.virtual_ip(c.conn)
        lab.run(role, ["ping", "-n", "-q", "-c", "2", "-i", "0.1", "-W", "1", "-I", vip, PROTECTED], check=False)


def test_strongswan_labels_every_server_chosen_spi(peers):
    lab, servers, clients = peers
    findings: list = []
    sniffers = {rs: Sniffer(lab, lab.rs_roles[rs]) for rs in LABELS}
    for role, (c, rs) in clients.items():
        c.initiate(c.conn)
        c.wait_established(c.conn)
        check("initial", servers[rs], rs, c.conn, findings)

    def step(name: str, do, what: str) -> None:
        for role, (c, rs) in clients.items():
            before = check(f"{name} (before)", servers[rs], rs, c.conn, [])
            do(c, servers[rs], before)

            def changed(c=c, rs=rs, before=before):
                sas = server_sas(servers[rs], c.conn)
                if what == "ike":
                    return [sa for sa in sas if sa["initiator-spi"] != before["initiator-spi"]]
                old = {ch["spi-in"] for ch in installed_children(before)}
                return [sa for sa in sas if {ch["spi-in"] for ch in installed_children(sa)} - old]

            wait_for(changed, 15, f"{role}: {name}")
            # the rekeyed SA must be gone or settled before the next step reads "the newest"
            wait_for(lambda c=c: c.wait_established(c.conn), 10, f"{role}: established after {name}")
            check(name, servers[rs], rs, c.conn, findings)
        ping_inside(lab, clients)

    ping_inside(lab, clients)
    step("client CHILD_SA rekey", lambda c, s, sa: c.rekey(child=c.conn), "child")
    step("server CHILD_SA rekey",
         lambda c, s, sa: s.rekey(child_id=installed_children(sa)[0]["uniqueid"]), "child")  # fmt: skip
    step("client IKE_SA rekey", lambda c, s, sa: c.rekey(ike_id=c.wait_established(c.conn)["uniqueid"]), "ike")
    time.sleep(1.5)  # delete_rekeyed_delay: rekeyed CHILD_SAs must be gone before a reauth
    step("server IKE_SA rekey", lambda c, s, sa: s.rekey(ike_id=sa["uniqueid"]), "ike")
    time.sleep(1.5)
    step("client reauthentication",
         lambda c, s, sa: c.rekey(ike_id=c.wait_established(c.conn)["uniqueid"], reauth=True), "ike")  # fmt: skip

    print()
    for f in findings:
        print("  %-24s %-5s IKE SA started by %-6s server IKE SPI %s  server ESP SPI %s" % f)
    started = {(conn, by) for _, conn, by, _, _ in findings}
    # both directions happened for both versions: the trap (server-started SA) was exercised
    assert started == {("psk", "client"), ("psk", "server"), ("psk1", "client"), ("psk1", "server")}, started

    # On the wire, as a director would see the client's packets
    client_of = {rs: ip_to_int(lab.client_addrs[role]) for role, (_c, rs) in clients.items()}
    counts = {}
    for rs, sniffer in sniffers.items():
        seen = counts[rs] = {"ike": 0, "ike_server_started": 0, "esp": 0}
        wrong = []
        for frame in sniffer.close():
            pkt = classify(frame[14:])
            if pkt.src != client_of[rs]:
                continue
            if pkt.kind == Kind.IKE:
                seen["ike"] += 1
                seen["ike_server_started"] += pkt.ike_version == 2 and not pkt.flags & FLAG_INITIATOR
                if SPI_LABELS.decode_ike(pkt.spi_i, pkt.spi_r, pkt.ike_version, pkt.flags) != rs:
                    wrong.append(("ike", hex(pkt.spi_i), hex(pkt.spi_r), pkt.ike_version, hex(pkt.flags)))
            elif pkt.kind == Kind.ESP_IN_UDP:
                seen["esp"] += 1
                if SPI_LABELS.decode_esp(pkt.spi) != rs:
                    wrong.append(("esp", hex(pkt.spi)))
        print(f"  on the wire to rs{rs + 1}: {seen}, wrongly decoded: {len(wrong)}")
        assert wrong == [], wrong[:10]
        assert seen["ike"] >= 10 and seen["esp"] >= 10, seen
    # IKEv2 messages from the client inside the SA the server started (I flag clear) were seen and
    # decoded from the initiator field: the trap, on the wire
    assert counts[0]["ike_server_started"] > 0, counts
