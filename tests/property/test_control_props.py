"""The control protocol under any input: any JSON value, any line, cut anywhere, sent slowly, gets
an error answer or a clean close; the daemon's handlers never raise and a refused request changes
nothing. The budget is fixed (examples, not time)."""

import json
import select
import socket
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from director.config import parse, to_dict
from director.control import MUTATIONS
from director.control_server import MAX_LINE, ControlServer, dispatch
from director.daemon import Daemon

CFG = parse("""
[daemon]
capacity = 256
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
[[service.server]]
address = "198.51.100.1"
[[service.server]]
address = "198.51.100.2"
""")
COMMANDS = sorted(MUTATIONS | {"status", "services", "connections", "save", "zero", "reload"})


class _NoKernel:
    state = None

    def apply(self, director) -> dict[int, int]:
        return {}


def daemon() -> Daemon:
    dm = Daemon(CFG)
    dm.kernel = _NoKernel()
    dm.apply_config(CFG)
    return dm


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None]), "cmd": st.sampled_from(COMMANDS) | json_values},
    optional={k: json_values for k in ("vip", "address", "service", "server", "changes", "services",
                                       "init", "established", "client")},
)


def _state(dm: Daemon):
    return (to_dict(dm.desired), {i: (s.vip, sorted(s.servers)) for i, s in dm.director.services.items()})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests | json_values)
def test_any_request_gets_an_answer_and_a_refusal_changes_nothing(req):
    dm = daemon()
    before = _state(dm)
    line = json.dumps(req).encode()
    answer = dispatch(line, dm.control.handlers)
    assert set(answer) in ({"ok", "result"}, {"ok", "error"})
    json.dumps(answer)  # an answer always goes back as JSON
    if not answer["ok"]:
        assert isinstance(answer["error"], str) and "\n" not in answer["error"]
        assert not answer["error"].startswith("internal error"), answer
        assert _state(dm) == before


def _pump(server: ControlServer) -> None:
    for _ in range(50):
        r, w, _ = select.select(server.read_fds(), server.write_fds(), [], 0)
        if not r and not w:
            return
        for s in r:
            server.on_readable(s, 0.0)
        for s in w:
            server.on_writable(s)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300) | st.just(b"x" * (MAX_LINE + 10)), cuts=st.lists(st.integers(0, 300), max_size=5),
       newline=st.booleans(), close=st.booleans())
def test_any_bytes_cut_anywhere_get_an_error_answer_or_a_clean_close(data, cuts, newline, close):
    with tempfile.TemporaryDirectory() as tmp:
        server = ControlServer(str(Path(tmp) / "ctl.sock"), {"status": lambda req: "fine"})
        server.open()
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(server.path)
            payload = data + (b"\n" if newline else b"")
            at = 0
            for cut in sorted(set(cuts)) + [len(payload)]:  # a slow sender: piece by piece, the loop between
                try:
                    c.sendall(payload[at:max(at, cut)])
                except (BrokenPipeError, ConnectionResetError):
                    break  # answered (or refused) and closed before the rest: one request per connection
                at = max(at, cut)
                _pump(server)
            if close:
                try:
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            _pump(server)
            c.settimeout(0.5)
            got = b""
            try:
                while not got.endswith(b"\n"):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except TimeoutError:
                assert not close and not newline and len(payload) < MAX_LINE, "a complete request was not answered"
                assert server.expire(1e9) == 1  # the idle one goes at the next tick
                return
            if got:
                answer = json.loads(got)
                assert answer["ok"] is False or payload.strip() in (b'{"v": 1, "cmd": "status"}',)
            else:
                assert close and not payload  # closed without a word: it asked nothing
            c.close()
        finally:
            server.close()
