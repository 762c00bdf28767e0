"""Director failover: two directors, VRRP (real keepalived) and the table sync (director/sync.py).

The active director dies as a box would (its daemon and its keepalived SIGKILLed, its links down);
the backup takes the VIP and forwards every established client to the same real server from its
warm table (and warm eBPF map). Then the old active comes back as backup and resyncs by snapshot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import DIRECTOR2, Lab, cleanup, list_labs, pids_in_netns
from director.lab.wait import wait_for

KEY = "5ec7e75ec7e75ec7e75ec7e75ec7e75e"
MAX_GAP = 3.0


def sync_conf(lab, peer: str, name: str) -> str:
    state = lab._tmp() / f"{name}-sync-state.json"  # per lab and director: never the system's path
    return f'sync = {{ peer = "{peer}", key = "{KEY}", role = "auto", state_file = "{state}" }}'


@pytest.fixture
def failover_lab(request):
    labs = []

    def make(mode, responders=True):
        missing = [] if os.geteuid() == 0 else ["root (namespaces, veth, iptables, tc)"]
        missing += [f"`{t}` on PATH" for t in ("ip", "tc", "nsenter", "iptables") if shutil.which(t) is None]
        if shutil.which("keepalived") is None and not os.path.exists("/usr/sbin/keepalived"):
            missing.append("keepalived (Debian: keepalived; deploy/setup.sh installs it)")
        if missing:
            pytest.fail(f"failover lab ({mode}) prerequisites missing: " + "; ".join(missing), pytrace=False)
        lab = Lab(mode, directors=2)
        labs.append(lab)
        lab.up()
        if responders:
            lab.start_responders()
        return lab

    yield make
    for lab in labs:
        try:
            lab.down()
        finally:
            if list_labs(lab.prefix).get(lab.prefix):
                cleanup(lab.prefix)


def table(d: DirectorProcess) -> set:
    return {(c["client"], c["port"], c["spi_i"], c["state"], c["rs_address"]) for c in d.connections()}


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def forwarded(d: DirectorProcess) -> int:
    """ESP (raw and in UDP) this director forwarded, slow and fast path."""
    st = d.status()
    n = st["stats"]["forwarded"]
    fp = st.get("fastpath")
    if fp:
        n += sum(fp["forwarded"].values())
    return n


def esp_times(lab, spi: int) -> dict[int, list[float]]:
    out = {}
    for i in range(3):
        ts = [r["t"] for r in lab.received(i) if r["kind"] in ("esp", "esp_in_udp") and r["spi"] == spi]
        if ts:
            out[i] = ts
    return out


@pytest.mark.parametrize("mode, dataplane", [("dr", "ebpf"), ("dr", "nfqueue"), ("nat", "ebpf")])
def test_active_dies_backup_keeps_every_client(failover_lab, mode, dataplane):
    lab = failover_lab(mode)
    d1, d2, ka1 = start_pair(lab, dataplane)

    clients = {role: LabClient(lab, role) for role in ("c1", "c2", "c3")}
    clients["c1"].ikev2_connect()
    clients["c2"].ikev2_connect()
    clients["c3"].ikev1_connect()  # behind the NAT: ESP-in-UDP on 4500
    before = wait_for(lambda: (t := table(d1)) and len(t) == 3 and t == table(d2) and t,
                      what="the backup's table to equal the active's")
    assert {e[3] for e in before} == {"ESTABLISHED"}
    if dataplane == "ebpf":
        wait_for(lambda: d2.status()["fastpath"]["clients"] == d1.status()["fastpath"]["clients"] >= 6,
                 what="the backup's eBPF map to be warm")

    # ESP from c1 (raw) and c3 (ESP-in-UDP) at 200 packets/s each, across the failover
    stop = threading.Event()
    sent = {"c1": 0, "c3": 0}

    def pump():
        while not stop.is_set():
            sent["c1"] += 1
            clients["c1"].send_esp(0xF1, sent["c1"])
            sent["c3"] += 1
            clients["c3"].send_esp_in_udp(0xF3, sent["c3"])
            time.sleep(0.005)

    t = threading.Thread(target=pump)
    t.start()
    try:
        time.sleep(0.5)
        assert lab.holds_vip("director") and not lab.holds_vip(DIRECTOR2)
        assert esp_times(lab, 0xF1), "no ESP through the active"
        fwd2 = forwarded(d2)
        # the active dies as a box would: daemon and keepalived killed, no more ARP or VRRP from it
        # every keepalived process at once (its VRRP child would otherwise see the parent die and
        # resign with a priority 0 advert: a clean handover, not a crash), and the daemon
        killed = kill_active(lab, d1, ka1)
        wait_for(lambda: lab.holds_vip(DIRECTOR2), timeout=MAX_GAP, what="director2 to take the VIP")
        wait_for(lambda: any(ts[-1] > killed + 0.3 for ts in esp_times(lab, 0xF1).values()), timeout=MAX_GAP,
                 what="ESP through the new active")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()

    # the gap: the longest silence in the real server's log across the kill
    for spi in (0xF1, 0xF3):
        at = esp_times(lab, spi)
        assert len(at) == 1, f"ESP {spi:#x} reached more than one real server: {list(at)}"
        ts = next(iter(at.values()))
        gap = max(b - a for a, b in zip(ts, ts[1:]))
        n_sent = sent["c1" if spi == 0xF1 else "c3"]
        print(f"failover {mode}/{dataplane} spi={spi:#x}: gap {gap * 1000:.0f} ms, "
              f"{n_sent - len(ts)} of {n_sent} ESP packets lost")
        assert gap < MAX_GAP
        assert ts[-1] > killed + 0.3
    st2 = d2.status()
    assert st2["sync"]["role"] == "master"
    assert fwd2 == 0 and forwarded(d2) > 100, "the new active did not forward the ESP"
    # no rescheduling: the new active's table is the one it had before, entry for entry
    after = {e for e in table(d2) if e[2] in {b[2] for b in before}}
    assert after == before
    for role, spi in (("c1", 0xF1), ("c3", 0xF3)):
        rs = next(e[4] for e in before if e[0] == lab.client_addrs[role].replace("198.19.3.2", lab.nat_public))
        assert list(esp_times(lab, spi)) == [lab.rs_addrs.index(rs)]

    # a NEW client conversation is served by the new active
    spi_new = LabClient.new_spi()
    clients["c2"].send_ike(spi_new, v1=True)
    assert clients["c2"].recv_ike(spi_new), "the new active did not serve a new conversation"
    assert any(c["spi_i"] == f"{spi_new:016x}" for c in d2.connections())

    rejoin(lab, d1, d2)


def start_pair(lab, dataplane):
    """Both directors with the sync, keepalived on both; returns (active, backup, active's keepalived)."""
    d1 = DirectorProcess(lab, "director", dataplane=dataplane, daemon_extra=sync_conf(lab, lab.director2_lan, "director")).start()
    d2 = DirectorProcess(lab, "director2", role=DIRECTOR2, dataplane=dataplane,
                         daemon_extra=sync_conf(lab, lab.director_lan, DIRECTOR2)).start()  # fmt: skip
    ka1 = lab.start_keepalived("director", priority=150)
    wait_for(lambda: lab.holds_vip("director"), what="director to become VRRP master")
    lab.start_keepalived(DIRECTOR2, priority=100)
    wait_for(lambda: d1.status()["sync"]["role"] == "master" and d2.status()["sync"]["role"] == "backup",
             what="sync roles")  # fmt: skip
    return d1, d2, ka1


def kill_active(lab, d1, ka1) -> float:
    """The active dies as a box would: its daemon and every keepalived process at once (a VRRP child
    that saw its parent die would resign with a priority-0 advert: a clean handover, not a crash),
    then its links go down (no more ARP or VRRP from it). Returns the time of the kill."""
    ka_pids = [p for p in pids_in_netns([lab.ns["director"]]) if comm(p) == "keepalived"]
    assert ka1.pid in ka_pids and len(ka_pids) >= 2, ka_pids
    for pid in [*ka_pids, d1.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    d1.proc.wait()
    ka1.wait()
    for dev in ("eth0", "eth1"):
        lab.run("director", ["ip", "link", "set", dev, "down"])
    return killed


def rejoin(lab, d1, d2) -> None:
    """The old active comes back (a rebooted box: no VIP on it), as backup, and resyncs by snapshot."""
    for addr, dev in ((f"{lab.vip}/32", "eth0"), (f"{lab.lan_vip}/32", "eth1")):
        lab.run("director", ["ip", "addr", "del", addr, "dev", dev], check=False)
    for dev in ("eth0", "eth1"):
        lab.run("director", ["ip", "link", "set", dev, "up"])
    d1.start()
    lab.start_keepalived("director", priority=150)
    wait_for(lambda: d1.status()["sync"]["synced"], what="the old active to resync")
    assert d1.status()["sync"]["role"] == "backup" and not lab.holds_vip("director")
    wait_for(lambda: table(d1) == table(d2), what="the rejoined director's table to match")
    assert d1.status()["sync"]["snapshots_applied"] >= 1
    for d in (d1, d2):
        s = d.status()["sync"]
        assert s["rejected_mac"] == 0 and s["ignored"] == 0, s
    for d in (d2, d1):
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("mode, dataplane", [("dr", "ebpf"), ("nat", "nfqueue"), ("tun", "ebpf")])
def test_strongswan_clients_keep_their_tunnels_across_a_director_failover(failover_lab, mode, dataplane):
    """Real charon clients (IKEv2 c1, c2; IKEv1 c3 behind the NAT) and responders: the active
    director dies while a 20/s ping runs inside every tunnel. Every client keeps its IKE SA, its
    CHILD_SA and its real server (nothing re-established, nothing rescheduled); the pings resume
    through the backup within MAX_GAP; a new client is served; the old active rejoins as backup."""
    from director.lab.strongswan import PROTECTED, Peers, add_clients, lost_echoes, sa_key, strongswan_prerequisites

    missing = strongswan_prerequisites()
    if missing:
        pytest.fail("strongSwan prerequisites missing: " + "; ".join(missing), pytrace=False)
    lab = failover_lab(mode, responders=False)
    add_clients(lab, 1)  # c4: the new client after the failover
    d1, d2, ka1 = start_pair(lab, dataplane)
    peers = Peers(lab)
    try:
        peers.start_servers()
        roles = [("c1", "psk"), ("c2", "psk"), ("c3", "psk1")]
        clients = [peers.client(r, conn) for r, conn in roles]
        peers.start_clients(clients)
        peers.connect(clients)

        names = [r for r, _ in roles]
        home = {r: peers.server_of(r) for r in names}
        keys = {r: sa_key(peers.clients[r].wait_established()) for r in names}
        assert sorted(home.values()) == [0, 1, 2], home
        before = wait_for(lambda: (t := table(d1)) and len(t) == 3 and t == table(d2) and t, 5.0,
                          "the backup's table to equal the active's")  # fmt: skip
        assert {e[3] for e in before} == {"ESTABLISHED"}, before
        if dataplane == "ebpf":
            wait_for(lambda: d2.status()["fastpath"]["clients"] == d1.status()["fastpath"]["clients"] >= 3,
                     what="the backup's eBPF map to be warm")  # fmt: skip

        vips = {r: peers.clients[r].virtual_ip(conn) for r, conn in roles}
        pings = {r: lab.popen(r, ["ping", "-n", "-i", "0.05", "-W", "1", "-I", vips[r], PROTECTED],
                              stdout=subprocess.PIPE, text=True) for r in names}  # fmt: skip
        try:
            time.sleep(1.0)
            fwd2 = forwarded(d2)
            killed = kill_active(lab, d1, ka1)
            wait_for(lambda: lab.holds_vip(DIRECTOR2), timeout=MAX_GAP, what="director2 to take the VIP")
            took_vip = time.time() - killed
            wait_for(lambda: forwarded(d2) > fwd2 + 3 * 20, timeout=MAX_GAP, what="tunnel traffic through director2")
            time.sleep(1.0)
        finally:
            time.sleep(0.3)  # the last echo's answer
            for p in pings.values():
                p.send_signal(signal.SIGINT)
            outs = {r: p.communicate(timeout=5)[0] for r, p in pings.items()}
        for r in names:
            sent, lost = lost_echoes(outs[r])
            run = longest = 0
            for a, b in zip([None, *lost], lost):
                run = run + 1 if a is not None and b == a + 1 else 1
                longest = max(longest, run)
            gap = 0.05 * (longest + 1)  # silence between the last echo answered and the next one
            print(f"failover {mode}/{dataplane} {r}: {len(lost)} of {sent} echoes lost {lost}, longest gap ~{gap:.2f}s")
            assert sent > 30 and gap <= MAX_GAP, (r, sent, lost)
        for r in names:  # nothing re-established, nothing moved
            assert sa_key(peers.clients[r].wait_established()) == keys[r], f"{r}'s SAs changed across the failover:\n{peers.clients[r].log()[-3000:]}"
            assert peers.server_of(r) == home[r]
        assert {e for e in table(d2) if e[2] in {b[2] for b in before}} == before
        st = d2.status()
        assert st["sync"]["role"] == "master" and st["stats"]["rescheduled_stuck"] == 0, st
        print(f"failover {mode}/{dataplane}: VIP on director2 {took_vip:.2f}s after the kill")

        c4 = peers.client("c4")  # a new client, served by the new active
        peers.start_clients([c4])
        peers.connect([c4])
        assert any(c["client"] == lab.client_addrs["c4"] and c["state"] == "ESTABLISHED" for c in d2.connections())
        assert peers.ping("c4") == (3, 3)
    finally:
        peers.stop()
    rejoin(lab, d1, d2)
