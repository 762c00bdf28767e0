"""Kernel-forwarded ESP is counted: vpnadm --stats / --rate and Prometheus read one model that adds
the eBPF fast path's per-server counters to the daemon's, in the lab with the real daemon."""

from __future__ import annotations

import re
import subprocess
import sys

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import REPO
from director.lab.wait import wait_for

N = 300  # ESP packets of each client, forwarded in the kernel
ESP_LEN = 20 + 8 + 64  # IPv4 header, SPI and sequence, 64 bytes of payload (LabClient.send_esp)
NATT_LEN = 20 + 8 + 8 + 64  # the same inside UDP 4500


def vpnadm(d, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "director.cli", "--socket", str(d.control), *args],
                       capture_output=True, text=True, timeout=30, cwd=str(REPO))
    assert (p.returncode, p.stderr) == (0, ""), f"vpnadm {' '.join(args)}"
    return p.stdout


def columns(d, fmt: str) -> dict[str, list[float]]:
    """`vpnadm -L -n --stats|--rate --exact`: {vip or rip: its five numbers}."""
    out = {}
    for line in vpnadm(d, "-L", "-n", fmt, "--exact").splitlines()[3:]:
        f = line.split()
        name = f[1]
        out[name] = [float(x) for x in f[2:]]
    return out


def scrape(lab) -> dict[str, float]:
    text = lab.run("director", ["python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                                "'http://127.0.0.1:9816/metrics', timeout=5).read().decode())"]).stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(director_[a-z_]+\{[^}]*\}|director_[a-z_]+) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def rs_metric(name: str, vip: str, rip: str, kind: str) -> str:
    return f'{name}{{direction="in",kind="{kind}",server="{rip}",service="{vip}"}}'


def test_kernel_forwarded_esp_shows_in_vpnadm_and_prometheus(make_lab):
    lab = make_lab("dr")
    d = DirectorProcess(lab, dataplane="ebpf", scheduler="rr", metrics="127.0.0.1:9816").start()
    try:
        c1, c3 = LabClient(lab, "c1"), LabClient(lab, "c3")
        c1.ikev2_connect()
        c3.ikev1_connect()
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 4, what="both clients in the map")
        conns = d.connections()
        rs1 = next(c["rs_address"] for c in conns if c["client"] == lab.client_addrs["c1"])
        rs3 = next(c["rs_address"] for c in conns if c["client"] != lab.client_addrs["c1"])  # c3, behind the NAT
        vip = lab.vip
        stats0, metrics0 = columns(d, "--stats"), scrape(lab)
        slow0 = d.status()["stats"]["packets"]
        for seq in range(1, N + 1):
            c1.send_esp(0xC1, seq)
            c3.send_esp_in_udp(0xC3, seq)
        wait_for(lambda: sum(1 for i in range(3) for r in lab.received(i) if r.get("spi") in (0xC1, 0xC3)) == 2 * N,
                 what=f"{2 * N} ESP packets at the real servers")
        assert d.status()["stats"]["packets"] == slow0  # not one reached the daemon
        assert d.status()["fastpath"]["forwarded"]["ESP"] >= N

        stats = columns(d, "--stats")  # Conns InPkts OutPkts InBytes OutBytes
        want = {rs1: [0, 0], rs3: [0, 0]}
        want[rs1][0] += N
        want[rs1][1] += N * ESP_LEN
        want[rs3][0] += N
        want[rs3][1] += N * NATT_LEN
        for rip, (pkts, byts) in want.items():
            assert stats[rip][1] - stats0[rip][1] == pkts, (rip, stats0[rip], stats[rip])
            assert stats[rip][3] - stats0[rip][3] == byts
        assert stats[vip][1] - stats0[vip][1] == 2 * N
        assert stats[vip][3] - stats0[vip][3] == N * (ESP_LEN + NATT_LEN)

        m = scrape(lab)
        esp, natt = (rs_metric("director_real_server_packets_total", vip, rs1, "esp"),
                     rs_metric("director_real_server_packets_total", vip, rs3, "esp_in_udp"))
        assert m[esp] - metrics0.get(esp, 0) == N
        assert m[natt] - metrics0.get(natt, 0) == N
        b = rs_metric("director_real_server_bytes_total", vip, rs1, "esp")
        assert m[b] - metrics0.get(b, 0) == N * ESP_LEN
        fwd = f'director_packets_total{{kind="esp",service="{vip}",verdict="forward"}}'
        assert m[fwd] - metrics0.get(fwd, 0) == N

        # --rate comes from the same totals: the next tick sees c1's server's packets
        wait_for(lambda: columns(d, "--rate")[rs1][1] > 0, timeout=3.0, what="a non-zero InPPS")
        others = [a for a in lab.rs_addrs if a not in (rs1, rs3)]
        assert all(columns(d, "--rate")[a][1] == 0 for a in others)

        # -Z zeroes the kernel's share too; what the kernel forwards next counts from zero
        vpnadm(d, "-Z")
        assert columns(d, "--stats")[rs1][1] == 0
        for seq in range(N + 1, N + 6):
            c1.send_esp(0xC1, seq)
        wait_for(lambda: columns(d, "--stats")[rs1][1] == 5, what="5 packets counted after -Z")
    finally:
        assert d.stop() == 0, d.log()
