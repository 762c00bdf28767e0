"""Integration fixtures: real namespaces built by director.lab, always torn down.

``make_lab(mode)`` builds (and starts the responders of) as many labs as a test wants; ``lab`` is
one started lab, parametrized over every mode unless a test narrows it with
``@pytest.mark.parametrize("lab", ["tun"], indirect=True)``. A missing prerequisite fails the
test with a message that names it: these tests are never skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from director.lab.netns import DECAP_OBJ, MODES, Lab, cleanup, list_labs

EBPF_SRC = DECAP_OBJ.parents[1] / "rs_decap.bpf.c"


def lab_prerequisites(mode: str) -> list[str]:
    """Everything missing for a lab in ``mode``, as readable sentences (empty: all present)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, veth, iptables and tc need it; CI runs as root)")
    for tool in ("ip", "tc", "nsenter", "iptables"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH (Debian: iproute2 / util-linux / iptables)")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun (the TUN driver)")
    if mode == "tun":
        if not DECAP_OBJ.is_file():
            missing.append(f"{DECAP_OBJ} (build it: `make -C ebpf`, clang + libbpf-dev)")
        elif EBPF_SRC.is_file() and EBPF_SRC.stat().st_mtime > DECAP_OBJ.stat().st_mtime:
            missing.append(f"an up-to-date {DECAP_OBJ} (older than {EBPF_SRC.name}: `make -C ebpf`)")
    return missing


@pytest.fixture
def ecmp_prerequisites() -> None:
    """Fails the test, naming what is missing, unless an ECMP lab (BIRD included) can be built."""
    from director.lab.ecmp import bird_exe
    from director.lab.netns import LabError

    missing = lab_prerequisites("dr")
    try:
        bird_exe()
    except LabError as e:
        missing.append(str(e))
    if missing:
        pytest.fail("ECMP lab prerequisites missing: " + "; ".join(missing), pytrace=False)


@pytest.fixture
def make_lab():
    """Factory: ``make_lab(mode, responders=True, silent=(), return_via_director=False, ipv6=False)``
    -> a started Lab, torn down after."""
    labs: list[Lab] = []

    def make(mode: str = "dr", *, responders: bool = True, silent=(), return_via_director: bool = False,
             ipv6: bool = False) -> Lab:  # fmt: skip
        missing = lab_prerequisites(mode)
        if missing:
            pytest.fail(f"lab ({mode}) prerequisites missing: " + "; ".join(missing), pytrace=False)
        lab = Lab(mode, return_via_director=return_via_director, ipv6=ipv6)
        labs.append(lab)
        lab.up()
        if responders:
            lab.start_responders(silent=silent)
        return lab

    yield make

    problems = []
    for lab in labs:
        try:
            lab.down()
        except Exception as e:  # keep tearing down the others
            problems.append(f"{lab.prefix}: down() raised {e!r}")
        leftovers = list_labs(lab.prefix).get(lab.prefix)
        if leftovers:
            problems.append(f"{lab.prefix}: namespaces left after down(): {leftovers}")
            cleanup(lab.prefix)
    if problems:
        pytest.fail("lab teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture(params=MODES)
def lab(request, make_lab) -> Lab:
    """One started lab (responders running) per mode."""
    return make_lab(request.param)


@pytest.fixture(params=["nfqueue", "ebpf"])
def run_director(request):
    """Factory: ``run_director(lab, **config)`` -> the real daemon running in the lab, once per dataplane.

    Every test that uses it runs with the NFQUEUE dataplane alone and with the eBPF fast path.
    The daemon must exit 0 on SIGTERM (a clean stop) or the test fails.
    """
    from director.lab.director_proc import DirectorProcess

    procs = []

    def start(lab, **kw):
        kw.setdefault("dataplane", request.param)
        d = DirectorProcess(lab, **kw).start()
        assert d.status()["dataplane"] == kw["dataplane"], d.log()
        procs.append(d)
        return d

    yield start
    for d in procs:
        rc = d.stop()
        assert rc == 0, f"vpn-director exited {rc}:\n{d.log()}"
