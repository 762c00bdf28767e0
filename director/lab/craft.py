"""Crafted client traffic as raw IPv4 or IPv6 bytes (no scapy): IKE, NAT-T, ESP, AH, and ICMP errors.

The family is the addresses' (director.packet: an int below 2**32 is IPv4).

Used by the unit tests, the decision-core demo and the micro-benchmarks; every packet is well
formed (checksums right) unless a test breaks it on purpose.
"""

from __future__ import annotations

import struct

from director.packet import (
    IKE_PORT,
    IKE_SA_INIT,
    IKE_AUTH,
    MAIN,
    NATT_PORT,
    PROTO_AH,
    PROTO_ESP,
    build_ip,
    build_ip_udp,
    build_ipv4,
    build_ipv6,
    ike_header,
    ipv4_checksum,
    upper_checksum6,
)

NON_ESP_MARKER = b"\x00\x00\x00\x00"


def ike(
    client: int,
    vip: int,
    spi_i: int,
    spi_r: int = 0,
    *,
    v1: bool = False,
    exchange: int | None = None,
    sport: int = IKE_PORT,
    natt: bool = False,
    body: bytes = b"",
    flags: int | None = None,
) -> bytes:
    """One IKE message from a client; ``natt`` sends it to 4500 behind the non-ESP marker."""
    if exchange is None:
        exchange = (MAIN if v1 else (IKE_SA_INIT if spi_r == 0 else IKE_AUTH))
    if flags is None:
        flags = 0 if v1 else 0x08
    msg = ike_header(spi_i, spi_r, exchange, flags=flags, version=0x10 if v1 else 0x20, body=body)
    if natt:
        return build_ip_udp(client, vip, sport, NATT_PORT, NON_ESP_MARKER + msg)
    return build_ip_udp(client, vip, sport, IKE_PORT, msg)


def esp(client: int, vip: int, spi: int, seq: int = 1, size: int = 64) -> bytes:
    """Raw ESP (proto 50): SPI, sequence and ``size`` bytes standing in for ciphertext."""
    return build_ip(client, vip, PROTO_ESP, struct.pack(">II", spi, seq) + bytes(size))


def esp_in_udp(client: int, vip: int, spi: int, seq: int = 1, sport: int = NATT_PORT, size: int = 64) -> bytes:
    """ESP-in-UDP on 4500 (RFC 3948)."""
    return build_ip_udp(client, vip, sport, NATT_PORT, struct.pack(">II", spi, seq) + bytes(size))


def keepalive(client: int, vip: int, sport: int = NATT_PORT) -> bytes:
    """NAT-keepalive: one 0xFF byte on 4500 (RFC 3948 section 2.3)."""
    return build_ip_udp(client, vip, sport, NATT_PORT, b"\xff")


def ah(client: int, vip: int, spi: int, seq: int = 1, icv: int = 12) -> bytes:
    """AH (proto 51) with an ``icv``-byte ICV, next header 4, then a tiny payload."""
    payload_len = (12 + icv) // 4 - 2
    hdr = struct.pack(">BBHII", 4, payload_len, 0, spi, seq) + bytes(icv)
    return build_ip(client, vip, PROTO_AH, hdr + bytes(20))


def icmp_error(router: int, dst: int, quoted: bytes, *, itype: int = 3, code: int = 4, mtu: int = 1400,
               quote: int = 28) -> bytes:
    """An ICMP error from ``router`` to ``dst`` (RFC 792) quoting the first ``quote`` bytes of
    ``quoted`` (its IPv4 header and 8 bytes: 28 for a header without options); ``mtu`` is the
    next-hop MTU of a "fragmentation needed" (type 3 code 4, RFC 1191), 0 in the others."""
    rest = struct.pack(">HH", 0, mtu if (itype, code) == (3, 4) else 0)
    body = bytes(quoted[:quote])
    csum = ipv4_checksum(struct.pack(">BBH", itype, code, 0) + rest + body)
    return build_ipv4(router, dst, 1, struct.pack(">BBH", itype, code, csum) + rest + body, flags_frag=0)


def icmp6_error(router: int, dst: int, quoted: bytes, *, itype: int = 2, code: int = 0, mtu: int = 1280,
                quote: int = 48) -> bytes:
    """An ICMPv6 error (RFC 4443) from ``router`` to ``dst`` quoting the first ``quote`` bytes of
    ``quoted`` (48: its IPv6 header and 8 bytes); ``mtu`` is a packet too big's (type 2), else 0."""
    body = struct.pack(">BBHI", itype, code, 0, mtu if itype == 2 else 0) + bytes(quoted[:quote])
    csum = upper_checksum6(router, dst, 58, body)
    return build_ipv6(router, dst, 58, body[:2] + csum.to_bytes(2, "big") + body[4:])
