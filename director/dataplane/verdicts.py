"""Applying the core's verdicts to queued packets: the NFQUEUE callbacks of the daemon's loop.

Per packet the pure core (director.core) returns a Verdict; this adapter carries it out: DR ->
the real server's fwmark (policy routing does the rest), NAT -> the destination rewritten, TUN ->
the queued packet dropped and its IP-in-IP envelope sent from the director's own output path (a
packet re-entering routing with the director's address as source would be dropped as a martian),
fragmented to the LAN MTU when needed, ICMP -> protocol-unreachable sent (rate limited), DROP /
PASS. NAT replies (the reply queue) get their source rewritten back to the VIP. DR/TUN replies from a
VIP (``return_path = "director"``) are told apart by their sender's MAC address (``senders``); those
the core forwards are dropped and sent again from the output path (the martian check, again). A packet that
makes anything raise is counted and dropped: the loop goes on. Nothing is decided here.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

from director.conntrack import NO_RS
from director.core import Action, Director
from director.forwarding.fragment import fragment, fragment6
from director.forwarding.rewrite6 import ip6ip6_encap
from director.forwarding.rewrite import icmp_error_dnat, icmp_no_state, ipip_encap, nat_dnat, nat_snat
from director.packet import PacketError, int_to_ip
from director.ratelimit import TokenBucket
from director.service import Method

log = logging.getLogger(__name__)


class Verdicts:
    """The two queue callbacks and what they need: the raw socket (TUN envelopes, ICMP answers),
    the DR marks (kept current by the daemon as real servers come and go), the LAN address and MTU.

    ``stats`` and ``latency`` are the daemon's (shared objects, updated in place)."""

    def __init__(self, director: Director, *, clock: Callable[[], float], stats: dict[str, int], latency: dict,
                 icmp_rate: float) -> None:  # fmt: skip
        self.director = director
        self.clock = clock
        self.stats = stats
        self.latency = latency
        self.raw: socket.socket | None = None
        self.raw6: socket.socket | None = None  # IPv6 answers: ICMPv6 parameter problem
        self.marks: dict[int, int] = {}  # real server id -> its DR fwmark
        self.lan_addr = 0
        self.lan_addr6 = 0  # the server interface's IPv6 address: ip6ip6 envelopes' source (0: none)
        self.lan_mtu = 1500
        self.client_mtu = 1500  # the return path's replies leave on the client side
        self.senders = None  # director.dataplane.return_path.Senders: who sent a reply from a VIP
        self._icmp_bucket = TokenBucket(icmp_rate, now=clock())
        self._ident = 0
        self._ident6 = 0  # fragment identification of ip6ip6 envelopes (32 bits, RFC 8200 section 4.5)
        self._dests: dict[int, tuple[str, int]] = {}  # sendto() addresses of real servers, by int

    def on_client(self, pkt) -> None:
        now = self.clock()
        try:
            data = pkt.get_payload()
            v = self.director.decide(data, now)
            self.stats["packets"] += 1
            a = v.action
            if a == Action.FORWARD or a == Action.RELAY_ICMP:
                m = v.method
                if m == Method.DR:
                    pkt.set_mark(self.marks[v.rs])
                elif m == Method.NAT:
                    pkt.set_payload(nat_dnat(data, v.addr) if a == Action.FORWARD else icmp_error_dnat(data, v.addr))
                else:
                    pkt.drop()
                    self._send_tunnel(data, v.addr)
                    self.latency["client"].observe(self.clock() - now)
                    return
                pkt.accept()
            elif a == Action.PASS:
                pkt.accept()
            else:
                pkt.drop()
                if a == Action.ICMP_UNREACH:
                    self._send_icmp(data, v.svc, now)
            self.latency["client"].observe(self.clock() - now)
        except Exception:  # the loop must survive any packet: count it, drop it, go on
            self._internal_error(pkt)

    def on_reply(self, pkt) -> None:
        now = self.clock()
        try:
            data = pkt.get_payload()
            sender = NO_RS
            if self.senders is not None and self.senders.servers:  # DR/TUN replies through the director
                hw = pkt.get_hw()
                if hw:
                    sender = self.senders.sender(hw[:6])
            v = self.director.decide_reply(data, now, sender)
            self.stats["packets"] += 1
            if v.action == Action.FORWARD:
                if v.method != Method.NAT:  # the return path: from the output path, not the martian check
                    pkt.drop()
                    self._send_return(data, v.addr)
                    self.latency["reply"].observe(self.clock() - now)
                    return
                pkt.set_payload(nat_snat(data, v.addr))
                pkt.accept()
            elif v.action == Action.PASS:
                pkt.accept()
            else:
                pkt.drop()
            self.latency["reply"].observe(self.clock() - now)
        except Exception:
            self._internal_error(pkt)

    def _internal_error(self, pkt) -> None:
        self.stats["internal_errors"] += 1
        if self.stats["internal_errors"] & (self.stats["internal_errors"] - 1) == 0:  # 1, 2, 4, 8...: rate limited
            log.warning("packet.internal_error count=%d", self.stats["internal_errors"], exc_info=True)
        try:
            pkt.drop()
        except Exception:  # a verdict already given; nothing left to do
            pass

    def _send_tunnel(self, data: bytes, rip: int) -> None:
        dest = self._dests.get(rip)
        if dest is None:
            dest = self._dests[rip] = (int_to_ip(rip), 0)
        if rip >> 32:  # IPv6: ip6ip6 (RFC 2473), fragmented here with fragment headers if need be
            if not self.lan_addr6:
                self.stats["send_errors"] += 1  # no IPv6 address on the server interface
                return
            self._ident6 = (self._ident6 + 1) & 0xFFFFFFFF
            try:
                for piece in fragment6(ip6ip6_encap(data, self.lan_addr6, rip), self.lan_mtu, self._ident6):
                    self.raw6.sendto(piece, dest)
            except (OSError, AttributeError):  # no route or neighbour now; no IPv6 raw socket
                self.stats["send_errors"] += 1
            return
        self._ident = (self._ident + 1) & 0xFFFF
        envelope = ipip_encap(data, self.lan_addr, rip, ident=self._ident)
        try:
            for piece in fragment(envelope, self.lan_mtu):
                self.raw.sendto(piece, dest)
        except OSError:  # e.g. no neighbour or route to the real server right now
            self.stats["send_errors"] += 1

    def _send_return(self, data: bytes, client: int) -> None:
        """A DR/TUN reply with the VIP as source, to the client: TTL - 1 (the kernel fills in the
        header checksum of an IP_HDRINCL packet), fragmented to the client side's MTU if needed."""
        if data[8] <= 1:
            self.stats["return_ttl_expired"] += 1
            return
        pkt = bytearray(data)
        pkt[8] -= 1
        if len(pkt) > self.client_mtu and pkt[4:6] == b"\0\0":  # fragments need an ID the kernel will not replace
            self._ident = (self._ident + 1) & 0xFFFF or 1
            pkt[4:6] = self._ident.to_bytes(2, "big")
        try:
            for piece in fragment(bytes(pkt), self.client_mtu):
                self.raw.sendto(piece, (int_to_ip(client), 0))
        except (OSError, ValueError):  # no route or neighbour; or DF set above the MTU
            self.stats["send_errors"] += 1
            return
        self.stats["returned"] += 1

    def _send_icmp(self, data: bytes, svc_id: int, now: float) -> None:
        if not self._icmp_bucket.take(now):
            self.stats["icmp_limited"] += 1
            return
        try:  # protocol-unreachable, or for IPv6 a parameter problem (unrecognized next header)
            reply = icmp_no_state(data, self.director.services[svc_id].vip)
        except PacketError:  # RFC 1122, RFC 4443: never an ICMP error about this packet (drop already counted)
            self.stats["icmp_suppressed"] += 1
            return
        try:
            if reply[0] >> 4 == 6:
                self.raw6.sendto(reply, (int_to_ip(int.from_bytes(reply[24:40], "big")), 0))
            else:
                self.raw.sendto(reply, (int_to_ip(int.from_bytes(reply[16:20], "big")), 0))
        except (OSError, AttributeError):  # no route back to the (often spoofed) source; no IPv6 socket
            self.stats["send_errors"] += 1
            return
        self.stats["icmp_sent"] += 1
