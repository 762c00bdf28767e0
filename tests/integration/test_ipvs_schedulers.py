"""fo, ovf and twos, quiescent expiry and mh's flags through the real daemon in the DR lab.

Crafted IKE from the lab's clients (c1, c2 and c3 behind the NAT) reaches the VIP, the daemon
chooses, the lab's responders on the real servers answer, and the choice is read back from the
daemon's connection table. Every change goes through the real vpnadm (a subprocess).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.netns import REPO


def vpnadm(d, *args: str, stdin: str | None = None) -> str:
    p = subprocess.run([sys.executable, "-m", "director.cli", "--socket", str(d.control), *args],
                       input=stdin, capture_output=True, text=True, timeout=30, cwd=str(REPO))
    assert (p.returncode, p.stderr) == (0, ""), f"vpnadm {' '.join(args)}"
    return p.stdout


@pytest.fixture
def start(make_lab):
    procs = []

    def run(scheduler: str, weights, extra_service: str = ""):
        lab = make_lab("dr")
        d = DirectorProcess(lab, scheduler=scheduler, weights=weights, extra_service=extra_service).start()
        procs.append(d)
        return lab, d

    yield run
    for d in procs:
        rc = d.stop()
        assert rc == 0, f"vpn-director exited {rc}:\n{d.log()}"


def connect(lab, d, role: str) -> tuple[int, str]:
    """One IKEv2 conversation from ``role`` made ESTABLISHED at the director; (spi_i, its real server)."""
    c = LabClient(lab, role)
    try:
        spi_i, _, src = c.ikev2_connect()
    finally:
        c.close()
    assert src == lab.vip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for e in d.connections():
            if e["spi_i"] == f"{spi_i:016x}" and e["state"] == "ESTABLISHED":
                return spi_i, e["rs_address"]
        time.sleep(0.02)
    raise AssertionError(f"{role}: conversation {spi_i:016x} not ESTABLISHED: {d.connections()}")


def test_fo_sends_everyone_to_the_heaviest_and_quiescent_expiry_lets_a_drain_finish(start):
    lab, d = start("fo", (1, 3, 2), extra_service="expire_quiescent = true")
    rs1, rs2, rs3 = lab.rs_addrs
    assert vpnadm(d, "-S").splitlines()[0] == f"-A -V {lab.vip} -s fo -p 3600 --expire-quiescent"
    first = {role: connect(lab, d, role) for role in ("c1", "c2")}
    assert {rs for _, rs in first.values()} == {rs2}
    vpnadm(d, "-e", "-V", lab.vip, "-r", rs2, "-w", "0")  # drain rs2: fo fails over to rs3 (weight 2)
    _, again = connect(lab, d, "c1")  # c1's next conversation: scheduled afresh, not persisted to rs2
    assert again == rs3
    _, new = connect(lab, d, "c3")
    assert new == rs3
    by_spi = {e["spi_i"]: e for e in d.connections()}
    for spi_i, rs in first.values():  # the live conversations stay on the drained server
        assert by_spi[f"{spi_i:016x}"]["rs_address"] == rs2
    assert d.status()["stats"]["rescheduled_quiesced"] == 1
    # without quiescent expiry, c2's next conversation follows its live state to rs2
    vpnadm(d, "-E", "-V", lab.vip, "--no-expire-quiescent")
    _, follows = connect(lab, d, "c2")
    assert follows == rs2
    assert d.status()["stats"]["rescheduled_quiesced"] == 1


def test_ovf_fills_the_first_heaviest_server_to_its_weight_then_overflows(start):
    lab, d = start("ovf", (1, 1, 1))
    rs1, rs2, rs3 = lab.rs_addrs
    # rs1 takes clients while its ESTABLISHED count is <= its weight (1): two, then rs2
    assert [connect(lab, d, role)[1] for role in ("c1", "c2", "c3")] == [rs1, rs1, rs2]
    vpnadm(d, "-e", "-V", lab.vip, "-r", rs1, "-w", "3")  # room again on rs1 (2 <= 3)
    vpnadm(d, "-E", "-V", lab.vip, "--expire-quiescent")
    vpnadm(d, "-e", "-V", lab.vip, "-r", rs2, "-w", "0")
    assert connect(lab, d, "c3")[1] == rs1  # c3's state is on the quiesced rs2: scheduled afresh


def test_twos_never_draws_a_quiesced_server_and_mh_flags_round_trip(start):
    lab, d = start("twos", (1, 1, 0))
    rs1, rs2, rs3 = lab.rs_addrs
    chosen = [connect(lab, d, role)[1] for role in ("c1", "c2", "c3")]
    assert set(chosen) <= {rs1, rs2}, chosen
    # mh with IPVS's flags, set and read back by vpnadm; -S output restores unchanged
    vpnadm(d, "-E", "-V", lab.vip, "-s", "mh", "-b", "mh-fallback,mh-port", "--scheduler-option", "table_size=251")
    saved = vpnadm(d, "-S")
    assert saved.splitlines()[0] == (f"-A -V {lab.vip} -s mh -b mh-fallback,mh-port --scheduler-option table_size=251 "
                                     "-p 3600")
    assert vpnadm(d, "-L", "-n").splitlines()[3].split()[2:4] == ["mh", "(mh-fallback,mh-port)"]
    vpnadm(d, "-R", stdin=saved)
    assert vpnadm(d, "-S") == saved
    # rs1 down-weighted to 0 and rs3 up: a new client never lands on rs1
    vpnadm(d, "-e", "-V", lab.vip, "-r", rs3, "-w", "1")
    vpnadm(d, "-e", "-V", lab.vip, "-r", rs1, "-w", "0")
    vpnadm(d, "-E", "-V", lab.vip, "--expire-quiescent")
    for role in ("c1", "c2", "c3"):
        assert connect(lab, d, role)[1] != rs1
