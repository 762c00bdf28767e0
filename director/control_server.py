"""The control socket's server side: accept, read request lines, dispatch them, write the answers.

A root-only Unix stream socket; each connection carries one request line and gets one answer line
(protocol: director/control.py), then is closed. It runs inside the daemon's event loop, so
nothing here may block it: client sockets are non-blocking with a buffer each way, a request
longer than MAX_LINE gets an error answer, and a client that has not finished within IDLE seconds
(half a line sent, or its answer not read) is closed. Any exception a handler raises becomes an
error answer: no request can end the loop.

The socket's path comes from the config (daemon.control_socket). An existing path is removed only
if it is a socket nobody answers on (a crashed daemon's); anything else is refused, naming the field.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from typing import Any, Callable

from director.config import ConfigErrors
from director.control import PROTOCOL_VERSION, RequestError

log = logging.getLogger(__name__)

MAX_LINE = 65536  # bytes of one request line, newline included
IDLE = 5.0  # seconds a client may take to send its line and read its answer
MAX_CLIENTS = 64  # open connections; more are closed at once (the socket is root-only: a runaway script)
_ACCEPTS = 16  # connections accepted per readiness, so a flood of them cannot hold the loop

Handler = Callable[[dict], Any]


def dispatch(line: bytes, handlers: dict[str, Handler]) -> dict:
    """One request line -> its answer: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``.

    Never raises: a bad request gets one line naming the field, a handler's exception an error answer."""
    try:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            raise RequestError("request: not JSON") from None
        if not isinstance(req, dict):
            raise RequestError("request: must be a JSON object")
        if req.get("v") != PROTOCOL_VERSION:
            raise RequestError(f"v: protocol version {PROTOCOL_VERSION} expected, got {req.get('v')!r}")
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            raise RequestError(f"cmd: must be a command name (a string), got {cmd!r}"[:200])
        handler = handlers.get(cmd)
        if handler is None:
            raise RequestError(f"cmd: unknown command {cmd!r}"[:200])
        return {"ok": True, "result": handler(req)}
    except ConfigErrors as e:
        return {"ok": False, "error": "; ".join(e.errors)}
    except (ValueError, OSError) as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug in a handler: answered and logged, the loop goes on
        log.warning("control.internal_error %s", type(e).__name__, exc_info=True)
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"[:500]}


class _Client:
    __slots__ = ("sock", "inbuf", "out", "since")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the answer still to write; set once the request is read
        self.since = now

    def fileno(self) -> int:
        return self.sock.fileno()


class ControlServer:
    """The listening socket and its clients; the loop selects on :meth:`read_fds` and :meth:`write_fds`."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.sock: socket.socket | None = None
        self._ino = 0
        self._clients: dict[socket.socket, _Client] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    def open(self) -> None:
        path = self.path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        _remove_stale(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # root-only: the socket can change the running table
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise ValueError(f"daemon.control_socket: cannot bind {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        s.listen(8)
        s.setblocking(False)
        self.sock = s
        self._ino = os.lstat(path).st_ino

    def close(self) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        try:  # ours only: never another daemon's socket that replaced it
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the loop's side --------------------------------------------------------------------------
    def read_fds(self) -> list:
        if self.sock is None:
            return []
        return [self.sock, *(c.sock for c in self._clients.values() if c.out is None)]

    def write_fds(self) -> list:
        return [c.sock for c in self._clients.values() if c.out is not None]

    def owns(self, s) -> bool:
        return s is self.sock or s in self._clients

    def on_readable(self, s: socket.socket, now: float) -> None:
        if s is self.sock:
            self._accept(now)
            return
        c = self._clients.get(s)
        if c is None or c.out is not None:
            return
        try:
            data = s.recv(MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        if not data:  # the client shut its side: what it sent is its request, if anything
            if c.inbuf:
                self._answer(c, bytes(c.inbuf))
            else:
                self._drop(c)
            return
        c.inbuf += data
        end = c.inbuf.find(b"\n", 0, MAX_LINE)
        if end >= 0:
            self._answer(c, bytes(c.inbuf[:end]))
        elif len(c.inbuf) >= MAX_LINE:
            self._reply(c, {"ok": False, "error": f"request: longer than {MAX_LINE} bytes"})

    def on_writable(self, s: socket.socket) -> None:
        c = self._clients.get(s)
        if c is not None and c.out is not None:
            self._flush(c)

    def expire(self, now: float) -> int:
        """Close clients that took longer than IDLE; returns how many."""
        late = [c for c in self._clients.values() if now - c.since > IDLE]
        for c in late:
            self._drop(c)
        return len(late)

    # -- inside -----------------------------------------------------------------------------------
    def _accept(self, now: float) -> None:
        for _ in range(_ACCEPTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: try again at the next readiness
                log.warning("control.accept_failed error=%s", e)
                return
            if len(self._clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            self._clients[conn] = _Client(conn, now)

    def _answer(self, c: _Client, line: bytes) -> None:
        self._reply(c, dispatch(line, self.handlers))

    def _reply(self, c: _Client, answer: dict) -> None:
        c.inbuf = bytearray()
        try:
            data = json.dumps(answer).encode() + b"\n"
        except (TypeError, ValueError) as e:  # a handler returned something JSON cannot carry
            data = json.dumps({"ok": False, "error": f"internal error: answer not JSON: {e}"}).encode() + b"\n"
        c.out = memoryview(data)
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        try:
            while c.out:
                n = c.sock.send(c.out)
                c.out = c.out[n:]
        except BlockingIOError:
            return  # the rest when the socket is writable
        except OSError:
            pass  # the client went away: nothing to tell it
        self._drop(c)

    def _drop(self, c: _Client) -> None:
        self._clients.pop(c.sock, None)
        c.sock.close()


def _remove_stale(path: str) -> None:
    """Make room for our socket at ``path``: only a socket nobody listens on is removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"daemon.control_socket: {path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # refused: a crashed daemon's socket
            pass
        else:
            raise ValueError(f"daemon.control_socket: {path}: another daemon answers on it")
    os.unlink(path)
