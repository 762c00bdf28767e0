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
 * The decision is include/fastpath.h, shared with director_xdp; this file holds the tc rewrites
 * (skb helpers, include/skb.h).
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
#include "skb.h"

/* Ethernet rewrite and redirect; counted as forwarded. */
static __always_inline int tc_redirect(struct __sk_buff *skb, struct fp *f)
{
	int ret = skb_eth_redirect(skb, &f->fib);

	if (ret == TC_ACT_SHOT) {
		fp_internal_drop(f);
		return ret;
	}
	fp_forwarded(f);
	return ret;
}

/* DR and NAT (fastpath.h: fp_route_dr_nat). From here on the packet changes: a helper failure
 * must drop, not pass, it. */
static __always_inline int tc_dr_nat(struct __sk_buff *skb, struct fp *f, int nat)
{
	if (nat && skb_nat_addr(skb, ETH_HLEN, offsetof(struct iphdr, daddr), ETH_HLEN + f->p.ihl,
				f->p.proto == IPPROTO_UDP, f->p.dst, f->rip))
		goto fail;
	if (skb_decrease_ttl(skb, ETH_HLEN, f->p.ttl, f->p.proto))
		goto fail;
	return tc_redirect(skb, f);
fail:
	fp_internal_drop(f);
	return TC_ACT_SHOT;
}

/* TUN (fastpath.h: fp_route_tun built the outer header). */
static __always_inline int tc_tun(struct __sk_buff *skb, struct fp *f)
{
	/* Room for the outer header right after the Ethernet header. ENCAP_L3_IPV4 records the inner
	 * network header, so GSO packets are segmented as IPIP. A failure leaves the packet as it
	 * was: pass it. */
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)) {
		fp_pass(f->st, f->kind);
		return TC_ACT_OK;
	}
	/* flags 0: a header with a correct checksum adds nothing to skb->csum (it sums to 0xffff). */
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &f->outer, sizeof(f->outer), 0)) {
		fp_internal_drop(f);
		return TC_ACT_SHOT;
	}
	return tc_redirect(skb, f);
}

SEC("tc")
int director_tc(struct __sk_buff *skb)
{
	struct fp f;
	int v;

	skb_pull_headers(skb);
	v = fp_decide(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, skb->ingress_ifindex, &f);
	switch (v) {
	case FP_PASS:
		return TC_ACT_OK;
	case FP_DROP:
		return TC_ACT_SHOT;
	case FP_TUN:
		return tc_tun(skb, &f);
	default:
		return tc_dr_nat(skb, &f, v == FP_NAT);
	}
}

char LICENSE[] SEC("license") = "GPL";
