"""Real-server health: rise/fall state per server (pure) and the IKE-level probe message (pure).

A probe is a well-formed IKEv2 IKE_SA_INIT (SA with one proposal, KE for curve25519, Nonce) sent
from the director to the real server's own address on UDP 500. Any well-formed IKE message that
comes back for the probe's initiator SPI means the IKE daemon there is alive: NO_PROPOSAL_CHOSEN,
a COOKIE or INVALID_KE_PAYLOAD request, an IKE_SA_INIT response. The probe's proposal is one no
server accepts (its encryption transform is from the private-use range, RFC 7296 section 3.3.2),
so the server answers NO_PROPOSAL_CHOSEN and keeps no state: an acceptable proposal would leave a
half-open IKE SA per probe for the server's half-open timeout (strongSwan: 30 s), and probes every
few seconds from one address would then trip the server's own flood defences (strongSwan's
block_threshold, 5 half-open SAs per peer address, then cookie_threshold, 10 in all: seen in the
lab with a 0.3 s interval, where the server began demanding COOKIEs from real clients). ``fall`` consecutive failures mark a server down
(weight unchanged, no new clients); ``rise`` consecutive successes bring it back. The passive signal
of the core (a client's initial packet retransmitted without progress, see core.py) counts as a
failure too: in DR and TUN it is the only sign the director gets between probes.

With ``icmp`` each round also sends an ICMP echo request to the server; the round passes only when
both the IKE answer and the echo reply arrive within ``timeout`` (a host that answers IKE but not
ping, or the reverse, is reported by name in ``last_error``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from director.packet import IKE_SA_INIT, ike_header


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    expire_on_down: bool = False  # remove a down server's entries at once (IPVS expire_nodest_conn)
    icmp: bool = False  # also an ICMP echo each round: a round passes only if both answer in time

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"health.interval: must be > 0, got {self.interval}")
        if not 0 < self.timeout <= self.interval:
            raise ValueError(f"health.timeout: must be > 0 and <= interval, got {self.timeout}")
        for name in ("rise", "fall"):
            if not 1 <= getattr(self, name) <= 100:
                raise ValueError(f"health.{name}: must be 1..100, got {getattr(self, name)}")


class HealthState:
    """Consecutive successes and failures of one server; ``observe`` says when ``up`` flips."""

    __slots__ = ("cfg", "up", "ok_run", "fail_run", "checks", "failures")

    def __init__(self, cfg: HealthConfig, up: bool = True) -> None:
        self.cfg = cfg
        self.up = up
        self.ok_run = 0
        self.fail_run = 0
        self.checks = 0
        self.failures = 0

    def observe(self, ok: bool) -> bool:
        """Record one result; True when it changed ``up``."""
        self.checks += 1
        if ok:
            self.ok_run += 1
            self.fail_run = 0
            if not self.up and self.ok_run >= self.cfg.rise:
                self.up = True
                return True
        else:
            self.failures += 1
            self.fail_run += 1
            self.ok_run = 0
            if self.up and self.fail_run >= self.cfg.fall:
                self.up = False
                return True
        return False


# IKEv2 payload types (RFC 7296 section 3.2) and transform ids (IANA IKEv2 registry)
_SA, _KE, _NONCE, _NONE = 33, 34, 40, 0
_PRF_HMAC_SHA2_256, _AUTH_HMAC_SHA2_256_128, _DH_CURVE25519 = 5, 12, 31
ENCR_PROBE = 1025  # private use (RFC 7296 section 3.3.2): no server accepts it, none keeps state


def _transform(last: bool, ttype: int, tid: int, attrs: bytes = b"") -> bytes:
    return struct.pack(">BBHBBH", 0 if last else 3, 0, 8 + len(attrs), ttype, 0, tid) + attrs


PROBE_ENTROPY = 72  # random bytes a probe takes: initiator SPI 8, KE data 32, nonce 32


def probe_message(entropy: bytes, spi_i: int | None = None) -> tuple[int, bytes]:
    """(initiator SPI, one IKE_SA_INIT request) as a client would send it (RFC 7296 section 1.2),
    with a proposal the server must refuse (ENCR_PROBE): answered, never kept. ``entropy``:
    PROBE_ENTROPY random bytes (the prober's os.urandom); ``spi_i`` overrides its first 8."""
    if len(entropy) != PROBE_ENTROPY:
        raise ValueError(f"entropy: must be {PROBE_ENTROPY} bytes, got {len(entropy)}")
    spi_i = spi_i if spi_i is not None else (int.from_bytes(entropy[:8], "big") | 1)
    transforms = (
        _transform(False, 1, ENCR_PROBE)
        + _transform(False, 2, _PRF_HMAC_SHA2_256)
        + _transform(False, 3, _AUTH_HMAC_SHA2_256_128)
        + _transform(True, 4, _DH_CURVE25519)
    )
    proposal = struct.pack(">BBHBBBB", 0, 0, 8 + len(transforms), 1, 1, 0, 4) + transforms
    sa = struct.pack(">BBH", _KE, 0, 4 + len(proposal)) + proposal
    ke_data = struct.pack(">HH", _DH_CURVE25519, 0) + entropy[8:40]
    ke = struct.pack(">BBH", _NONCE, 0, 4 + len(ke_data)) + ke_data
    nonce_data = entropy[40:72]
    nonce = struct.pack(">BBH", _NONE, 0, 4 + len(nonce_data)) + nonce_data
    return spi_i, ike_header(spi_i, 0, IKE_SA_INIT, flags=0x08, version=0x20, next_payload=_SA,
                             body=sa + ke + nonce)


def answers_probe(data: bytes, spi_i: int) -> bool:
    """A well-formed IKE message for our initiator SPI (any exchange, any version) on UDP 500.

    No non-ESP marker is expected (or stripped): probes and answers use port 500, and four zero
    bytes at the start are simply the top of an initiator SPI below 2**32.
    """
    if len(data) < 28 or int.from_bytes(data[:8], "big") != spi_i:
        return False
    length = int.from_bytes(data[24:28], "big")
    return data[17] >> 4 in (1, 2) and 28 <= length <= len(data)


ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"vpn-dir!") -> bytes:
    """One ICMP echo request (RFC 792), checksummed, for a raw IPPROTO_ICMP socket."""
    head = struct.pack(">BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    csum = _icmp_checksum(head + payload)
    return struct.pack(">BBHHH", ICMP_ECHO, 0, csum, ident, seq) + payload


ICMP6_ECHO, ICMP6_ECHO_REPLY = 128, 129  # RFC 4443 section 4


def echo_request6(ident: int, seq: int, payload: bytes = b"vpn-dir!") -> bytes:
    """One ICMPv6 echo request for a raw IPPROTO_ICMPV6 socket; the kernel fills in its checksum
    (it covers the IPv6 pseudo-header, which only the kernel knows in full: RFC 3542 section 3.1)."""
    return struct.pack(">BBHHH", ICMP6_ECHO, 0, 0, ident, seq) + payload


def parse_echo_reply6(message: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an ICMPv6 echo reply as a raw socket delivers it (no IPv6
    header); None for anything else or a truncated message."""
    if len(message) < 8 or message[0] != ICMP6_ECHO_REPLY or message[1] != 0:
        return None
    ident, seq = struct.unpack_from(">HH", message, 4)
    return ident, seq


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an ICMP echo reply as a raw socket delivers it (IPv4 header
    first); None for anything else or a truncated packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8 or packet[ihl] != ICMP_ECHO_REPLY or packet[ihl + 1] != 0:
        return None
    ident, seq = struct.unpack_from(">HH", packet, ihl + 4)
    return ident, seq
