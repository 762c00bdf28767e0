"""The control socket of the real daemon in the lab: a hostile or broken request gets an answer and
the daemon goes on (table kept, packets flowing); the socket's path is never anything but a socket."""

from __future__ import annotations

import json
import socket

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess


def table(d) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "expires_in"} for c in d.connections()]


def raw_request(path, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        return json.loads(s.makefile("rb").readline())


def test_a_file_at_the_socket_path_is_refused_and_kept(make_lab):
    lab = make_lab("dr")
    d = DirectorProcess(lab)
    d.control.write_text("an operator's file\n")
    with pytest.raises(RuntimeError) as e:
        d.start()
    assert d.proc.returncode == 1
    assert f"vpn-director: daemon.control_socket: {d.control} exists and is not a socket; not removing it" in str(e.value)
    assert d.control.read_text() == "an operator's file\n"


def test_a_command_that_is_not_a_name_does_not_stop_the_daemon(make_lab):
    lab = make_lab("dr")
    d = DirectorProcess(lab, scheduler="rr").start()
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        before = table(d)
        assert len(before) == 1
        for cmd in ([], {}, 7):  # `cmd in MUTATIONS` raised TypeError on the first two and ended the loop
            answer = raw_request(d.control, json.dumps({"v": 1, "cmd": cmd}).encode() + b"\n")
            assert answer["ok"] is False and answer["error"].startswith("cmd: must be a command name"), answer
        # a client holding half a line does not hold the daemon: others are answered, ESP still flows
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.connect(str(d.control))
            slow.sendall(b'{"v": 1, "cmd": "sta')
            assert table(d) == before  # the table as it was
            spi = LabClient.new_spi()
            c1.send_ike(spi, v1=True)
            assert c1.recv_ike(spi), "the daemon stopped deciding packets"
            slow.sendall(b'tus"}\n')
            slow.settimeout(5)
            assert json.loads(slow.makefile("rb").readline())["ok"] is True
        assert d.proc.poll() is None, d.log()
    finally:
        assert d.stop() == 0, d.log()
