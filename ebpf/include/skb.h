/* tc-only rewrites, named skb_* as xdp.h's are xdp_*: the skb helpers (bpf_skb_pull_data,
 * bpf_l3/l4_csum_replace, bpf_skb_store_bytes, bpf_redirect) that keep skb->csum and GSO state
 * right. XDP has none of them; its rewrites are in xdp.h.
 *
 * Why the helpers and not arithmetic on packet bytes: bpf_l4_csum_replace with BPF_F_PSEUDO_HDR
 * also keeps skb->csum right for CHECKSUM_COMPLETE packets and handles CHECKSUM_PARTIAL ones (a
 * locally generated packet whose UDP field holds only the pseudo-header sum); a hand-made update
 * would corrupt both. IP header changes need no skb->csum fix: a header whose checksum is right
 * sums to 0xffff (ones' complement zero) whatever its fields, so a field change plus its checksum
 * fix leaves the sum over the packet unchanged. */
#ifndef VPN_DIRECTOR_SKB_H
#define VPN_DIRECTOR_SKB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <linux/stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "parsing.h"
#include "parsing6.h"

/* Make the headers classify() reads linear. tc sees a GRO'd or paged skb with possibly only part
 * of its headers in the linear area, where direct packet access ends (data_end). Only pull when
 * short: bpf_skb_pull_data also unclones, which costs on every packet otherwise. Invalidates
 * packet pointers: callers read skb->data/data_end after it. */
static __always_inline void skb_pull_headers(struct __sk_buff *skb)
{
	__u32 most = skb->protocol == bpf_htons(ETH_P_IPV6) ? V6_PULL_LEN : PULL_LEN; /* parsing6.h */
	__u32 want = skb->len < most ? skb->len : most;

	if ((long)skb->data_end - (long)skb->data < (long)want)
		bpf_skb_pull_data(skb, want);
}

/* NAT of one IPv4 address at ip_off + addr_field (offsetof saddr or daddr): the address is
 * stored, the IP checksum updated incrementally and, for UDP (ESP-in-UDP), the UDP checksum too,
 * since the address is part of its pseudo-header (RFC 768). BPF_F_MARK_MANGLED_0: a zero UDP
 * checksum means "none" and stays zero, and an update that lands on zero is sent as 0xffff,
 * exactly as director.forwarding.rewrite does. Invalidates every packet pointer. */
static __always_inline int skb_nat_addr(struct __sk_buff *skb, __u32 ip_off, __u32 addr_field, __u32 l4_off,
					int is_udp, __be32 old_addr, __be32 new_addr)
{
	if (is_udp &&
	    bpf_l4_csum_replace(skb, l4_off + offsetof(struct udphdr, check), old_addr, new_addr,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_addr)))
		return -1;
	if (bpf_l3_csum_replace(skb, ip_off + offsetof(struct iphdr, check), old_addr, new_addr,
				sizeof(new_addr)))
		return -1;
	return bpf_skb_store_bytes(skb, ip_off + addr_field, &new_addr, sizeof(new_addr), 0);
}

/* NAT's change of the IPv4 destination from old_addr to new_addr, in the UDP checksum of an
 * ESP-in-UDP packet at l4_off only (the address itself and the IP checksum are written in place:
 * rewrite.h). The helper also handles a local sender's partial checksum (CHECKSUM_PARTIAL) and
 * keeps skb->csum right, which arithmetic on the field could not; flags as in skb_nat_addr.
 * Invalidates every packet pointer. */
static __always_inline int skb_nat_udp_csum(struct __sk_buff *skb, __u32 l4_off, __be32 old_addr, __be32 new_addr)
{
	return bpf_l4_csum_replace(skb, l4_off + offsetof(struct udphdr, check), old_addr, new_addr,
				   BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_addr));
}

/* NAT66's change of the destination from old to new in the UDP checksum of an ESP-in-UDP packet at
 * l4_off: four 32-bit words of the pseudo-header, each through the helper (flags as above).
 * Invalidates every packet pointer. */
static __always_inline int skb_nat6_udp_csum(struct __sk_buff *skb, __u32 l4_off, const struct addr6 *old,
					     const struct addr6 *new)
{
	for (int i = 0; i < 4; i++)
		if (bpf_l4_csum_replace(skb, l4_off + offsetof(struct udphdr, check), old->w[i], new->w[i],
					BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(__u32)))
			return -1;
	return 0;
}

/* TTL - 1 with the IP checksum updated incrementally over the 16-bit word TTL|protocol, as the
 * kernel's ip_decrease_ttl() (RFC 1624). The caller has checked ttl > 1. Invalidates packet
 * pointers. */
static __always_inline int skb_decrease_ttl(struct __sk_buff *skb, __u32 ip_off, __u8 ttl, __u8 proto)
{
	__u8 new_ttl = ttl - 1;
	__be16 old_word = bpf_htons(((__u16)ttl << 8) | proto);
	__be16 new_word = bpf_htons(((__u16)new_ttl << 8) | proto);

	if (bpf_l3_csum_replace(skb, ip_off + offsetof(struct iphdr, check), old_word, new_word,
				sizeof(new_word)))
		return -1;
	return bpf_skb_store_bytes(skb, ip_off + offsetof(struct iphdr, ttl), &new_ttl, sizeof(new_ttl), 0);
}

/* Next-hop and egress MACs from the lookup, then redirect to the egress device's transmit path.
 * No BPF_F_RECOMPUTE_CSUM: at tc ingress skb->csum (CHECKSUM_COMPLETE) starts at the network
 * header, so the MAC bytes are not in it. Returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the store
 * failed (the packet is already rewritten: it must not reach the stack half-changed). */
static __always_inline int skb_eth_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib)
{
	__u8 macs[2 * ETH_ALEN];

	__builtin_memcpy(macs, fib->dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, fib->smac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(fib->ifindex, 0);
}

#endif
