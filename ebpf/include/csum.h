/* Internet checksums (RFC 1071) for the rewrites: a whole header built on the stack, and the
 * incremental updates (RFC 1624) of NAT and TTL done by the kernel's csum helpers.
 *
 * Why the helpers and not arithmetic on packet bytes: bpf_l4_csum_replace with BPF_F_PSEUDO_HDR
 * also keeps skb->csum right for CHECKSUM_COMPLETE packets and handles CHECKSUM_PARTIAL ones (a
 * locally generated packet whose UDP field holds only the pseudo-header sum); a hand-made update
 * would corrupt both. IP header changes need no skb->csum fix: a header whose checksum is right
 * sums to 0xffff (ones' complement zero) whatever its fields, so a field change plus its checksum
 * fix leaves the sum over the packet unchanged. */
#ifndef VPN_DIRECTOR_CSUM_H
#define VPN_DIRECTOR_CSUM_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* ~(end-around-carry fold of s): the checksum field for a 32-bit accumulated sum. */
static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* RFC 1071 checksum of a 20-byte IPv4 header (no options) held on the stack, check field 0.
 * Ten 16-bit words, a constant bound the verifier unrolls. */
static __always_inline __u16 ipv4_csum20(const void *h)
{
	const __u16 *w = h;
	__u32 s = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return csum_fold32(s);
}

/* NAT of one IPv4 address at ip_off + addr_field (offsetof saddr or daddr): the address is
 * stored, the IP checksum updated incrementally and, for UDP (ESP-in-UDP), the UDP checksum too,
 * since the address is part of its pseudo-header (RFC 768). BPF_F_MARK_MANGLED_0: a zero UDP
 * checksum means "none" and stays zero, and an update that lands on zero is sent as 0xffff,
 * exactly as director.forwarding.rewrite does. Invalidates every packet pointer. */
static __always_inline int nat_addr(struct __sk_buff *skb, __u32 ip_off, __u32 addr_field, __u32 l4_off,
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

/* TTL - 1 with the IP checksum updated incrementally over the 16-bit word TTL|protocol, as the
 * kernel's ip_decrease_ttl() (RFC 1624). The caller has checked ttl > 1. Invalidates packet
 * pointers. */
static __always_inline int ip_decrease_ttl(struct __sk_buff *skb, __u32 ip_off, __u8 ttl, __u8 proto)
{
	__u8 new_ttl = ttl - 1;
	__be16 old_word = bpf_htons(((__u16)ttl << 8) | proto);
	__be16 new_word = bpf_htons(((__u16)new_ttl << 8) | proto);

	if (bpf_l3_csum_replace(skb, ip_off + offsetof(struct iphdr, check), old_word, new_word,
				sizeof(new_word)))
		return -1;
	return bpf_skb_store_bytes(skb, ip_off + offsetof(struct iphdr, ttl), &new_ttl, sizeof(new_ttl), 0);
}

#endif
