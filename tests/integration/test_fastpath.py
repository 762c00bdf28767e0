"""What only the eBPF fast path promises, in the lab with the real daemon and real packets."""

from __future__ import annotations

import os
import socket
import subprocess
import struct
import threading
import time
from pathlib import Path

import pytest

from director.dataplane.ebpf import object_dir
from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.wait import wait_for

MODES = ["dr", "tun", "nat"]


def esp_at(lab, spi: int) -> dict[int, int]:
    """How many ESP packets with ``spi`` each real server received."""
    out = {}
    for i in range(3):
        n = sum(1 for r in lab.received(i) if r["kind"] in ("esp", "esp_in_udp") and r["spi"] == spi)
        if n:
            out[i] = n
    return out


def assert_esp_stays_in_the_kernel(lab, d) -> None:
    """c1 (IKEv2, raw ESP) and c3 (IKEv1 behind the NAT, ESP-in-UDP) establish, then send 50 ESP
    packets each: all arrive, each client's on one server, and not one reaches the daemon."""
    c1, c3 = LabClient(lab, "c1"), LabClient(lab, "c3")
    c1.ikev2_connect()
    c3.ikev1_connect()
    wait_for(lambda: d.status()["fastpath"]["clients"] >= 4, what="the map to hold both clients")
    slow_before = d.status()["stats"]["packets"]
    for seq in range(1, 51):
        c1.send_esp(0xE1, seq)
        c3.send_esp_in_udp(0xE3, seq)
    wait_for(lambda: sum(esp_at(lab, 0xE1).values()) == 50 and sum(esp_at(lab, 0xE3).values()) == 50,
             what="100 ESP packets at the real servers")
    st = d.status()
    assert st["stats"]["packets"] == slow_before  # not one reached the daemon
    assert st["fastpath"]["forwarded"]["ESP"] == 50 and st["fastpath"]["forwarded"]["ESP_IN_UDP"] == 50
    assert len(esp_at(lab, 0xE1)) == 1 and len(esp_at(lab, 0xE3)) == 1  # each on one server


@pytest.mark.parametrize("mode", MODES)
def test_established_esp_never_reaches_user_space(make_lab, mode):
    lab = make_lab(mode)
    d = DirectorProcess(lab, dataplane="ebpf").start()
    try:
        assert_esp_stays_in_the_kernel(lab, d)
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("mode", MODES)
def test_restart_loses_no_esp_and_adopts_the_clients(make_lab, mode):
    lab = make_lab(mode)
    d = DirectorProcess(lab, dataplane="ebpf", scheduler="rr").start()
    try:
        c1, c2 = LabClient(lab, "c1"), LabClient(lab, "c2")
        c1.ikev2_connect()
        c2.ikev2_connect()
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 4, what="both clients in the map")
        rs_of_c1 = next(c["rs_address"] for c in d.connections() if c["client"] == lab.client_addrs["c1"])

        sent = 0
        stop = threading.Event()

        def pump():
            nonlocal sent
            while not stop.is_set() and sent < 2000:
                sent += 1
                c1.send_esp(0x5E5E, sent)
                time.sleep(0.002)

        t = threading.Thread(target=pump)
        t.start()
        time.sleep(0.2)
        assert d.stop() == 0, d.log()  # the daemon is gone; the fast path keeps forwarding
        time.sleep(0.3)
        d.start()
        time.sleep(0.2)
        stop.set()
        t.join()
        wait_for(lambda: sum(esp_at(lab, 0x5E5E).values()) == sent, what=f"{sent} ESP packets")
        assert esp_at(lab, 0x5E5E) == {lab.rs_addrs.index(rs_of_c1): sent}  # none lost, none moved
        st = d.status()
        assert st["fastpath"]["adopted"] == 2  # c1 and c2, each by its IKE port
        # after the restart, a new conversation of c1 (a rekey by reauthentication) stays on its server
        spi = LabClient.new_spi()
        c1.send_ike(spi, v1=True)
        assert c1.recv_ike(spi)
        i = lab.rs_addrs.index(rs_of_c1)
        lab.wait_received(i, lambda r: r["kind"] == "ike" and r["spi_i"] == f"{spi:016x}")
    finally:
        assert d.stop() == 0, d.log()


