"""The return path through the director: which real server sent a reply, told by its MAC address.

With ``return_path = "director"`` a DR or TUN real server's replies have the VIP as their source, as
every other real server's do: on the server LAN only the Ethernet source address tells who sent
one. ``Senders`` maps the MAC addresses of those real servers to their ids, from the director's
neighbour table on ``server_interface``. The director forwarded the client's packets to the server
before the server could answer, so its entry is there by the first reply; an unknown MAC makes
``sender`` read the table again: once per unknown MAC per ``retry`` seconds (two servers
answering for the first time at once each get their look), and at most ``rate`` times a second in
all, in bursts of ``burst`` (a forger's flood of made-up MACs costs a hundred small netlink dumps a
second). A real server not on the LAN (a routed TUN server)
answers through a router: its replies carry the router's MAC and are dropped as not its own.

The eBPF reply program makes the same check with the ``return_macs`` map, which the fast path keeps
equal to ``macs`` (``on_change``).
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

from director.conntrack import NO_RS
from director.core import Director
from director.ratelimit import TokenBucket
from director.service import Method

log = logging.getLogger(__name__)


def mac_bytes(text: str) -> bytes:
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes."""
    return bytes(int(x, 16) for x in text.split(":"))


def return_servers(director: Director) -> dict[int, int]:
    """{address: real server id} of the DR/TUN servers of services whose replies pass the director."""
    out = {}
    for svc in director.services.values():
        if svc.return_path != "director":
            continue
        for rs in svc.servers.values():
            if svc.method_of(rs) != Method.NAT:
                out[rs.addr] = rs.id
    return out


class Senders:
    """MAC address -> real server id, for the reply queue and the eBPF ``return_macs`` map."""

    def __init__(self, neighbours: Callable[[], dict[int, bytes]], clock: Callable[[], float],
                 rate: float = 100.0, burst: float = 32.0, retry: float = 1.0) -> None:  # fmt: skip
        """``neighbours()``: {IPv4 address as int: MAC} of the server interface's resolved neighbours."""
        self._neighbours = neighbours
        self.clock = clock
        self._bucket = TokenBucket(rate, burst, now=clock())
        self.retry = retry
        self.servers: dict[int, int] = {}  # address -> real server id
        self.macs: dict[bytes, int] = {}
        self.on_change: Callable[[dict[bytes, int]], None] | None = None
        self._tried: dict[bytes, float] = {}  # unknown MAC -> when it last made us read the table
        self.stats = {"refreshes": 0}

    def set_servers(self, servers: dict[int, int]) -> None:
        """The real servers whose replies pass the director changed (config): read the table now."""
        self.servers = dict(servers)
        self._tried.clear()
        self.refresh()

    def refresh(self) -> None:
        self.stats["refreshes"] += 1
        macs = {}
        if self.servers:
            for addr, mac in self._neighbours().items():
                rs = self.servers.get(addr)
                if rs is not None:
                    macs[mac] = rs
        if macs != self.macs:
            self.macs = macs
            log.info("return_path.senders servers=%d resolved=%d", len(self.servers), len(macs))
            if self.on_change is not None:
                self.on_change(macs)

    def sender(self, mac: bytes) -> int:
        """The real server with this MAC, or NO_RS."""
        rs = self.macs.get(mac)
        if rs is not None:
            return rs
        if not self.servers:
            return NO_RS
        now = self.clock()
        if now - self._tried.get(mac, float("-inf")) < self.retry or not self._bucket.take(now):
            return NO_RS
        if len(self._tried) >= 4096:  # made-up MACs: forget them rather than grow
            self._tried.clear()
        self._tried[mac] = now
        self.refresh()
        rs = self.macs.get(mac)
        return NO_RS if rs is None else rs


def netlink_neighbours(ipr, ifindex: int) -> Callable[[], dict[int, bytes]]:
    """``Senders``' neighbours() through pyroute2: the resolved IPv4 neighbours of ``ifindex``."""

    def read() -> dict[int, bytes]:
        out = {}
        for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=ifindex):
            dst, ll = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            if dst and ll:
                out[int.from_bytes(socket.inet_aton(dst), "big")] = mac_bytes(ll)
        return out

    return read
