"""vpn-director: an IPsec-aware load-balancing director (LVS-style) for VPN clusters."""

__version__ = "0.1.0"