def test_fast_path_activity_keeps_entries_alive(make_lab):
    lab = make_lab("dr")
    d = DirectorProcess(lab, dataplane="ebpf", init_timeout=1.0).start()
    d.config_path.write_text(d.config_path.read_text().replace("established = 3600", "established = 2"))
    answer = d.request("reload")
    assert answer["ok"], answer
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        end = time.monotonic() + 4.5  # more than twice the 2 s timeout, IKE silent, ESP flowing
        seq = 0
        while time.monotonic() < end:
            seq += 1
            c1.send_esp(0xAC, seq)
            time.sleep(0.05)
        st = d.status()
        assert st["established"] == 1 and st["table"]["refreshed_elsewhere"] >= 1
        time.sleep(3.5)  # ESP stops: now it expires and leaves the map
        wait_for(lambda: d.status()["established"] == 0, what="expiry")
        wait_for(lambda: d.status()["fastpath"]["clients"] == 0, what="the map emptied")
    finally:
        assert d.stop() == 0, d.log()


def test_nat_replies_are_rewritten_in_the_kernel(make_lab):
    lab = make_lab("nat")
    d = DirectorProcess(lab, dataplane="ebpf").start()
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        rs = next(c["rs_address"] for c in d.connections())
        role = lab.rs_roles[lab.rs_addrs.index(rs)]
        out = lab.socket(role, socket.AF_INET, socket.SOCK_RAW, 50)
        for seq in range(1, 11):  # the real server's ESP back to the client, through its gateway
            out.sendto(struct.pack(">II", 0xBACC, seq) + bytes(32), (lab.client_addrs["c1"], 0))
        got = []
        c1.esp.settimeout(2.0)
        while len(got) < 10:
            data, (src, _) = c1.esp.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            if struct.unpack_from(">I", data, ihl)[0] == 0xBACC:
                got.append(src)
        assert set(got) == {lab.vip}
        assert d.status()["fastpath"]["replies"] == 10
    finally:
        assert d.stop() == 0, d.log()


# -- the XDP hook (daemon.fastpath_hook = "xdp", docs/fastpath.md "The XDP hook") ----------------------

XDP = 'fastpath_hook = "xdp"'


def lan_peer_gro(lab, on: bool) -> None:
    """What the lab needs for XDP: the veth peer of the director's eth1 (a bridge port in sw) must
    run NAPI to take XDP-redirected frames; GRO on does it (else they are dropped silently)."""
    lab.run("sw", ["ethtool", "-K", "director-eth1", "gro", "on" if on else "off"])


def xdp_lab(lab) -> None:
    """The lab made fit for the XDP hook: GRO on eth1's peer, and the clients' checksum offload off.
    A client's UDP leaves its veth with a partial checksum (CHECKSUM_PARTIAL) that XDP cannot
    finish; director_xdp passes such ESP-in-UDP to the slow path. Senders behind a NIC never
    produce one; in the lab the clients' stack computes the checksum itself."""
    lan_peer_gro(lab, True)
    for role in ("c1", "c2", "c3"):
        lab.run(role, ["ethtool", "-K", "eth0", "tx", "off"])


