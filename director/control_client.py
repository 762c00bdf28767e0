"""The client side of the control socket (vpnadm, the lab, benchmarks): one request, one answer.

The protocol is director/control.py's; this is the only part of it that touches a socket.
"""

from __future__ import annotations

import json
import socket

from director.control import PROTOCOL_VERSION


def control_request(path: str, request: dict, timeout: float = 5.0) -> dict:
    """Send one request to a running daemon's control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"v": PROTOCOL_VERSION, **request}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())
