/* XDP-only rewrites, on packet memory: XDP has no skb, so no csum or store helpers. The checksum
 * updates are the kernel's own formulas (csum.h), so the bytes that leave are those the tc
 * program's helpers would write. Every function re-derives its pointers from the context and
 * checks them: the verifier does not carry bounds across bpf_xdp_adjust_head, and neither do we.
 *
 * What XDP cannot know: an skb's checksum state. A UDP packet sent by a local socket over a veth
 * keeps CHECKSUM_PARTIAL (its checksum field holds only the pseudo-header sum, the device is to
 * finish it); veth runs XDP on such an skb without completing it, and a redirected frame becomes a
 * new skb whose receiver verifies the field: dropped as a checksum error. xdp_udp_csum_partial()
 * recognises the field and the packet is passed to the stack instead, which keeps the skb's state.
 * A NIC never hands XDP a partial checksum; see docs/fastpath.md, "The XDP hook". */
#ifndef VPN_DIRECTOR_XDP_H
#define VPN_DIRECTOR_XDP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "parsing.h"
#include "csum.h"
#include "rewrite.h"
#include "parsing6.h"

/* Egress interfaces the loader has checked can transmit XDP frames (ndo_xdp_xmit: a veth whose
 * peer runs XDP or has GRO on, a native-XDP NIC; never a bridge), key and value the ifindex.
 * Redirecting anywhere else would drop the frame silently, so a route elsewhere passes to the
 * stack instead. Not pinned: each loaded program has its own, filled before it is attached. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xdp_tx_ports SEC(".maps");

/* Does the UDP checksum field of the classified ESP-in-UDP packet at ip hold just the folded
 * pseudo-header sum (RFC 768: source, destination, protocol, UDP length), as a local socket leaves
 * it for checksum offload? A complete checksum equals it only by chance (1 in 65536): such a packet
 * takes the slow path, which forwards it correctly too. */
static __always_inline int xdp_udp_csum_partial(void *data, void *data_end, const struct pkt *p)
{
	struct ipv4_hdr *iph = data + ETH_HLEN;
	struct udphdr *udp;
	__u32 s;

	if ((void *)(iph + 1) > data_end)
		return 1;
	udp = (void *)iph + (p->ihl & 0x3c);
	if ((void *)(udp + 1) > data_end)
		return 1;
	s = (iph->saddr & 0xffff) + (iph->saddr >> 16) + (iph->daddr & 0xffff) + (iph->daddr >> 16);
	s += bpf_htons(IPPROTO_UDP) + udp->len;
	return udp->check == (__u16)~csum_fold32(s);
}

/* DR and NAT on the frame in place (csum.h: l3_rewrite_in_place), with NAT's UDP checksum of
 * ESP-in-UDP done here by arithmetic, unless zero (as BPF_F_MARK_MANGLED_0 at tc). Returns 0, or
 * -1 if the frame is not what fp_decide() saw (cannot happen: nothing ran in between). */
static __always_inline int xdp_rewrite_dr_nat(struct xdp_md *ctx, const struct pkt *p, __be32 rip, int nat,
					      const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv4_hdr *iph = data + ETH_HLEN;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (nat && p->proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)iph + (p->ihl & 0x3c);

		if ((void *)(udp + 1) > data_end)
			return -1;
		if (udp->check) {
			__u16 c = csum_replace4(udp->check, iph->daddr, rip);

			udp->check = c ? c : CSUM_MANGLED_0;
		}
	}
	return l3_rewrite_in_place(data, data_end, rip, nat, fib);
}

/* TUN: IPIP_HLEN bytes of headroom taken in front, then a new Ethernet header and the outer IPv4
 * header written there; the inner packet stays where it was. Returns 0; 1 if no headroom could be
 * had (the frame is unchanged: pass it); -1 if the grown frame is not where it should be. */
static __always_inline int xdp_encap_tun(struct xdp_md *ctx, const struct ipv4_hdr *outer,
					 const struct bpf_fib_lookup *fib)
{
	void *data, *data_end;
	struct ethhdr *eth;

	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(*outer)))
		return 1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (data + ETH_HLEN + sizeof(*outer) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(data + ETH_HLEN, outer, sizeof(*outer));
	return 0;
}

/* IPv6: xdp_udp_csum_partial over the IPv6 pseudo-header (RFC 8200 section 8.1: both addresses,
 * the upper-layer length, next header 17). */
static __always_inline int xdp_udp_csum_partial6(void *data, void *data_end, const struct pkt *p)
{
	struct ipv6_hdr *h = data + ETH_HLEN;
	struct udphdr *udp;
	__u32 s = 0;

	if ((void *)(h + 1) > data_end)
		return 1;
	udp = (void *)h + (p->ihl & (L4_OFF_MAX - 1));
	if ((void *)(udp + 1) > data_end)
		return 1;
	for (int i = 0; i < 4; i++) {
		s += (h->saddr.w[i] & 0xffff) + (h->saddr.w[i] >> 16);
		s += (h->daddr.w[i] & 0xffff) + (h->daddr.w[i] >> 16);
	}
	s += bpf_htons(IPPROTO_UDP) + udp->len;
	return udp->check == (__u16)~csum_fold32(s);
}

/* DR and NAT66 on the frame in place (fastpath6.h: l3_rewrite6_in_place), NAT's UDP checksum of
 * ESP-in-UDP by arithmetic over the four words of the address (unless zero). */
static __always_inline int xdp_rewrite_dr_nat6(struct xdp_md *ctx, const struct pkt *p, const struct addr6 *rip,
					       int nat, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6_hdr *h = data + ETH_HLEN;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (nat && p->proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)h + (p->ihl & (L4_OFF_MAX - 1));

		if ((void *)(udp + 1) > data_end)
			return -1;
		if (udp->check) {
			__u16 c = udp->check;

			for (int i = 0; i < 4; i++)
				c = csum_replace4(c, h->daddr.w[i], rip->w[i]);
			udp->check = c ? c : CSUM_MANGLED_0;
		}
	}
	return l3_rewrite6_in_place(data, data_end, rip, nat, fib);
}

#endif