def client_hooks(lab) -> tuple[str | None, bool]:
    """(name of the native XDP program on the director's eth0, whether a tc filter is there)."""
    import json

    link = json.loads(lab.run("director", ["ip", "-j", "-d", "link", "show", "eth0"]).stdout)[0]
    xdp = link.get("xdp", {})
    name = xdp.get("prog", {}).get("name") if xdp.get("mode") == 1 else None
    tc = lab.run("director", ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout.strip()
    return name, bool(tc)


@pytest.mark.parametrize("mode", MODES)
def test_xdp_hook_forwards_established_esp_in_the_kernel(make_lab, mode):
    lab = make_lab(mode)
    xdp_lab(lab)
    d = DirectorProcess(lab, dataplane="ebpf", daemon_extra=XDP).start()
    try:
        assert client_hooks(lab) == ("director_xdp", False)
        assert_esp_stays_in_the_kernel(lab, d)
    finally:
        assert d.stop() == 0, d.log()


def test_xdp_hook_refused_where_redirects_would_vanish(make_lab):
    """eth1's veth peer without GRO or XDP drops redirected frames silently: the daemon refuses XDP,
    names the interface and the fix, and attaches nothing."""
    lab = make_lab("dr", responders=False)
    lan_peer_gro(lab, False)
    with pytest.raises(RuntimeError) as e:
        DirectorProcess(lab, dataplane="ebpf", daemon_extra=XDP).start()
    assert "fastpath_hook xdp: eth1 (server_interface) cannot transmit XDP-redirected frames" in str(e.value)
    assert "gro on" in str(e.value)
    assert client_hooks(lab) == (None, False)


def test_switching_hooks_across_restarts_loses_no_esp(make_lab):
    """tc -> xdp -> tc with ESP flowing: each daemon puts its hook in place before removing the
    other one, and a restart with the same hook replaces the program (nothing stacks)."""
    lab = make_lab("nat")
    xdp_lab(lab)
    pins = f"/sys/fs/bpf/{lab.prefix}-director"  # one set of maps for both configs, as in production
    tc_cfg = DirectorProcess(lab, "dtc", dataplane="ebpf", pin_dir=pins)
    xdp_cfg = DirectorProcess(lab, "dxdp", dataplane="ebpf", daemon_extra=XDP, pin_dir=pins)
    d = tc_cfg.start()
    c1 = LabClient(lab, "c1")
    c1.ikev2_connect()
    wait_for(lambda: d.status()["fastpath"]["clients"] >= 2, what="c1 in the map")
    sent = 0
    stop = threading.Event()

    def pump():
        nonlocal sent
        while not stop.is_set() and sent < 3000:
            sent += 1
            c1.send_esp(0x5A5A, sent)
            time.sleep(0.002)

    t = threading.Thread(target=pump)
    t.start()
    try:
        seen = []
        for nxt in (xdp_cfg, xdp_cfg, tc_cfg):
            time.sleep(0.2)
            assert d.stop() == 0, d.log()
            d = nxt.start()
            seen.append(client_hooks(lab))
        time.sleep(0.2)
    finally:
        stop.set()
        t.join()
    try:
        assert seen == [("director_xdp", False), ("director_xdp", False), (None, True)]
        wait_for(lambda: sum(esp_at(lab, 0x5A5A).values()) == sent, what=f"{sent} ESP packets")
        assert len(esp_at(lab, 0x5A5A)) == 1
    finally:
        assert d.stop() == 0, d.log()


def test_pinned_maps_of_another_layout_are_replaced_and_forwarding_goes_on(make_lab):
    """An upgrade that changed a struct, or a new daemon.capacity: the pinned map no longer fits
    the new object. The daemon replaces it (logged) instead of failing to load; a `config` of the
    old size is rewritten at once, and with ESP flowing through the old programs nothing is lost."""
    lab = make_lab("dr")
    pins = f"/sys/fs/bpf/{lab.prefix}-director"
    d = DirectorProcess(lab, dataplane="ebpf", pin_dir=pins).start()
    c1 = LabClient(lab, "c1")
    c1.ikev2_connect()
    wait_for(lambda: d.status()["fastpath"]["clients"] >= 2, what="c1 in the map")
    assert d.stop() == 0, d.log()
    # what an older version left: `config` 16 bytes wide, `admit` missing
    os.unlink(f"{pins}/config")
    os.unlink(f"{pins}/admit")
    subprocess.run(["bpftool", "map", "create", f"{pins}/config", "type", "array", "key", "4", "value", "16",
                    "entries", "1", "name", "config"], check=True)  # fmt: skip
    bigger = DirectorProcess(lab, "d2", dataplane="ebpf", pin_dir=pins, daemon_extra="capacity = 8192")
    d = bigger.start()
    try:
        log = d.log()
        assert "fastpath.replaced_map name=config pinned=4/16/1 want=4/20/1" in log, log
        assert "fastpath.replaced_map name=clients" in log and "cannot be adopted" in log, log
        c1.ikev2_connect()  # a fresh exchange: the new map learns c1 again
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 2, what="c1 in the new map")
        before = d.status()["stats"]["packets"]
        for seq in range(1, 51):
            c1.send_esp(0x6B6B, seq)
        wait_for(lambda: sum(esp_at(lab, 0x6B6B).values()) == 50, what="50 ESP packets")
        assert d.status()["stats"]["packets"] == before  # forwarded in the kernel, with the new maps
    finally:
        assert d.stop() == 0, d.log()


