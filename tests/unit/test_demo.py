"""The decision-core demo (``vpn-director demo --core``): it runs without a kernel and says what it
promises. The lab demo needs namespaces: tests/integration/test_lab.py runs its parts."""

import io

import pytest

from director.lab.demo import run_demo


def test_core_demo_keeps_every_client_on_one_server_and_answers_the_stranger():
    out = io.StringIO()
    assert run_demo(core=True, clients=6, scheduler="wlc", out=out) == 0
    text = out.getvalue()
    assert "stranger ESP" in text and "ICMP 3/2 protocol-unreachable" in text
    assert "clients split across servers=0" in text
    assert text.count("ESTABLISHED ") == 6 + 1  # six clients and client0's rekey (adopted)


def test_core_demo_refuses_a_bad_client_count():
    with pytest.raises(ValueError, match="--clients"):
        run_demo(core=True, clients=1, out=io.StringIO())
