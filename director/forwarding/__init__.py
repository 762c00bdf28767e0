"""Forwarding without kernel IPVS: the pure packet rewrites the director applies (docs/architecture.md).

:mod:`director.forwarding.rewrite` holds them: NAT (destination and source, incremental checksums),
IP-in-IP encapsulation for the TUN method, and the ICMP protocol-unreachable answer. Direct Routing
needs no rewrite: the packet leaves unchanged.
"""

from director.forwarding.rewrite import icmp_error_dnat, icmp_unreachable, ipip_decap, ipip_encap, nat_dnat, nat_snat

__all__ = ["icmp_error_dnat", "icmp_unreachable", "ipip_decap", "ipip_encap", "nat_dnat", "nat_snat"]