def unit_capabilities() -> list[str]:
    """The capability bounding set the shipped systemd unit grants (its CapabilityBoundingSet= line)."""
    unit = Path(__file__).resolve().parents[2] / "deploy" / "vpn-director.service"
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError(f"{unit}: no CapabilityBoundingSet= line")


def test_xdp_restart_under_the_units_capabilities_recognises_its_own_program(make_lab):
    """Without CAP_SYS_ADMIN an attached program cannot be opened by its id to read its name, so a
    restarted daemon used to take its own XDP program for someone else's and refuse to start. It
    now knows it by the id of the program it pinned; a stranger's XDP program is still refused."""
    caps = unit_capabilities()
    assert "CAP_SYS_ADMIN" not in caps  # what this test is about
    lab = make_lab("dr")
    xdp_lab(lab)
    pins = f"/sys/fs/bpf/{lab.prefix}-director"
    runs = [DirectorProcess(lab, f"dxdp{i}", dataplane="ebpf", daemon_extra=XDP, pin_dir=pins, capabilities=caps)
            for i in range(2)]
    d = runs[0].start()
    try:
        assert client_hooks(lab) == ("director_xdp", False)
        assert d.stop() == 0, d.log()
        d = runs[1].start()  # refused before: "already runs XDP program '?', not ours"
        assert client_hooks(lab) == ("director_xdp", False)
        assert_esp_stays_in_the_kernel(lab, d)
    finally:
        assert d.stop() == 0, d.log()
    # a foreign XDP program (ours loaded by hand, but not the pinned one) stays refused
    lab.run("director", ["ip", "link", "set", "dev", "eth0", "xdp", "off"])
    obj = object_dir() / "director_xdp.o"
    lab.run("director", ["ip", "link", "set", "dev", "eth0", "xdpdrv", "obj", str(obj), "sec", "xdp"])
    stranger = DirectorProcess(lab, "dxdp2", dataplane="ebpf", daemon_extra=XDP, pin_dir=pins, capabilities=caps)
    with pytest.raises(RuntimeError, match="already runs XDP program"):
        stranger.start()


def test_auto_hook_takes_tc_on_a_veth_and_says_why(make_lab):
    """fastpath_hook = "auto" (the default) with a veth as client interface, even one fit for XDP
    (GRO on the LAN peer: the explicit "xdp" hook loads there): tc, and the log and the status
    say why; the fast path forwards."""
    lab = make_lab("dr")
    lan_peer_gro(lab, True)
    d = DirectorProcess(lab, dataplane="ebpf").start()
    try:
        fp = d.status()["fastpath"]
        assert (fp["hook"], client_hooks(lab)) == ("tc", (None, True))
        assert "eth0 is a veth" in fp["hook_reason"]
        assert "fastpath.hook_auto chose=tc reason=eth0 is a veth" in d.log()
        assert_esp_stays_in_the_kernel(lab, d)
    finally:
        assert d.stop() == 0, d.log()
