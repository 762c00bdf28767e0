"""Direct Routing from user space: a fwmark per real server and policy routes, with pyroute2.

The NFQUEUE verdict marks a packet ``MARK_BASE | rs_id``; ``ip rule fwmark M lookup T`` sends it
to table ``T = TABLE_BASE + rs_id`` whose only route is ``default via RIP dev SERVER_IF``, so the
packet leaves unchanged (destination still the VIP) toward the real server's MAC. The VIP is local
on the director, and the kernel's ``local`` rule (preference 0) would deliver it to the director
itself: the ``local`` lookup moves to preference 500, behind our rules at 100. Unmarked packets
still find ``local`` before ``main``, so the director's own traffic is unaffected. An IPv6 real
server gets the same mark, an IPv6 rule and a ``default via RIP`` route in the same table number
(IPv4 and IPv6 routing tables are separate), and IPv6's ``local`` rule moves the same way.
"""

from __future__ import annotations

import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

MARK_BASE = 0x56440000  # "VD" in the high half; the low 16 bits carry the real server id
TABLE_BASE = 22000
RULE_PREF = 100
LOCAL_PREF = 500
RT_TABLE_LOCAL = 255


def mark_of(rs_id: int) -> int:
    return MARK_BASE | rs_id


_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_DEFAULT = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def _rules(ipr: IPRoute, family: int = socket.AF_INET) -> list[tuple[int, int, int]]:
    """(priority, table, fwmark) of every rule of ``family``."""
    out = []
    for r in ipr.get_rules(family=family):
        table = r.get_attr("FRA_TABLE") or r["table"]
        out.append((r.get_attr("FRA_PRIORITY") or 0, table, r.get_attr("FRA_FWMARK") or 0))
    return out


def move_local_rule(ipr: IPRoute) -> None:
    """The ``local`` lookup from preference 0 to 500, in both families (IPv6 has its own rule list)."""
    for family in _FAMILIES:
        rules = _rules(ipr, family)
        if (LOCAL_PREF, RT_TABLE_LOCAL, 0) not in rules:
            ipr.rule("add", table=RT_TABLE_LOCAL, priority=LOCAL_PREF, family=family)
        if (0, RT_TABLE_LOCAL, 0) in rules:
            ipr.rule("del", table=RT_TABLE_LOCAL, priority=0, family=family)


def restore_local_rule(ipr: IPRoute) -> None:
    for family in _FAMILIES:
        rules = _rules(ipr, family)
        if (0, RT_TABLE_LOCAL, 0) not in rules:
            ipr.rule("add", table=RT_TABLE_LOCAL, priority=0, family=family)
        if (LOCAL_PREF, RT_TABLE_LOCAL, 0) in rules:
            ipr.rule("del", table=RT_TABLE_LOCAL, priority=LOCAL_PREF, family=family)


def add_server(ipr: IPRoute, rs_id: int, rip: str, oif: int) -> None:
    """Idempotent: the rule and route for one DR real server, in its address's family (an IPv6
    real server's MAC comes from neighbour discovery as an IPv4 one's from ARP)."""
    family = socket.AF_INET6 if ":" in rip else socket.AF_INET
    table, mark = TABLE_BASE + rs_id, mark_of(rs_id)
    ipr.route("replace", table=table, dst=_DEFAULT[family], gateway=rip, oif=oif, family=family)
    if (RULE_PREF, table, mark) not in _rules(ipr, family):
        ipr.rule("add", table=table, priority=RULE_PREF, fwmark=mark, fwmask=0xFFFFFFFF, family=family)


def remove_server(ipr: IPRoute, rs_id: int) -> None:
    table, mark = TABLE_BASE + rs_id, mark_of(rs_id)
    for family in _FAMILIES:
        if (RULE_PREF, table, mark) in _rules(ipr, family):
            ipr.rule("del", table=table, priority=RULE_PREF, fwmark=mark, fwmask=0xFFFFFFFF, family=family)
        try:
            ipr.route("del", table=table, dst=_DEFAULT[family], family=family)
        except NetlinkError as e:
            if e.code not in (3, 2):  # ESRCH / ENOENT: no such route
                raise


def remove_all(ipr: IPRoute) -> None:
    """Every rule and table of ours, whatever ids a previous run used, and the local rule back."""
    for family in _FAMILIES:
        for pref, table, mark in _rules(ipr, family):
            if pref == RULE_PREF and mark & 0xFFFF0000 == MARK_BASE:
                remove_server(ipr, table - TABLE_BASE)
    restore_local_rule(ipr)


def interface_address(ipr: IPRoute, ifname: str) -> tuple[int, str]:
    """(ifindex, first IPv4 address) of an interface; ValueError naming it when missing."""
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise ValueError(f"daemon.server_interface: no interface '{ifname}' in this namespace")
    for a in ipr.get_addr(family=socket.AF_INET, index=idx[0]):
        return idx[0], a.get_attr("IFA_ADDRESS")
    raise ValueError(f"daemon.server_interface: interface '{ifname}' has no IPv4 address")


def interface_address6(ipr: IPRoute, index: int) -> str | None:
    """The first global IPv6 address of an interface (the source of ip6ip6 envelopes), or None."""
    for a in ipr.get_addr(family=socket.AF_INET6, index=index):
        text = a.get_attr("IFA_ADDRESS")
        if text and not text.lower().startswith("fe80") and a["scope"] == 0:
            return text
    return None
