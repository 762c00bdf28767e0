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

IPv6 VIPs and NAT real servers get the same chains and rules in ip6tables (the legacy backend, as
for IPv4), with ICMPv6 errors (1-4) in place of ICMP's; the conntrack match turns on IPv6
defragmentation there the same way.

Only our chains and our jump rules are touched; ``install`` is idempotent, ``remove`` tolerant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import iptc

from director.packet import ICMP6_ERROR_TYPES, ICMP_ERROR_TYPES

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


class _Family:
    """What differs between the iptables and ip6tables halves of the rule set."""

    def __init__(self, v6: bool) -> None:
        self.v6 = v6
        self.table = iptc.Table6 if v6 else iptc.Table
        self.rule = iptc.Rule6 if v6 else iptc.Rule
        self.icmp = "icmpv6" if v6 else "icmp"  # the protocol, and (icmp6 / icmp) the match
        self.icmp_types = sorted(ICMP6_ERROR_TYPES if v6 else ICMP_ERROR_TYPES)

    def of(self, addrs) -> tuple[str, ...]:
        return tuple(a for a in addrs if (":" in a) == self.v6)


_FAMILIES = (_Family(False), _Family(True))


def _rule(
    fam: _Family,
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
    r = fam.rule()
    if proto == "ah" and fam.v6:
        # ip6tables' -p skips AH as an extension header, so "-p ah" never matches; the ah match
        # (any SPI) finds it wherever it sits in the chain
        r.create_match("ah")
        proto = ""
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
        if fam.v6:
            r.create_match("icmp6").icmpv6_type = str(icmp_type)
        else:
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


def _kinds(fam: _Family) -> list[dict]:
    """What is queued to a VIP: IKE, NAT-T, ESP, AH, and the ICMP errors the core relays."""
    return [dict(proto="udp", dport=500), dict(proto="udp", dport=4500), dict(proto="esp"), dict(proto="ah"),
            *(dict(proto=fam.icmp, icmp_type=t) for t in fam.icmp_types)]  # fmt: skip


_FROM = (dict(proto="udp", sport=500), dict(proto="udp", sport=4500), dict(proto="esp"))  # a NAT server's replies


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
    """Install (or replace) every rule of the rule set, each table of each family in one commit:
    the IPv4 addresses in iptables, the IPv6 ones in ip6tables (the same chains and rules)."""
    for fam in _FAMILIES:
        _install(fam, rs)
    log.info(
        "iptables.installed vips=%s nat_servers=%d return_vips=%d queue=%d fail_open=%s",
        ",".join(rs.vips), len(rs.nat_servers), len(rs.return_vips), rs.queue, rs.fail_open,
    )


def _install(fam: _Family, rs: RuleSet) -> None:
    vips, nat_servers, return_vips = fam.of(rs.vips), fam.of(rs.nat_servers), fam.of(rs.return_vips)
    raw = fam.table(fam.table.RAW)
    raw.autocommit = False
    try:
        _drop_jumps(raw, {CHAIN_RAW})
        chain = _fresh_chain(raw, CHAIN_RAW)
        for vip in vips:
            for k in _kinds(fam):
                chain.append_rule(_rule(fam, target="CT", dst=vip, **k))
        for rip in nat_servers:
            for k in _FROM:
                chain.append_rule(_rule(fam, target="CT", src=rip, **k))
        for vip in return_vips:
            chain.append_rule(_rule(fam, proto="", src=vip, in_if=rs.server_interface, target="CT"))
        jump = fam.rule()
        jump.create_target(CHAIN_RAW)
        iptc.Chain(raw, "PREROUTING").insert_rule(jump)
        raw.commit()
    finally:
        raw.autocommit = True
        raw.refresh()

    mangle = fam.table(fam.table.MANGLE)
    mangle.autocommit = False
    try:
        _drop_jumps(mangle, {CHAIN_CLIENT, CHAIN_REPLY, CHAIN_RETURN})
        client = _fresh_chain(mangle, CHAIN_CLIENT)
        reply = _fresh_chain(mangle, CHAIN_REPLY)
        ret = _fresh_chain(mangle, CHAIN_RETURN)
        ret.append_rule(_rule(fam, proto="", target="NFQUEUE", untracked=True, queue=rs.queue + 1, bypass=rs.fail_open))
        for kind in _kinds(fam):
            client.append_rule(_rule(fam, target="NFQUEUE", untracked=True, queue=rs.queue, bypass=rs.fail_open, **kind))
        for kind in _FROM:
            reply.append_rule(_rule(fam, target="NFQUEUE", untracked=True, queue=rs.queue + 1, bypass=rs.fail_open, **kind))
        pre = iptc.Chain(mangle, "PREROUTING")
        for vip in vips:
            pre.insert_rule(_rule(fam, proto="", dst=vip, in_if=rs.client_interface, target=CHAIN_CLIENT))
        for vip in return_vips:
            pre.insert_rule(_rule(fam, proto="", src=vip, in_if=rs.server_interface, target=CHAIN_RETURN))
        post = iptc.Chain(mangle, "POSTROUTING")
        for rip in nat_servers:
            post.insert_rule(_rule(fam, proto="", src=rip, out_if=rs.client_interface, target=CHAIN_REPLY))
        mangle.commit()
    finally:
        mangle.autocommit = True
        mangle.refresh()


def remove() -> None:
    """Remove our jump rules and chains from both families; leaves every other rule alone. Safe
    to call twice."""
    for fam in _FAMILIES:
        for table_name, chains in ((fam.table.RAW, {CHAIN_RAW}), (fam.table.MANGLE, {CHAIN_CLIENT, CHAIN_REPLY, CHAIN_RETURN})):
            table = fam.table(table_name)
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
