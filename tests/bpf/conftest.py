"""Fixture of the BPF tests: ``world``, the compiled fast path loaded once per session (see bpf_world.py)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from bpf_world import BPFFS, Netns, World, _sh, require


@pytest.fixture(scope="session")
def world():
    """The loaded fast path in its namespace; torn down (pins, objects, namespace) at the end."""
    require()
    problems = []
    mounted = False
    if subprocess.run(["mountpoint", "-q", str(BPFFS)]).returncode != 0:
        _sh("mount", "-t", "bpf", "bpf", str(BPFFS))
        mounted = True
    pin_dir = BPFFS / f"vpnd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    netns = w = None
    try:
        netns = Netns()
        w = World(netns, pin_dir)
        yield w
    finally:
        if w is not None:
            w.close()
        if netns is not None:
            netns.close()
            if Path(f"/run/netns/{netns.name}").exists():
                problems.append(f"namespace {netns.name} left behind")
        for pin in pin_dir.iterdir():
            pin.unlink()
        pin_dir.rmdir()
        if mounted and not any(BPFFS.iterdir()):
            subprocess.run(["umount", str(BPFFS)], capture_output=True)
    if problems:
        pytest.fail("BPF test teardown: " + "; ".join(problems), pytrace=False)
