"""The real servers' next hops, resolved in user space for the eBPF fast path (docs/fastpath.md,
"Next hops").

With ``daemon.fastpath_fib = "cached"`` (the default) the programs do no route or neighbour lookup
per packet: each ``servers`` value carries the egress interface, its MTU and both MAC addresses,
which :func:`resolve` finds as the kernel's forwarding would (the route to the real server, then
the neighbour entry of its gateway or of the server itself). A server whose next hop cannot be
resolved yet (no neighbour entry, a route that is not unicast, an egress that is down or not
Ethernet) is written without one: the programs then do the full lookup for it, which passes the
packet to the stack while the neighbour is missing, and the stack's packet makes the kernel
resolve it.

:class:`Watch` keeps the cache true: a netlink socket subscribed to neighbour, route, address and
link changes. The daemon's loop selects on it; every relevant change re-resolves the servers (a
neighbour change only when it is on an interface some next hop uses or may use), so a new MAC or
a moved route reaches the maps within one loop iteration. ``FastPath`` also re-resolves every
``REFRESH`` seconds, in case an event was lost (the socket's buffer overflowed).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from director.dataplane.bpf_structs import NextHop
from director.packet import int_to_ip

log = logging.getLogger(__name__)

REFRESH = 10.0  # seconds: a full re-resolve even without events

RTN_UNICAST = 1
ARPHRD_ETHER = 1
IFF_UP = 0x1
# neighbour states bpf_fib_lookup accepts (NUD_VALID): REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80

# rtnetlink multicast groups (linux/rtnetlink.h, RTMGRP_*) and message types (RTM_*)
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NDMSG = struct.Struct("=BBHi")  # family, pad, pad, ifindex (then state, flags, type)


class Resolution:
    """What :func:`resolve` found: the next hop (None if not resolvable yet), the egress interface
    the route names (even without a neighbour: its neighbour events matter), and why not."""

    __slots__ = ("nh", "oif", "why")

    def __init__(self, nh: NextHop | None, oif: int | None, why: str = "") -> None:
        self.nh, self.oif, self.why = nh, oif, why


def forwarding_enabled(ifname: str, proc: Path = Path("/proc/sys/net/ipv4/conf")) -> bool:
    """IPv4 forwarding on the client interface (bpf_fib_lookup's FWD_DISABLED check); IPv6's with
    ``proc`` = /proc/sys/net/ipv6/conf."""
    try:
        return (proc / ifname / "forwarding").read_text().strip() == "1"
    except OSError:
        return False


def resolve(ipr: IPRoute, addr: int) -> Resolution:
    """The next hop toward ``addr`` (an address int of either family) from the main routing
    decision; for IPv6 the neighbour comes from neighbour discovery as ARP's for IPv4."""
    family = socket.AF_INET6 if addr >> 32 else socket.AF_INET
    try:
        route = ipr.route("get", dst=int_to_ip(addr), family=family)[0]
    except NetlinkError as e:
        return Resolution(None, None, f"no route ({e.args[1] if len(e.args) > 1 else e})")
    if route["type"] != RTN_UNICAST:
        return Resolution(None, None, f"route type {route['type']}")
    oif = route.get_attr("RTA_OIF")
    hop = route.get_attr("RTA_GATEWAY") or int_to_ip(addr)
    try:
        link = ipr.link("get", index=oif)[0]
    except NetlinkError as e:
        return Resolution(None, oif, f"egress {oif}: {e}")
    smac = link.get_attr("IFLA_ADDRESS")
    if link["ifi_type"] != ARPHRD_ETHER or not smac:
        return Resolution(None, oif, f"egress {oif} is not Ethernet")
    if not link["flags"] & IFF_UP:
        return Resolution(None, oif, f"egress {oif} is down")
    mtu = link.get_attr("IFLA_MTU")
    metrics = route.get_attr("RTA_METRICS")
    route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
    if route_mtu:
        mtu = min(mtu, route_mtu)
    try:
        neigh = ipr.neigh("get", dst=hop, ifindex=oif, family=family)[0]
    except NetlinkError:
        return Resolution(None, oif, f"no neighbour {hop}")
    lladdr = neigh.get_attr("NDA_LLADDR")
    if not neigh["state"] & NUD_VALID or not lladdr:
        return Resolution(None, oif, f"neighbour {hop} state {neigh['state']:#x}")
    return Resolution(NextHop(oif, mtu, _mac(lladdr), _mac(smac)), oif)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class Watch:
    """A non-blocking rtnetlink socket subscribed to neighbour, route, address and link changes.

    ``changed(egress)`` reads everything pending and says whether any of it may change a next hop:
    a route, address or link change always; a neighbour change only on an interface of ``egress``.
    A lost event (the socket's buffer overflowed: ENOBUFS) counts as a change."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                        | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))
        self.events = 0  # messages read
        self.overflows = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self, egress: set[int]) -> bool:
        relevant = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return relevant
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                relevant = True
                continue
            off = 0
            while off + NLMSG_HDR.size <= len(data):
                length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
                if length < NLMSG_HDR.size:
                    break
                self.events += 1
                if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
                    body = off + NLMSG_HDR.size
                    if body + NDMSG.size <= len(data) and NDMSG.unpack_from(data, body)[3] in egress:
                        relevant = True
                else:
                    relevant = True
                off += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()
