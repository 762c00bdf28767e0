// SPDX-License-Identifier: GPL-2.0
/* The limit case of group f (bench/bench_dataplane.py): the cheapest program that could do the
 * fast path's job on the lab's path, at the same hooks. It forwards every ESP frame to ONE real
 * server fixed at build time: no map, no classification beyond "IPv4 ESP" (so that the lab's
 * ARP and pings still reach the director's stack), no route or neighbour lookup, no counter, no
 * last_seen. Per mode it rewrites only what the mode requires:
 *   DR:  both MAC addresses;
 *   TUN: an outer IPv4 header (lan address -> real server, protocol 4, DF clear, TTL 64, TOS
 *        copied, checksum) in front, made room for as the daemon's programs do, and both MACs;
 *   NAT: the destination address and the IPv4 header checksum (incrementally), and both MACs.
 * then redirects to the real-server-facing interface.
 *
 * The benchmark compiles it in the run that uses it, with the lab's values:
 *   -DLIMIT_MODE=0|1|2 (DR, TUN, NAT)  -DLIMIT_IFINDEX=n
 *   -DLIMIT_D0, -DLIMIT_D1: the real server's MAC as a u32 (bytes 0-3) and a u16 (bytes 4-5)
 *   -DLIMIT_S0, -DLIMIT_S1: the egress MAC as a u16 (bytes 0-1) and a u32 (bytes 2-5)
 *   -DLIMIT_RIP, -DLIMIT_LAN: addresses
 * every value as the integer its bytes make in memory, so the rewrite is a few immediate stores
 * (no .rodata). Built with -DLIMIT_PASS instead, it holds only a pass-through XDP program, for
 * generic XDP on the generator's switch port (--headroom nic). Never loaded by the daemon.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifdef LIMIT_PASS
/* --headroom nic: generic XDP on the generator's switch port, doing nothing but making the kernel
 * give every frame XDP_PACKET_HEADROOM (256 bytes) before the bridge forwards it. */
SEC("xdp")
int limit_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
#else

#define MODE_DR 0
#define MODE_TUN 1
#define MODE_NAT 2

static __always_inline __u16 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* RFC 1624: the checksum after a 32-bit field changed from `from` to `to`. */
static __always_inline __attribute__((unused)) __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u32 s = (__u16)~check;

	s += (__u16)~from + (__u16)~(from >> 16);
	s += (to & 0xffff) + (to >> 16);
	return fold(s);
}

static __always_inline void set_macs(void *eth)
{
	*(__u32 *)eth = LIMIT_D0;
	*(__u16 *)(eth + 4) = LIMIT_D1;
	*(__u16 *)(eth + 6) = LIMIT_S0;
	*(__u32 *)(eth + 8) = LIMIT_S1;
}

/* The outer header of TUN, in front of inner (RFC 2003). */
static __always_inline __attribute__((unused)) void outer_header(struct iphdr *o, const struct iphdr *inner)
{
	const __u16 *w = (const __u16 *)o;
	__u32 s = 0;

	o->version = 4;
	o->ihl = 5;
	o->tos = inner->tos;
	o->tot_len = bpf_htons(bpf_ntohs(inner->tot_len) + sizeof(*o));
	o->id = 0;
	o->frag_off = 0;
	o->ttl = 64;
	o->protocol = IPPROTO_IPIP;
	o->check = 0;
	o->saddr = LIMIT_LAN;
	o->daddr = LIMIT_RIP;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	o->check = fold(s);
}

/* IPv4 ESP in [data, data_end)? */
static __always_inline struct iphdr *esp(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;

	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || iph->protocol != IPPROTO_ESP)
		return 0;
	return iph;
}

SEC("xdp")
int limit_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *iph = esp(data, data_end);

	if (!iph)
		return XDP_PASS;
#if LIMIT_MODE == MODE_TUN
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN + 2 * sizeof(struct iphdr) > data_end)
		return XDP_DROP;
	((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IP);
	outer_header(data + ETH_HLEN, data + ETH_HLEN + sizeof(struct iphdr));
#elif LIMIT_MODE == MODE_NAT
	iph->check = csum_replace4(iph->check, iph->daddr, LIMIT_RIP);
	iph->daddr = LIMIT_RIP;
#endif
	set_macs(data);
	return bpf_redirect(LIMIT_IFINDEX, 0);
}

SEC("tc")
int limit_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = esp(data, data_end);

	if (!iph)
		return TC_ACT_OK;
#if LIMIT_MODE == MODE_TUN
	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + 2 * sizeof(struct iphdr) > data_end)
		return TC_ACT_SHOT;
	outer_header(data + ETH_HLEN, data + ETH_HLEN + sizeof(struct iphdr));
#elif LIMIT_MODE == MODE_NAT
	iph->check = csum_replace4(iph->check, iph->daddr, LIMIT_RIP);
	iph->daddr = LIMIT_RIP;
#endif
	set_macs(data);
	return bpf_redirect(LIMIT_IFINDEX, 0);
}

#endif

char LICENSE[] SEC("license") = "GPL";
