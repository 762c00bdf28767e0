"""Shared state for scale-out: three real daemons in the ECMP lab sync their tables with role "all".

The router is steered per packet kind with policy routes (a client's IKE to director 1, its ESP to
director 2), the hard case L4 ECMP hashing produces: the director that sees the ESP never saw the
IKE. Also the sync socket's guard: a stranger's datagrams are dropped by the kernel (never
HMAC-checked), a peer's are checked (docs/reliability.md, docs/scale-out.md "Shared state").
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from director.cli import execute, parse, socket_caller
from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.ecmp import EcmpLab
from director.lab.netns import cleanup, list_labs


KEY = "5ec7e75ec7e75ec7e75ec7e75ec7e75e"
PORT = 8514
SYNC_BOUND = 2.0  # docs/scale-out.md "Shared state": a change reaches every peer within this
SNAPSHOT_BOUND = 5.0  # a restarted director: start, REQUEST (every 1 s), snapshot applied
STRANGER_DATAGRAMS = 200


def wait_for(pred, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def ecmp(ecmp_prerequisites):
    lab = EcmpLab("dr", directors=3)
    try:
        yield lab.up()
    finally:
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


def sync_conf(lab: EcmpLab, role: str) -> str:
    peers = ", ".join(f'"{lab.director_lan_addr(r)}"' for r in lab.director_roles if r != role)
    state = lab._tmp() / f"{role}-sync-state.json"
    return (f'sync = {{ peers = [{peers}], bind = "{lab.director_lan_addr(role)}", key = "{KEY}", '
            f'role = "all", port = {PORT}, state_file = "{state}" }}')


def steer(lab: EcmpLab, client: str, udp_to: str, esp_to: str) -> None:
    """The router sends ``client``'s UDP (IKE, NAT-T) for the VIP to one director, its ESP to another."""
    for table, proto, role in ((101, "udp", udp_to), (102, "esp", esp_to)):
        lab.run("router", ["ip", "route", "replace", f"{lab.vip}/32", "via", lab.director_fabric(role),
                           "table", str(table)])
        lab.run("router", ["ip", "rule", "add", "from", lab.client_addrs[client], "to", f"{lab.vip}/32",
                           "ipproto", proto, "lookup", str(table), "pref", str(table)])


def entry(d: DirectorProcess, spi_i: int) -> dict | None:
    return next((c for c in d.connections() if int(c["spi_i"], 16) == spi_i), None)


def esp_servers(lab: EcmpLab, spi: int) -> set[int]:
    return {i for i in range(3) for r in lab.received(i) if r["kind"] == "esp" and r["spi"] == spi}


