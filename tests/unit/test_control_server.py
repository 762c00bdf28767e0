"""The control socket's server on real Unix sockets (no daemon, no namespace): hostile and broken
requests get an error answer, slow or stuck clients never hold the loop, the path is guarded."""

import json
import select
import socket
import time

import pytest

from director.config import parse
from director.control_server import IDLE, MAX_LINE, ControlServer, dispatch
from director.daemon import Daemon

CFG = """
[daemon]
capacity = 256
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
[[service.server]]
address = "198.51.100.1"
"""


def pump(server: ControlServer, now: float = 0.0, rounds: int = 20) -> None:
    """What the daemon's loop does with the server's sockets, without waiting."""
    for _ in range(rounds):
        r, w, _ = select.select(server.read_fds(), server.write_fds(), [], 0)
        if not r and not w:
            return
        for s in r:
            server.on_readable(s, now)
        for s in w:
            server.on_writable(s)


def connect(path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(path))
    return c


def answer_of(c: socket.socket) -> dict:
    return json.loads(c.makefile("rb").readline())


@pytest.fixture
def server(tmp_path):
    s = ControlServer(str(tmp_path / "ctl.sock"), {
        "echo": lambda req: req.get("x"),
        "boom": lambda req: {}["missing"],  # a handler's bug
        "big": lambda req: "x" * 2_000_000,
    })
    s.open()
    yield s
    s.close()


@pytest.mark.parametrize("cmd", [[], {}, 5, None, True, ["status"]])
def test_a_command_that_is_not_a_name_gets_an_error_not_a_dead_daemon(cmd):
    """{"v": 1, "cmd": []} raised TypeError at `cmd in MUTATIONS` and ended the daemon's loop."""
    dm = Daemon(parse(CFG))
    answer = dispatch(json.dumps({"v": 1, "cmd": cmd}).encode(), dm.control.handlers)
    assert answer["ok"] is False and answer["error"].startswith("cmd: must be a command name"), answer
    assert dispatch(b'{"v": 1, "cmd": "save"}', dm.control.handlers)["ok"] is True


def test_a_handler_that_raises_gets_an_error_answer():
    answer = dispatch(b'{"v": 1, "cmd": "boom"}', {"boom": lambda req: {}["missing"]})
    assert answer == {"ok": False, "error": "internal error: KeyError: 'missing'"}


@pytest.mark.parametrize("line", [b"", b"\xff\xfe", b"[1]", b'"x"', b"[" * 100_000, b'{"v": 2, "cmd": "echo"}',
                                  b'{"v": 1, "cmd": "nope"}', b'{"v": 1e999, "cmd": "echo"}'])
def test_bad_lines_get_one_line_errors(line):
    answer = dispatch(line, {"echo": lambda req: 1})
    assert answer["ok"] is False and answer["error"].split(":")[0] in ("request", "v", "cmd"), answer


def test_half_a_line_waits_without_holding_anyone_and_is_answered_when_complete(server):
    slow = connect(server.path)
    pump(server)
    slow.sendall(b'{"v": 1, "cmd": "ec')
    pump(server)  # returns at once: the slow client's socket is non-blocking
    fast = connect(server.path)
    fast.sendall(b'{"v": 1, "cmd": "echo", "x": 2}\n')
    pump(server)
    assert answer_of(fast) == {"ok": True, "result": 2}  # answered while the slow one is still typing
    slow.sendall(b'ho", "x": 1}\n')
    pump(server)
    assert answer_of(slow) == {"ok": True, "result": 1}


def test_an_idle_client_is_closed(server):
    c = connect(server.path)
    pump(server, now=100.0)
    c.sendall(b'{"v": 1')
    pump(server, now=100.0)
    assert server.expire(100.0 + IDLE / 2) == 0
    assert server.expire(100.0 + IDLE + 0.1) == 1
    assert c.recv(10) == b""  # closed, no answer


def test_a_line_over_the_cap_gets_an_error_and_a_close(server):
    c = connect(server.path)
    pump(server)
    c.sendall(b"x" * MAX_LINE)
    pump(server, rounds=100)
    assert answer_of(c) == {"ok": False, "error": f"request: longer than {MAX_LINE} bytes"}


def test_a_client_that_reads_its_answer_slowly_holds_nobody(server):
    big = connect(server.path)
    big.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pump(server)
    big.sendall(b'{"v": 1, "cmd": "big"}\n')
    pump(server)  # 2 MB do not fit the socket buffer: the rest waits for writability
    assert server.write_fds(), "the answer should be waiting to be written"
    other = connect(server.path)
    other.sendall(b'{"v": 1, "cmd": "echo", "x": 3}\n')
    pump(server)
    assert answer_of(other) == {"ok": True, "result": 3}
    got = bytearray()
    deadline = time.monotonic() + 10
    while not got.endswith(b"\n"):
        assert time.monotonic() < deadline
        pump(server)
        try:
            big.settimeout(0.05)
            got += big.recv(1 << 20)
        except TimeoutError:
            pass
    assert json.loads(got) == {"ok": True, "result": "x" * 2_000_000}


def test_a_client_that_half_closes_is_answered(server):
    c = connect(server.path)
    pump(server)
    c.sendall(b'{"v": 1, "cmd": "echo", "x": 4}')
    c.shutdown(socket.SHUT_WR)
    pump(server)
    assert answer_of(c) == {"ok": True, "result": 4}


def test_a_path_that_is_not_a_socket_is_never_removed(tmp_path):
    victim = tmp_path / "precious.conf"
    victim.write_text("keep me\n")
    with pytest.raises(ValueError) as e:
        ControlServer(str(victim), {}).open()
    assert str(e.value) == f"daemon.control_socket: {victim} exists and is not a socket; not removing it"
    assert victim.read_text() == "keep me\n"
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match=r"^daemon\.control_socket: .* not a socket"):
        ControlServer(str(tmp_path / "dir"), {}).open()
    assert (tmp_path / "dir").is_dir()


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path, server):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a crashed daemon's socket: nobody listens
    mine = ControlServer(str(stale), {"echo": lambda req: 7})
    mine.open()
    try:
        c = connect(stale)
        pump(mine)
        c.sendall(b'{"v": 1, "cmd": "echo"}\n')
        pump(mine)
        assert answer_of(c) == {"ok": True, "result": 7}
    finally:
        mine.close()
    assert not stale.exists()
    with pytest.raises(ValueError, match=r"^daemon\.control_socket: .*another daemon answers on it"):
        ControlServer(server.path, {}).open()
    c = connect(server.path)  # the running one still answers
    pump(server)
    c.sendall(b'{"v": 1, "cmd": "echo", "x": 5}\n')
    pump(server)
    assert answer_of(c) == {"ok": True, "result": 5}


def test_close_leaves_a_path_someone_else_took(tmp_path):
    path = tmp_path / "ctl.sock"
    s = ControlServer(str(path), {})
    s.open()
    path.unlink()
    path.write_text("someone else's\n")
    s.close()
    assert path.read_text() == "someone else's\n"
