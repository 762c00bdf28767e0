"""The director's iptables rules, in chains of its own, installed and removed with python-iptables.

Per VIP, client direction (queue ``q``), and per NAT real server, reply direction (queue ``q+1``):

    raw    PREROUTING -> VPN_DIRECTOR_RAW:  -d VIP  udp 500 | udp 4500 | esp | ah
                                                    | icmp type 3 | 11 | 12          -j CT --notrack
                                           -s RIP  udp sport 500 | 4500 | esp     -j CT --notrack
    mangle PREROUTING -i CLIENT_IF -d VIP -> VPN_DIRECTOR:        ... -m conntrack --ctstate UNTRACKED
                                                                   -j NFQUEUE --queue-num q
    mangle POSTROUTING -o CLIENT_IF -s RIP -> VPN_DIRECTOR_REPLY: ... -j NFQUEUE --queue-num q+1

Per VIP of a service with ``return_path = "director"`` (DR/TUN replies through the director), every
protocol, reply queue ``q+1``:

    raw    PREROUTING -> VPN_DIRECTOR_RAW:  -i SERVER_IF -s VIP                    -j CT --notrack
    mangle PREROUTING -i SERVER_IF -s VIP -> VPN_DIRECTOR_RETURN: -m conntrack --ctstate UNTRACKED
                                                                   -j NFQUEUE --queue-num q+1

Their source is the VIP, an address of the director: accepted, they would meet the martian check
at the routing decision. So they are queued before it (PREROUTING), and the daemon drops what the
core forwards and sends it again from the director's output path (a raw socket), as TUN envelopes.
What the core refuses (no conversation, not its real server, not IPsec) is dropped and counted.

Why POSTROUTING for replies: their source becomes the VIP, an address local to the director; were
it rewritten before the routing decision, the kernel would drop the packet as a martian (a local
source arriving from outside) unless accept_local were turned on. After routing nobody checks.
Why notrack: the director keeps its own table; a million clients must not fill nf_conntrack.
Why the conntrack match anyway: it takes a reference on conntrack in the namespace, which turns on
IPv4 defragmentation (priority -400, before raw), so a 6 KB certificate IKE message reaches the
queue whole; ``CT --notrack`` alone does not do that on this kernel (measured: fragments arrived).
``fail_open`` adds ``--queue-bypass``: with no daemon bound, packets skip the queue instead of
being dropped. The default is fail-closed (see docs/architecture.md for why).

Why ICMP errors (destination unreachable 3, time exceeded 11, parameter problem 12): a router on a
client's path sends them to the VIP about a packet the real server sent ("fragmentation needed" is
path-MTU discovery's signal); the core relays each one to the conversation's real server and drops
the rest. They are notracked too: conntrack would find no connection for their quote (the
conversation is untracked) and call them INVALID, and the UNTRACKED match would not queue them.

Only our chains and our jump rules are touched; ``install`` is idempotent, ``remove`` tolerant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import iptc

from director.packet import ICMP_ERROR_TYPES

log = logging.getLogger(__name__)

CHAIN_RAW = "VPN_DIRECTOR_RAW"
CHAIN_CLIENT = "VPN_DIRECTOR"
CHAIN_REPLY = "VPN_DIRECTOR_REPLY"
CHAIN_RETURN = "VPN_DIRECTOR_RETURN"


@dataclass(frozen=True, slots=True)
class RuleSet:
    client_interface: str
    server_interface: str
    vips: tuple[str, ...]
    nat_servers: tuple[str, ...]  # real-server addresses whose replies pass the director
    queue: int
    fail_open: bool = False
    return_vips: tuple[str, ...] = ()  # VIPs whose DR/TUN replies come back through the director


def _rule(
    *,
    proto: str,
    target: str,
    src: str | None = None,
    dst: str | None = None,
    in_if: str | None = None,
    out_if: str | None = None,
    dport: int | None = None,
    sport: int | None = None,
    icmp_type: int | None = None,
    untracked: bool = False,
    queue: int | None = None,
    bypass: bool = False,
) -> iptc.Rule:
    r = iptc.Rule()
    if proto:
        r.protocol = proto
    if src:
        r.src = src
    if dst:
        r.dst = dst
    if in_if:
        r.in_interface = in_if
    if out_if:
        r.out_interface = out_if
    if dport is not None or sport is not None:
        m = r.create_match("udp")
        if dport is not None:
            m.dport = str(dport)
        if sport is not None:
            m.sport = str(sport)
    if icmp_type is not None:
        r.create_match("icmp").icmp_type = str(icmp_type)
    if untracked:
        r.create_match("conntrack").ctstate = "UNTRACKED"
    t = r.create_target(target)
    if target == "CT":
        t.notrack = ""
    elif target == "NFQUEUE":
        t.queue_num = str(queue)
        if bypass:
            t.queue_bypass = ""
    return r


def _kinds_to(addr: str) -> list[dict]:
    return [
        dict(proto="udp", dst=addr, dport=500),
        dict(proto="udp", dst=addr, dport=4500),
        dict(proto="esp", dst=addr),
        dict(proto="ah", dst=addr),
        *(dict(proto="icmp", dst=addr, icmp_type=t) for t in sorted(ICMP_ERROR_TYPES)),
    ]


def _kinds_from(addr: str) -> list[dict]:
    return [
        dict(proto="udp", src=addr, sport=500),
        dict(proto="udp", src=addr, sport=4500),
        dict(proto="esp", src=addr),
    ]


def _fresh_chain(table: iptc.Table, name: str) -> iptc.Chain:
    if table.is_chain(name):
        chain = iptc.Chain(table, name)
        chain.flush()
        return chain
    return table.create_chain(name)


def _drop_jumps(table: iptc.Table, chain_names: set[str]) -> None:
    for builtin in ("PREROUTING", "POSTROUTING"):
        if not table.is_chain(builtin):
            continue
        chain = iptc.Chain(table, builtin)
        for r in list(chain.rules):
            if r.target and r.target.name in chain_names:
                chain.delete_rule(r)


def install(rs: RuleSet) -> None:
    """Install (or replace) every rule of the rule set, each table in one commit."""
    raw = iptc.Table(iptc.Table.RAW)
    raw.autocommit = False
    try:
        _drop_jumps(raw, {CHAIN_RAW})
        chain = _fresh_chain(raw, CHAIN_RAW)
        for vip in rs.vips:
            for k in _kinds_to(vip):
                chain.append_rule(_rule(target="CT", **k))
        for rip in rs.nat_servers:
            for k in _kinds_from(rip):
                chain.append_rule(_rule(target="CT", **k))
        for vip in rs.return_vips:
            chain.append_rule(_rule(proto="", src=vip, in_if=rs.server_interface, target="CT"))
        jump = iptc.Rule()
        jump.create_target(CHAIN_RAW)
        iptc.Chain(raw, "PREROUTING").insert_rule(jump)
        raw.commit()
    finally:
        raw.autocommit = True
        raw.refresh()

    mangle = iptc.Table(iptc.Table.MANGLE)
    mangle.autocommit = False
    try:
        _drop_jumps(mangle, {CHAIN_CLIENT, CHAIN_REPLY, CHAIN_RETURN})
        client = _fresh_chain(mangle, CHAIN_CLIENT)
        reply = _fresh_chain(mangle, CHAIN_REPLY)
        ret = _fresh_chain(mangle, CHAIN_RETURN)
        ret.append_rule(_rule(proto="", target="NFQUEUE", untracked=True, queue=rs.queue + 1, bypass=rs.fail_open))
        client_kinds = [dict(proto="udp", dport=500), dict(proto="udp", dport=4500), dict(proto="esp"),
                        dict(proto="ah"), *(dict(proto="icmp", icmp_type=t) for t in sorted(ICMP_ERROR_TYPES))]
        for kind in client_kinds:
            client.append_rule(
                _rule(target="NFQUEUE", untracked=True, queue=rs.queue, bypass=rs.fail_open, **kind)
            )
        for kind in (dict(proto="udp", sport=500), dict(proto="udp", sport=4500), dict(proto="esp")):
            reply.append_rule(
                _rule(target="NFQUEUE", untracked=True, queue=rs.queue + 1, bypass=rs.fail_open, **kind)
            )
        pre = iptc.Chain(mangle, "PREROUTING")
        for vip in rs.vips:
            pre.insert_rule(_rule(proto="", dst=vip, in_if=rs.client_interface, target=CHAIN_CLIENT))
        for vip in rs.return_vips:
            pre.insert_rule(_rule(proto="", src=vip, in_if=rs.server_interface, target=CHAIN_RETURN))
        post = iptc.Chain(mangle, "POSTROUTING")
        for rip in rs.nat_servers:
            post.insert_rule(_rule(proto="", src=rip, out_if=rs.client_interface, target=CHAIN_REPLY))
        mangle.commit()
    finally:
        mangle.autocommit = True
        mangle.refresh()
    log.info(
        "iptables.installed vips=%s nat_servers=%d return_vips=%d queue=%d fail_open=%s",
        ",".join(rs.vips), len(rs.nat_servers), len(rs.return_vips), rs.queue, rs.fail_open,
    )


def remove() -> None:
    """Remove our jump rules and chains; leaves every other rule alone. Safe to call twice."""
    for table_name, chains in ((iptc.Table.RAW, {CHAIN_RAW}), (iptc.Table.MANGLE, {CHAIN_CLIENT, CHAIN_REPLY, CHAIN_RETURN})):
        table = iptc.Table(table_name)
        table.autocommit = False
        try:
            _drop_jumps(table, chains)
            for name in chains:
                if table.is_chain(name):
                    iptc.Chain(table, name).flush()
                    table.delete_chain(name)
            table.commit()
        finally:
            table.autocommit = True
            table.refresh()
    log.info("iptables.removed")


def installed() -> bool:
    return iptc.Table(iptc.Table.MANGLE).is_chain(CHAIN_CLIENT)
