"""The real vpnadm (a subprocess, `python -m director.cli`) against the real daemon in the DR lab.

Each test gets its own lab and daemon (started from the lab's one-service config); every change
goes through vpnadm and is checked through vpnadm's own listings, the kernel's rules, and the
real servers' view of real IKE/ESP traffic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import REPO

VIP2 = "198.18.0.101"  # a second VIP, added by vpnadm (the lab routes only the first one)


@pytest.fixture
def director(make_lab):
    """A DR lab with the daemon running its one-service config; the daemon must stop cleanly."""
    lab = make_lab("dr")
    d = DirectorProcess(lab, scheduler="rr").start()
    yield lab, d
    rc = d.stop()
    assert rc == 0, f"vpn-director exited {rc}:\n{d.log()}"


def vpnadm(d, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "director.cli", "--socket", str(d.control), *args],
                          input=stdin, capture_output=True, text=True, timeout=30, cwd=str(REPO))


def ok(d, *args: str, stdin: str | None = None) -> str:
    p = vpnadm(d, *args, stdin=stdin)
    assert (p.returncode, p.stderr) == (0, ""), f"vpnadm {' '.join(args)}"
    return p.stdout


def listing(d, *args: str) -> dict[str, dict]:
    """`vpnadm -L ...` parsed: {vip: {"line": service fields, "servers": {rip: fields}}}."""
    out: dict[str, dict] = {}
    lines = ok(d, "-L", "-n", *args).splitlines()
    assert lines[0].startswith("IPsec Virtual Server")
    for line in lines[1:]:
        f = line.split()
        if f[0] == "IPSEC":
            svc = out[f[1]] = {"line": f[2:], "servers": {}}
        elif f[0] == "->" and f[1] != "RemoteAddress":
            svc["servers"][f[1]] = f[2:]
        else:
            assert f[0] in ("Prot", "->"), line  # the column headers
    return out


def connections(d, *args: str) -> list[list[str]]:
    lines = ok(d, "-L", "-c", *args).splitlines()
    assert lines[0] == "IPsec connection entries" and lines[1].startswith("pro   expire state")
    return [line.split() for line in lines[2:]]


def rules(lab) -> str:
    return lab.run("director", ["iptables-legacy-save"]).stdout


def test_services_and_servers_built_edited_and_removed_by_vpnadm(director):
    lab, d = director
    rs1, rs2, rs3 = lab.rs_addrs
    assert VIP2 not in rules(lab)
    assert ok(d, "-A", "-V", VIP2, "-s", "wrr") == ""
    assert f"-A VPN_DIRECTOR_RAW -d {VIP2}/32 -p esp -j CT --notrack" in rules(lab)
    assert f"-A PREROUTING -d {VIP2}/32 -i eth0 -j VPN_DIRECTOR" in rules(lab)
    ok(d, "-a", "-V", VIP2, "-r", rs1, "-w", "2")
    ok(d, "-a", "-V", VIP2, "-r", rs2)
    ok(d, "-e", "-V", VIP2, "-r", rs2, "-w", "5")
    table = listing(d)
    assert table[VIP2] == {"line": ["wrr", "affinity", "ip", "16200"],
                           "servers": {rs1: ["Route", "2", "0", "0"], rs2: ["Route", "5", "0", "0"]}}
    assert table[lab.vip]["line"] == ["rr", "affinity", "ip", "3600"]

    # quiesce rs1 on the lab's VIP: it stays listed, and new clients go elsewhere (rr over the rest)
    ok(d, "-e", "-V", lab.vip, "-r", rs1, "-w", "0")
    assert listing(d)[lab.vip]["servers"][rs1] == ["Route", "0", "0", "0"]
    for role in ("c1", "c2"):
        LabClient(lab, role).ikev2_connect()
    assert sorted(c[5] for c in connections(d)) == [rs2, rs3]

    ok(d, "-d", "-V", VIP2, "-r", rs2)
    assert list(listing(d)[VIP2]["servers"]) == [rs1]
    ok(d, "-D", "-V", VIP2)
    assert VIP2 not in listing(d) and VIP2 not in ok(d, "-S") and VIP2 not in rules(lab)
    ok(d, "-C")
    assert ok(d, "-S") == "" and listing(d) == {}
    assert f"-d {lab.vip}/32" not in rules(lab)


def test_stats_connections_zero_and_timeouts_after_real_traffic(director):
    lab, d = director
    c1 = LabClient(lab, "c1")
    spi_i, spi_r, src = c1.ikev2_connect()
    assert src == lab.vip
    c1.send_esp(0x1000, 1)
    c1.send_esp(0x1000, 2)
    time.sleep(0.3)

    (entry,) = connections(d)
    assert (entry[0], entry[2]) == ("IPSEC", "ESTABLISHED")
    assert entry[3:5] == [f"{c1.addr}:4500", lab.vip]
    assert entry[6:] == [f"{spi_i:016x}", f"{spi_r:016x}", "yes"]
    rs = entry[5]
    others = [a for a in lab.rs_addrs if a != rs]
    assert len(others) == 2
    minutes, seconds = map(int, entry[1].split(":"))
    assert 3590 <= minutes * 60 + seconds <= 3600  # the lab's established timeout, counting down
    no_expire = [entry[:1] + entry[2:]]  # time passes between two looks
    assert [e[:1] + e[2:] for e in connections(d, "--client", c1.addr)] == no_expire
    assert connections(d, "--client", lab.client_addrs["c2"]) == []
    assert [e[:1] + e[2:] for e in connections(d, "--server", rs)] == no_expire
    assert connections(d, "--server", others[0]) == []
    assert json.loads(ok(d, "-L", "-c", "--json"))[0]["spi_i"] == f"{spi_i:016x}"

    # Conns InPkts OutPkts InBytes OutBytes: IKE_SA_INIT, IKE_AUTH and two ESP packets went to rs only
    stats = listing(d, "--stats", "--exact")[lab.vip]["servers"]
    conns, inpkts, outpkts, inbytes, outbytes = map(int, stats[rs])
    assert (conns, inpkts, outpkts, outbytes) == (1, 4, 0, 0) and inbytes > 4 * 28
    assert stats[others[0]] == stats[others[1]] == ["0"] * 5
    assert listing(d, "--stats")[lab.vip]["servers"][rs] == stats[rs]  # small numbers: no units
    assert json.loads(ok(d, "-L", "--json"))[0]["stats"]["inpkts"] == 4

    ok(d, "-Z")
    assert all(v == ["0"] * 5 for v in listing(d, "--stats", "--exact")[lab.vip]["servers"].values())
    assert listing(d)[lab.vip]["servers"][rs] == ["Route", "1", "1", "0"]  # zeroing keeps the entry

    assert listing(d, "--timeout")[lab.vip] == {"line": ["30", "3600"], "servers": {}}
    ok(d, "--set", "20", "7200")
    assert listing(d, "--timeout")[lab.vip]["line"] == ["20", "7200"]
    ok(d, "--set", "0", "5000", "0")  # 0 = unchanged
    assert listing(d, "--timeout")[lab.vip]["line"] == ["20", "5000"]


REFUSED = [  # (argv, exit status, text the one-line message must contain)
    (["-A", "-V", "198.18.0.102", "-s", "nosuch"], 1, "scheduler: must be one of"),
    (["-A", "-V", "198.18.0.300"], 1, "vip: not an IPv4 or IPv6 address"),
    (["-A", "-V", "198.18.0.100"], 1, "vip: service 198.18.0.100 exists"),
    (["-a", "-V", "198.18.0.100", "-r", "198.18.1.14", "-w", "70000"], 1, "weight: must be 0..65535"),
    (["-a", "-V", "198.18.0.100", "-r", "198.18.1.300"], 1, "address: not an IPv4 or IPv6 address"),
    (["-A", "-V", "198.18.0.102", "--method", "nat", "--ah"], 1, "ah: AH cannot cross NAT"),
    (["-e", "-V", "198.18.0.100", "-r", "198.18.1.99", "-w", "2"], 1, "address: no real server 198.18.1.99"),
    (["-d", "-V", "198.18.0.100", "-r", "198.18.1.99"], 1, "address: no real server 198.18.1.99"),
    (["-D", "-V", "198.18.0.199"], 1, "vip: no service 198.18.0.199"),
    (["-E", "-V", "198.18.0.100", "-p", "10"], 1, "timeouts.established: must be >="),
    (["-Z", "-V", "198.18.0.199"], 1, "vip: no service 198.18.0.199"),
    (["-a", "-V", "198.18.0.100", "-r", "198.18.1.14", "--stats"], 2, "illegal option combination: -a with --stats"),
    (["-a", "-V", "198.18.0.100", "-r", "198.18.1.14", "-w", "lots"], 2, "-w: not an integer"),
    (["-A", "-V", "198.18.0.102", "-M", "255.0.255.0"], 2, "-M 255.0.255.0: not a prefix length"),
]


def test_refused_changes_name_the_field_and_change_nothing(director):
    lab, d = director
    ok(d, "-A", "-V", VIP2, "-s", "mh", "--scheduler-option", "table_size=251")
    ok(d, "-a", "-V", VIP2, "-r", lab.rs_addrs[0])
    before = ok(d, "-S")
    for argv, status, text in REFUSED:
        p = vpnadm(d, *argv)
        assert (p.returncode, p.stdout) == (status, ""), argv
        assert p.stderr.startswith("vpnadm: ") and p.stderr.count("\n") == 1 and text in p.stderr, (argv, p.stderr)
        assert ok(d, "-S") == before, argv
    # -R is all or nothing: a good service and a bad one restore neither
    bad = f"-A -V {VIP2} -s rr\n-A -V 198.18.0.102 -s rr\n-a -V 198.18.0.102 -r {lab.rs_addrs[1]} -w 70000\n"
    p = vpnadm(d, "-R", stdin=bad)
    assert p.returncode == 1 and "weight: must be 0..65535" in p.stderr and p.stderr.count("\n") == 1
    assert ok(d, "-S") == before
    assert "198.18.0.102" not in rules(lab)


def test_save_clear_restore_round_trip(director):
    lab, d = director
    rs1, rs2, rs3 = lab.rs_addrs
    ok(d, "-A", "-V", VIP2, "-s", "mh", "--scheduler-option", "table_size=251", "--affinity", "ip-port",
       "-p", "600", "--init-timeout", "10", "--retransmit-threshold", "0", "--soft-limit", "100", "--soft-grace", "5")
    ok(d, "-a", "-V", VIP2, "-r", rs1, "-w", "0", "-x", "50", "-y", "10")
    ok(d, "-a", "-V", VIP2, "-r", rs2, "-i", "-w", "7")
    ok(d, "-A", "-V", "198.18.0.102", "--method", "nat", "--no-ah", "-s", "sh")
    ok(d, "-a", "-V", "198.18.0.102", "-r", rs3)
    saved = ok(d, "-S")
    assert saved == (
        f"-A -V {lab.vip} -s rr -p 3600\n"
        + "".join(f"-a -V {lab.vip} -r {a} -w 1\n" for a in lab.rs_addrs)
        + f"-A -V {VIP2} -s mh --scheduler-option table_size=251 --affinity ip-port --init-timeout 10 -p 600"
        " --retransmit-threshold 0 --soft-limit 100 --soft-grace 5\n"
        f"-a -V {VIP2} -r {rs1} -w 0 -x 50 -y 10\n"
        f"-a -V {VIP2} -r {rs2} -i -w 7\n"
        "-A -V 198.18.0.102 -s sh --method nat --no-ah\n"
        f"-a -V 198.18.0.102 -r {rs3} -w 1\n"
    )
    listed = ok(d, "-L", "--timeout")
    ok(d, "-C")
    assert ok(d, "-S") == ""
    ok(d, "-R", stdin=saved)
    assert ok(d, "-S") == saved
    assert ok(d, "-L", "--timeout") == listed
    assert "198.18.0.102" in rules(lab)  # the restored services are installed, not only stored
    # the restored service balances real traffic again
    spi_i, _, src = LabClient(lab, "c1").ikev2_connect()
    assert src == lab.vip and [c[6] for c in connections(d)] == [f"{spi_i:016x}"]


def test_unreachable_daemon_exits_3_and_help_exits_0(tmp_path):
    path = tmp_path / "absent.sock"
    p = subprocess.run([sys.executable, "-m", "director.cli", "-L"], capture_output=True, text=True,
                       cwd=str(REPO), env={"VPNADM_SOCKET": str(path), "PATH": "/usr/bin:/bin"})
    assert (p.returncode, p.stdout) == (3, "")
    assert p.stderr == f"vpnadm: cannot reach vpn-director at {path}: No such file or directory\n"
    p = subprocess.run([sys.executable, "-m", "director.cli", "--help"], capture_output=True, text=True, cwd=str(REPO))
    assert p.returncode == 0 and "vpnadm -a -V ADDRESS -r RIP" in p.stdout and p.stderr == ""


def test_spi_labels_set_by_restore_steer_esp_and_edit_by_vpnadm(director):
    """Labels go on an existing service with -S, an edit, -R (a mask needs every server's label
    at once); then ESP from a client the director never saw goes to the server whose range holds
    its SPI, and -e moves a range. A label outside the mask is refused, naming the field."""
    lab, d = director
    rs1, rs2, rs3 = lab.rs_addrs
    labelled = []
    for line in ok(d, "-S").splitlines():
        if line.startswith("-A "):
            line += " --spi-label-mask 0x00000000ff000000"
        else:
            n = lab.rs_addrs.index(line.split()[4]) + 1
            line += f" --spi-label 0x00000000{0x40 + n:02x}000000 --esp-spi-min {0x40 + n:#x}000000" \
                    f" --esp-spi-max {0x40 + n:#x}ffffff"
        labelled.append(line + "\n")
    ok(d, "-R", stdin="".join(labelled))
    assert ok(d, "-S") == "".join(labelled)

    c1 = LabClient(lab, "c1")
    c1.send_esp(0x42000010, 1)  # rs2's range (label 0x42)
    time.sleep(0.3)
    (entry,) = connections(d)
    assert (entry[2], entry[3], entry[5]) == ("ESTABLISHED", f"{c1.addr}:0", rs2)  # raw ESP: no port
    assert d.status()["stats"]["label_steered"] == 1

    ok(d, "-e", "-V", lab.vip, "-r", rs3, "--esp-spi-min", "0x43000000", "--esp-spi-max", "0x4300ffff")
    assert f"-a -V {lab.vip} -r {rs3} -w 1 --spi-label 0x0000000043000000 --esp-spi-min 0x43000000" \
           " --esp-spi-max 0x4300ffff\n" in ok(d, "-S")
    c2 = LabClient(lab, "c2")
    c2.send_esp(0x43000010, 1)
    time.sleep(0.3)
    assert [e[5] for e in connections(d, "--client", c2.addr)] == [rs3]

    before = ok(d, "-S")
    p = vpnadm(d, "-e", "-V", lab.vip, "-r", rs1, "--spi-label", "0x0000000141000000")
    assert (p.returncode, p.stdout) == (1, "") and p.stderr.count("\n") == 1
    assert "spi_label: 0x141000000 has bits outside the mask" in p.stderr, p.stderr
    assert ok(d, "-S") == before
