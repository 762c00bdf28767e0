// SPDX-License-Identifier: GPL-2.0
/* director_tc: the fast path for established clients, at tc clsact ingress of the client-facing
 * interface (docs/fastpath.md).
 *
 * Python decides, the kernel forwards. Every packet to a VIP is classified exactly as
 * director.packet.classify does; a malformed one is dropped and its DropReason counted. IKE,
 * NAT-keepalives, misses and anything this program cannot forward go up the stack unchanged, to
 * the same iptables NFQUEUE rules as with --dataplane nfqueue. ESP, AH and ESP-in-UDP of a client
 * in the `clients` map are forwarded here to its real server: DR, NAT or TUN (IP-in-IP).
 *
 * The decision is include/fastpath.h, shared with director_xdp; this file holds the tc rewrites:
 * on packet memory as XDP's (include/rewrite.h), with the skb helpers (include/skb.h) only where
 * the skb's checksum state needs them (ESP-in-UDP under NAT) and to make room for TUN's header.
 *
 * Invariant of the stats: a packet to a VIP counts exactly once in fwd_packets[kind],
 * pass_packets[kind] or drops[reason]; the other counters (miss, fragments, not_ours, fib_miss,
 * mtu_pass, ttl_pass) say why a pass happened.
 *
 * The route lookup comes before any rewrite, so a packet that cannot be forwarded here reaches the
 * slow path exactly as it arrived.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drop_reasons.h"
#include "structs.h"
#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "fib.h"
#include "fastpath.h"
#include "fastpath6.h"
#include "skb.h"
#include "rewrite.h"

/* Counted as forwarded, then to the egress device's transmit path. */
static __always_inline int tc_redirect(struct fp *f)
{
	fp_forwarded(f);
	return bpf_redirect(f->fib.ifindex, 0);
}

/* DR and NAT (fastpath.h: fp_route_dr_nat) on packet memory (rewrite.h). ESP-in-UDP under NAT
 * first gets its UDP checksum through the helper, which keeps the skb's checksum state (skb.h:
 * skb_nat_udp_csum). From here on the packet changes: a failure must drop, not pass, it. */
static __always_inline int tc_dr_nat(struct __sk_buff *skb, struct fp *f, int nat)
{
	if (nat && f->p.proto == IPPROTO_UDP && skb_nat_udp_csum(skb, ETH_HLEN + f->p.ihl, f->p.dst, f->rip))
		goto fail;
	if (l3_rewrite_in_place((void *)(long)skb->data, (void *)(long)skb->data_end, f->rip, nat, &f->fib))
		goto fail;
	return tc_redirect(f);
fail:
	fp_internal_drop(f);
	return TC_ACT_SHOT;
}

/* TUN (fastpath.h: fp_route_tun built the outer header). */
static __always_inline int tc_tun(struct __sk_buff *skb, struct fp *f)
{
	void *data, *data_end;
	struct ethhdr *eth;

	/* Room for the outer header right after the Ethernet header. ENCAP_L3_IPV4 records the inner
	 * network header, so GSO packets are segmented as IPIP. A failure leaves the packet as it
	 * was: pass it. */
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)) {
		fp_pass(f->st, f->kind);
		return TC_ACT_OK;
	}
	/* Written in place: a header with a correct checksum adds nothing to skb->csum (it sums to
	 * 0xffff), and skb->csum does not cover the MAC header. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if (data + ETH_HLEN + sizeof(f->outer) > data_end) {
		fp_internal_drop(f);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(data + ETH_HLEN, &f->outer, sizeof(f->outer));
	__builtin_memcpy(eth->h_dest, f->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, f->fib.smac, ETH_ALEN);
	return tc_redirect(f);
}

/* DR and NAT66 (fastpath6.h). The old destination is read before anything changes. */
static __always_inline int tc_dr_nat6(struct __sk_buff *skb, struct fp *f, int nat)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6_hdr *h = data + ETH_HLEN;
	struct addr6 old;

	if ((void *)(h + 1) > data_end)
		goto fail;
	old = h->daddr;
	if (nat && f->p.proto == IPPROTO_UDP &&
	    skb_nat6_udp_csum(skb, ETH_HLEN + (f->p.ihl & (L4_OFF_MAX - 1)), &old, &f->rip6))
		goto fail;
	if (l3_rewrite6_in_place((void *)(long)skb->data, (void *)(long)skb->data_end, &f->rip6, nat, &f->fib))
		goto fail;
	return tc_redirect(f);
fail:
	fp_internal_drop(f);
	return TC_ACT_SHOT;
}

SEC("tc")
int director_tc(struct __sk_buff *skb)
{
	struct fp f;
	int v;

	skb_pull_headers(skb);
	v = fp_decide_any(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, skb->ingress_ifindex, &f);
	switch (v) {
	case FP_PASS:
		return TC_ACT_OK;
	case FP_DROP:
		return TC_ACT_SHOT;
	case FP_TUN:
		return tc_tun(skb, &f);
	default:
		if (f.v6)
			return tc_dr_nat6(skb, &f, v == FP_NAT);
		return tc_dr_nat(skb, &f, v == FP_NAT);
	}
}

char LICENSE[] SEC("license") = "GPL";
