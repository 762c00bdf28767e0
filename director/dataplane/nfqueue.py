"""One NFQUEUE queue bound with NetfilterQueue, read without its 4016-byte copy limit.

NetfilterQueue 1.1.0 caps the copy range at 4016 bytes and reads with a 4096-byte buffer, so a
certificate-sized IKE message (5-6 KB, reassembled by netfilter before mangle) would reach user
space truncated and could not be rewritten. After ``bind`` we send the queue's configuration once
more ourselves (NFQNL_MSG_CONFIG with a copy range of 65535) on NetfilterQueue's own netlink socket,
and we drive ``run_socket`` with a reader whose ``recv`` ignores the 4096 it is asked for and
takes a whole netlink datagram. Packets then arrive whole; verdicts still go through
NetfilterQueue. Measured in a namespace: a 6000-byte UDP datagram arrived as 6028 bytes.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Callable

from netfilterqueue import NetfilterQueue

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_PARAMS = 2
NFQNL_COPY_PACKET = 2
NLM_F_REQUEST = 1
COPY_RANGE = 0xFFFF
RECV_BUFFER = 256 * 1024
DRAIN_BUDGET = 256  # datagrams per drain() before the event loop gets a turn


def _config_copy_range(queue: int, copy_range: int) -> bytes:
    """nlmsghdr + nfgenmsg + NFQA_CFG_PARAMS{copy_range (be32), copy_mode (u8)}, no ACK asked."""
    params = struct.pack(">IB", copy_range, NFQNL_COPY_PACKET)
    attr = struct.pack("=HH", 4 + len(params), NFQA_CFG_PARAMS) + params + b"\0" * 3
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attr
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, NLM_F_REQUEST, 1, 0)
    return header + body


class _WholeDatagrams:
    """What ``run_socket`` reads from: a non-blocking netlink socket, whole datagrams, and at most
    ``budget`` of them per drain. ``run_socket`` returns only on EAGAIN, which never comes while
    packets arrive faster than we handle them: without a budget an overload would starve the rest
    of the event loop (control socket, signals, expiry, health probes, sync). Measured by
    bench/bench_dataplane.py: a status request took 4.1 s mid-flood without it, 0.02 s with it."""

    __slots__ = ("sock", "left")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0

    def recv(self, _size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "drain budget spent")
        self.left -= 1
        return self.sock.recv(RECV_BUFFER)


class Queue:
    """A bound queue; ``drain()`` handles every packet waiting, calling ``callback(pkt)``."""

    def __init__(self, num: int, callback: Callable, *, max_len: int = 8192, sock_len: int = 64 << 20) -> None:
        self.num = num
        self._nfq = NetfilterQueue()
        try:
            self._nfq.bind(num, callback, max_len=max_len, sock_len=sock_len)
        except OSError as e:
            raise OSError(e.errno, f"cannot bind NFQUEUE {num} (another program bound to it?): {e}") from None
        fd = self._nfq.get_fd()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, fileno=fd)
        self._sock.send(_config_copy_range(num, COPY_RANGE))
        self._sock.setblocking(False)
        self._reader = _WholeDatagrams(self._sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self, budget: int = DRAIN_BUDGET) -> None:
        """Handle up to ``budget`` waiting datagrams; select() wakes us again for the rest."""
        self._reader.left = budget
        try:
            self._nfq.run_socket(self._reader)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                raise

    def close(self) -> None:
        self._nfq.unbind()
        self._sock.detach()  # the fd belongs to NetfilterQueue's handle
