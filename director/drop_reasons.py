"""Why a packet was dropped (or refused): one closed set of codes for the whole director.

The numbers are part of the interface: they label the drop metric, they are mirrored in
``ebpf/include/drop_reasons.h`` (a test compares the two), and a retired code is never reused.
Ranges: 1-49 malformed packets (parser), 50-99 decisions of the table and policy.
"""

from enum import IntEnum


class DropReason(IntEnum):
    # -- IPv4, and both families ------------------------------------------
    IP_TRUNCATED = 1  # fewer than 20 bytes, or fewer than IHL*4 (IPv6: fewer than 40 bytes)
    IP_BAD_VERSION = 2  # version nibble is neither 4 nor 6
    IP_BAD_IHL = 3  # IHL < 5
    IP_BAD_TOTAL_LENGTH = 4  # total length < IHL*4
    # -- IPv6 (RFC 8200) ----------------------------------------------------
    IP6_EXT_TRUNCATED = 5  # an extension header beyond the payload length or the buffer
    IP6_EXT_CHAIN_TOO_LONG = 6  # more than 8 extension headers before the upper-layer header
    IP6_BAD_HOP_BY_HOP = 7  # a hop-by-hop options header anywhere but first (RFC 8200 section 4.3)
    IP6_BAD_ADDRESS = 8  # a source or destination in ::/96 (unspecified, loopback, IPv4-compatible)
    # -- UDP ----------------------------------------------------------------
    UDP_TRUNCATED = 10  # fewer than 8 bytes of UDP header
    UDP_BAD_LENGTH = 11  # UDP length < 8 or beyond the IP payload
    # -- ISAKMP / IKE and NAT-T framing --------------------------------------
    IKE_TRUNCATED = 20  # fewer than 28 bytes of IKE header
    IKE_BAD_LENGTH = 21  # IKE length < 28 or not the UDP payload length
    IKE_BAD_VERSION = 22  # major version neither 1 nor 2
    IKE_ZERO_SPI_I = 23  # initiator cookie/SPI is zero (never legal)
    NATT_TRUNCATED = 24  # UDP 4500 payload too short for ESP, marker+IKE or keepalive
    # -- ESP / AH -----------------------------------------------------------
    ESP_TRUNCATED = 30  # fewer than 8 bytes (SPI + sequence)
    ESP_ZERO_SPI = 31  # SPI 0 is reserved (RFC 4303 section 2.1)
    AH_TRUNCATED = 32  # fewer than 12 bytes of AH
    AH_BAD_LENGTH = 33  # payload length field below the minimum or beyond the packet
    AH_ZERO_SPI = 34  # SPI 0 is reserved (RFC 4302 section 2.4)
    # -- ICMP and ICMPv6 errors to a VIP (RFC 792, RFC 4443): relayed to the conversation's real server -------------
    ICMP_TRUNCATED = 40  # fewer than 8 bytes of ICMP header
    ICMP_QUOTE_TRUNCATED = 41  # the quoted IPv4 header, or the first 8 bytes after it, not all there
    ICMP_QUOTE_MALFORMED = 42  # the quoted header's version is not the outer one's, or its IHL < 5
    # -- decisions of the table and policy ----------------------------------
    NO_ENTRY = 50  # ESP/AH/ESP-in-UDP with no ESTABLISHED entry (raw ESP/AH: ICMP 3/2 answered)
    ENTRY_NOT_ESTABLISHED = 51  # ESP-in-UDP while the client's entry is still INIT
    UNKNOWN_IKE_SA = 52  # non-initial IKE, unknown cookies, no client affinity to follow
    NO_REAL_SERVER = 53  # the scheduler found no available real server
    TABLE_FULL = 54  # hard entry limit reached and no INIT entry to reclaim
    RATE_LIMITED = 55  # the global new-entry rate limit (daemon.new_entries_rate)
    REAL_SERVER_GONE = 56  # the entry's real server was removed
    RESPONDER_SPI_MISMATCH = 57  # NAT mode: responder SPI differs from the one the real server sent
    ICMP_SUPPRESSED = 58  # RFC 1122 3.2.2: no ICMP error may answer this packet (the drop stands)
    SOURCE_RATE_LIMITED = 59  # the per-source new-entry limit (daemon.new_entries_per_source)
    ICMP_NO_ENTRY = 60  # an ICMP error quoting a VIP's IKE/ESP/AH packet to a client with no entry
    # -- per-source ingress limits of a service (director/ingress.py, ebpf/include/ingress.h) -----
    INGRESS_ESP_LIMITED = 75  # ESP / ESP-in-UDP with no ESTABLISHED entry above the source's esp_pps
    INGRESS_AH_LIMITED = 76  # AH with no ESTABLISHED entry above the source's ah_pps
    INGRESS_IKE_LIMITED = 77  # IKE (UDP 500/4500, not ESP) above the source's ike_pps
    # -- the return path through the director (DR/TUN, return_path = "director"): anti-spoofing ------
    RETURN_NO_CONVERSATION = 80  # from a VIP on the server side: IKE/ESP of no conversation of that client
    RETURN_WRONG_SERVER = 81  # from a VIP: the conversation's real server did not send it (another host's MAC)
    RETURN_NOT_IPSEC = 82  # from a VIP on the server side, neither IKE nor ESP/ESP-in-UDP (nor NAT-keepalive)
