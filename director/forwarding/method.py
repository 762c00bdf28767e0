"""The forwarding method (ipvsadm's -g / -i / -m) and the one rule it must obey with AH. Pure.

A method is parsed once, where a config or control request value becomes a ServiceConfig or
ServerConfig; from there on it is a ``Method``, or ``None`` for a real server that inherits its
service's. The numbers are what the eBPF ``servers`` map stores (dataplane/bpf_structs.py).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Iterable


class Method(IntEnum):
    DR = 0  # direct routing: the packet leaves unchanged toward the real server's MAC
    TUN = 1  # IP-in-IP to the real server
    NAT = 2  # destination rewritten to the real server; its replies come back through the director

    @property
    def label(self) -> str:
        """The name configs, requests and listings use: dr, tun, nat."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Method":
        """dr|tun|nat, or ipvsadm's one-letter g|i|m; ValueError naming the choices."""
        try:
            return _BY_NAME[text.lower()]
        except (KeyError, AttributeError):
            raise ValueError(f"unknown forwarding method {text!r} (dr, tun, nat)") from None


_BY_NAME = {"dr": Method.DR, "g": Method.DR, "tun": Method.TUN, "i": Method.TUN, "nat": Method.NAT, "m": Method.NAT}
NAMES = tuple(m.label for m in Method)

# AH authenticates the IP addresses, so it cannot cross a NAT (RFC 4302, RFC 3715)
AH_ACROSS_NAT = "AH cannot cross NAT; a service that forwards by NAT must not balance AH (ah = false, vpnadm --no-ah)"


def ah_across_nat(ah: bool, method: Method, server_methods: Iterable[Method | None]) -> int | None:
    """Where a service breaks the rule: -1 if its own method is NAT, else the position of its first
    NAT real server; None if it keeps it (it does not balance AH, or nothing is NAT). The caller
    names the field (the service's ``ah``, or that server's ``method``) and says AH_ACROSS_NAT."""
    if not ah:
        return None
    if method == Method.NAT:
        return -1
    for i, m in enumerate(server_methods):
        if m == Method.NAT:
            return i
    return None
