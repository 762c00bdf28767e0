"""Direct Routing from user space: a fwmark per real server and policy routes, with pyroute2.

The NFQUEUE verdict marks a packet ``MARK_BASE | rs_id``; ``ip rule fwmark M lookup T`` sends it
to table ``T = TABLE_BASE + rs_id`` whose only route is ``default via RIP dev SERVER_IF``, so the
packet leaves unchanged (destination still the VIP) toward the real server's MAC. The VIP is local
on the director, and the kernel's ``local`` rule (preference 0) would deliver it to the director
itself: the ``local`` lookup moves to preference 500, behind our rules at 100. Unmarked packets
still find ``local`` before ``main``, so the director's own traffic is unaffected.
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


def _rules(ipr: IPRoute) -> list[tuple[int, int, int]]:
    """(priority, table, fwmark) of every IPv4 rule."""
    out = []
    for r in ipr.get_rules(family=socket.AF_INET):
        table = r.get_attr("FRA_TABLE") or r["table"]
        out.append((r.get_attr("FRA_PRIORITY") or 0, table, r.get_attr("FRA_FWMARK") or 0))
    return out


def move_local_rule(ipr: IPRoute) -> None:
    rules = _rules(ipr)
    if (LOCAL_PREF, RT_TABLE_LOCAL, 0) not in rules:
        ipr.rule("add", table=RT_TABLE_LOCAL, priority=LOCAL_PREF, family=socket.AF_INET)
    if (0, RT_TABLE_LOCAL, 0) in rules:
        ipr.rule("del", table=RT_TABLE_LOCAL, priority=0, family=socket.AF_INET)


def restore_local_rule(ipr: IPRoute) -> None:
    rules = _rules(ipr)
    if (0, RT_TABLE_LOCAL, 0) not in rules:
        ipr.rule("add", table=RT_TABLE_LOCAL, priority=0, family=socket.AF_INET)
    if (LOCAL_PREF, RT_TABLE_LOCAL, 0) in rules:
        ipr.rule("del", table=RT_TABLE_LOCAL, priority=LOCAL_PREF, family=socket.AF_INET)


def add_server(ipr: IPRoute, rs_id: int, rip: str, oif: int) -> None:
    """Idempotent: the rule and route for one DR real server."""
    table, mark = TABLE_BASE + rs_id, mark_of(rs_id)
    ipr.route("replace", table=table, dst="0.0.0.0/0", gateway=rip, oif=oif)
    if (RULE_PREF, table, mark) not in _rules(ipr):
        ipr.rule("add", table=table, priority=RULE_PREF, fwmark=mark, fwmask=0xFFFFFFFF, family=socket.AF_INET)


def remove_server(ipr: IPRoute, rs_id: int) -> None:
    table, mark = TABLE_BASE + rs_id, mark_of(rs_id)
    if (RULE_PREF, table, mark) in _rules(ipr):
        ipr.rule("del", table=table, priority=RULE_PREF, fwmark=mark, fwmask=0xFFFFFFFF, family=socket.AF_INET)
    try:
        ipr.route("del", table=table, dst="0.0.0.0/0")
    except NetlinkError as e:
        if e.code != 3:  # ESRCH: no such route
            raise


def remove_all(ipr: IPRoute) -> None:
    """Every rule and table of ours, whatever ids a previous run used, and the local rule back."""
    for pref, table, mark in _rules(ipr):
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