@pytest.mark.parametrize("dataplane", ["nfqueue", "ebpf"])
def test_three_directors_share_state(ecmp: EcmpLab, dataplane: str):
    lab = ecmp
    lab.start_responders()
    ds = {r: DirectorProcess(lab, r, role=r, dataplane=dataplane, daemon_extra=sync_conf(lab, r)).start()
          for r in lab.director_roles}
    d1, d2, d3 = (ds[r] for r in lab.director_roles)
    for d in ds.values():
        st = d.status()["sync"]
        assert st["role"] == "all" and st["bind"].startswith("198.18.1."), st
    # every director asks its peers for a snapshot until one arrives: settle that first, so what
    # follows counts changes only
    wait_for(lambda: all(d.status()["sync"]["synced"] for d in ds.values()), SNAPSHOT_BOUND, "initial snapshots")
    time.sleep(1.1)  # a request answered late (at most one snapshot a second) is out by now
    sent0 = {r: d.status()["sync"]["records_sent"] for r, d in ds.items()}

    # a client established through director 1 is known, on the same real server, on 2 and 3
    steer(lab, "c1", udp_to="d1", esp_to="d2")
    c1 = LabClient(lab, "c1")
    spi_i, spi_r, _src = c1.ikev2_connect()
    wait_for(lambda: (e := entry(d1, spi_i)) is not None and e["state"] == "ESTABLISHED", 2.0, "d1's entry")
    rs = entry(d1, spi_i)["rs_address"]
    took = wait_for(lambda: all((e := entry(d, spi_i)) is not None and e["state"] == "ESTABLISHED"
                                and e["rs_address"] == rs for d in (d2, d3)), SYNC_BOUND,
                    "the entry on directors 2 and 3")
    print(f"\nestablished on d1 -> known on d2 and d3 in {took * 1000:.0f} ms")
    assert int(entry(d2, spi_i)["spi_r"], 16) == spi_r
    for r in ("d2", "d3"):  # learned, not re-sent: no echo
        assert ds[r].status()["sync"]["records_sent"] == sent0[r], ds[r].status()["sync"]
    assert ds["d1"].status()["sync"]["records_sent"] > sent0["d1"]

    # its ESP, which the router sends to director 2 (which never saw its IKE), reaches that server
    esp_spi = 0x5EED0001
    for seq in range(1, 11):
        c1.send_esp(esp_spi, seq)
    wait_for(lambda: len([r for i in range(3) for r in lab.received(i)
                          if r["kind"] == "esp" and r["spi"] == esp_spi]) >= 10, 2.0, "ESP at a real server")
    assert esp_servers(lab, esp_spi) == {lab.rs_addrs.index(rs)}

    # director 3 restarts; meanwhile c2 establishes through director 1; 3 gets both by snapshot
    d3.stop()
    steer(lab, "c2", udp_to="d1", esp_to="d1")
    c2 = LabClient(lab, "c2")
    spi2, _, _ = c2.ikev2_connect()
    wait_for(lambda: entry(d2, spi2) is not None, SYNC_BOUND, "c2's entry on director 2")
    d3.start()
    wait_for(lambda: d3.status()["sync"]["synced"], SNAPSHOT_BOUND, "director 3's snapshot")
    assert entry(d3, spi_i)["rs_address"] == rs and entry(d3, spi2) is not None
    assert d3.status()["sync"]["snapshots_applied"] >= 1

    # a stranger's datagrams never reach the socket (kernel filter): no HMAC computed for them
    before = d1.status()["sync"]
    stranger = lab.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(STRANGER_DATAGRAMS):
        stranger.sendto(os.urandom(100), (lab.director_lan_addr("d1"), PORT))
    wait_for(lambda: d1.status()["sync"]["dropped_kernel"] >= before["dropped_kernel"] + STRANGER_DATAGRAMS,
             2.0, "the kernel to drop the stranger's datagrams")
    # ... while a peer's (garbage, from director 2's address) is received and HMAC-checked
    peer = lab.socket("d2", socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((lab.director_lan_addr("d2"), 0))
    for _ in range(5):
        peer.sendto(os.urandom(100), (lab.director_lan_addr("d1"), PORT))

    def d2_rows():
        return next(p for p in d1.status()["sync"]["peers"] if p["peer"] == lab.director_lan_addr("d2"))
    row0 = next(p for p in before["peers"] if p["peer"] == lab.director_lan_addr("d2"))
    wait_for(lambda: d2_rows()["rejected_mac"] == row0["rejected_mac"] + 5, 2.0, "the peer's forgeries checked")
    after = d1.status()["sync"]
    # every HMAC failure is counted: 5 (the peer's), not 205 (the stranger's were never checked)
    assert after["rejected_mac"] == before["rejected_mac"] + 5, (before, after)
    assert d2_rows()["last_age"] is not None and d2_rows()["last_age"] < 5.0
    # vpnadm -L --sync shows both peers, each heard from
    shown = execute(parse(["-L", "--sync", "--socket", str(d1.control)]), socket_caller(str(d1.control)))
    rows = {line.split()[0]: line.split() for line in shown.splitlines()[3:]}
    assert set(rows) == {lab.director_lan_addr("d2"), lab.director_lan_addr("d3")}, shown
    assert all(r[1] != "never" for r in rows.values()), shown
    assert rows[lab.director_lan_addr("d2")][4] == str(after["peers"][0]["rejected_mac"]), shown
    for d in ds.values():
        assert "Traceback" not in d.log()
