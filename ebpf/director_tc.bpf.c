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

#define IPIP_HLEN 20 /* the outer header we prepend: IHL 5, no options (RFC 2003) */
#define IPIP_TTL 64
#define DROP_INTERNAL 0 /* drops[0]: a rewrite helper failed halfway (never a DropReason) */

static __always_inline struct dp_stats *get_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&stats, &zero);
}

static __always_inline int pass(struct dp_stats *st, int kind)
{
	st->pass_packets[kind & (N_KINDS - 1)]++;
	return TC_ACT_OK;
}

/* Per-real-server counters; the entry is created on first use (the daemon may pre-create it). */
static __always_inline void count_rs(__u32 rs_id, int kind, __u32 bytes)
{
	struct rs_stats *r = bpf_map_lookup_elem(&rs_stats, &rs_id);

	if (!r) {
		struct rs_stats zero = {};

		bpf_map_update_elem(&rs_stats, &rs_id, &zero, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&rs_stats, &rs_id);
		if (!r)
			return;
	}
	r->packets[kind & (N_KINDS - 1)]++;
	r->bytes[kind & (N_KINDS - 1)] += bytes;
}

static __always_inline int forwarded(struct __sk_buff *skb, struct dp_stats *st, struct bpf_fib_lookup *fib,
				     const struct pkt *p, int kind, __u32 rs_id)
{
	int ret = eth_redirect(skb, fib);

	if (ret == TC_ACT_SHOT) {
		st->drops[DROP_INTERNAL]++;
		return ret;
	}
	st->fwd_packets[kind & (N_KINDS - 1)]++;
	st->fwd_bytes[kind & (N_KINDS - 1)] += p->tot_len;
	count_rs(rs_id, kind, p->tot_len);
	return ret;
}

static __always_inline __u32 client_ifindex(struct __sk_buff *skb, const struct dp_config *cfg)
{
	/* The configured interface, else the one the packet came in on (the same in production;
	 * BPF_PROG_TEST_RUN has no ingress interface, so tests configure it). */
	return cfg->client_ifindex ? cfg->client_ifindex : skb->ingress_ifindex;
}

/* DR and NAT: the packet is routed toward the real server as ip_forward would, TTL decremented;
 * NAT also turns the destination VIP into the real server's address. */
static __always_inline int forward_dr_nat(struct __sk_buff *skb, struct dp_stats *st, const struct pkt *p,
					  int kind, const struct server_val *sv, const struct dp_config *cfg,
					  __u32 rs_id, int nat)
{
	struct bpf_fib_lookup fib;
	__be32 rip = sv->addr;
	long rc;

	if (p->ttl <= 1) { /* the stack sends the time-exceeded (RFC 1812 section 5.3.1) */
		st->ttl_pass++;
		return pass(st, kind);
	}
	rc = fib_forward(skb, &fib, client_ifindex(skb, cfg), p->src, rip, p->tos, p->proto, p->tot_len);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count_fib_failure(st, rc);
		return pass(st, kind);
	}
	/* From here on the packet changes: a helper failure must drop, not pass, it. */
	if (nat && nat_addr(skb, ETH_HLEN, offsetof(struct iphdr, daddr), ETH_HLEN + p->ihl,
			    p->proto == IPPROTO_UDP, p->dst, rip))
		goto fail;
	if (ip_decrease_ttl(skb, ETH_HLEN, p->ttl, p->proto))
		goto fail;
	return forwarded(skb, st, &fib, p, kind, rs_id);
fail:
	st->drops[DROP_INTERNAL]++;
	return TC_ACT_SHOT;
}

/* TUN: the whole packet inside an outer IPv4 header (RFC 2003) from lan_addr to the real server,
 * as director.forwarding.rewrite.ipip_encap builds it in the slow path. The inner packet is not
 * touched (no TTL decrement, as the slow path's envelope sent from user space). */
static __always_inline int forward_tun(struct __sk_buff *skb, struct dp_stats *st, const struct pkt *p,
				       int kind, const struct server_val *sv, const struct dp_config *cfg,
				       __u32 rs_id)
{
	struct bpf_fib_lookup fib;
	struct ipv4_hdr outer;
	__u32 envelope = (__u32)p->tot_len + IPIP_HLEN;
	long rc;

	/* The slow path fragments a large envelope (DF clear); here it could not. An unset config
	 * (lan_mtu 0) sends every TUN packet to the slow path. */
	if (envelope > cfg->lan_mtu || envelope > 0xffff) {
		st->mtu_pass++;
		return pass(st, kind);
	}
	if (!cfg->lan_addr) {
		st->fib_miss++;
		return pass(st, kind);
	}
	rc = fib_forward(skb, &fib, client_ifindex(skb, cfg), cfg->lan_addr, sv->addr, p->tos, IPPROTO_IPIP,
			 envelope);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count_fib_failure(st, rc);
		return pass(st, kind);
	}

	outer.vihl = 0x45;
	outer.tos = p->tos; /* DSCP and ECN copied whole (RFC 6040 section 4.1 normal mode) */
	outer.tot_len = bpf_htons(envelope);
	/* DF clear, so the envelope may be fragmented on the way; a random ID keeps reassembly at the
	 * real server safe without shared state between CPUs (RFC 6864 section 4.1). */
	outer.id = (__be16)bpf_get_prandom_u32();
	outer.frag_off = 0;
	outer.ttl = IPIP_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.check = 0;
	outer.saddr = cfg->lan_addr;
	outer.daddr = sv->addr;
	outer.check = ipv4_csum20(&outer);

	/* Room for the outer header right after the Ethernet header. ENCAP_L3_IPV4 records the inner
	 * network header, so GSO packets are segmented as IPIP. A failure leaves the packet as it
	 * was: pass it. */
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return pass(st, kind);
	/* flags 0: a header with a correct checksum adds nothing to skb->csum (it sums to 0xffff). */
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0)) {
		st->drops[DROP_INTERNAL]++;
		return TC_ACT_SHOT;
	}
	return forwarded(skb, st, &fib, p, kind, rs_id);
}

SEC("tc")
int director_tc(struct __sk_buff *skb)
{
	struct dp_stats *st = get_stats();
	struct client_key key = {};
	struct client_val *cv;
	struct server_val *sv;
	struct dp_config *cfg;
	struct vip_val *vv;
	struct ethhdr *eth;
	struct pkt p = {};
	void *data, *data_end, *ip;
	__u32 zero = 0, vip, rs_id;
	int kind;

	if (!st)
		return TC_ACT_OK;
	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		st->not_ours++;
		return TC_ACT_OK;
	}
	ip = eth + 1;
	/* Without the 20 bytes of a header the destination is unknown: whose packet it is cannot be
	 * told, so it is not ours to judge (the stack drops it). */
	if (ip + sizeof(struct ipv4_hdr) > data_end) {
		st->not_ours++;
		return TC_ACT_OK;
	}
	vip = ((struct ipv4_hdr *)ip)->daddr;
	vv = bpf_map_lookup_elem(&vips, &vip);
	if (!vv) {
		st->not_ours++;
		return TC_ACT_OK;
	}

	kind = classify(ip, data_end, 0, &p);
	if (kind < 0) {
		st->drops[(-kind) & (N_DROP_REASONS - 1)]++;
		return TC_ACT_SHOT;
	}
	switch (kind) {
	case KIND_ESP:
		break;
	case KIND_ESP_IN_UDP:
		key.port = p.sport;
		break;
	case KIND_AH:
		if (vv->flags & VIP_F_AH)
			break;
		return pass(st, kind); /* the slow path answers (ICMP protocol unreachable) */
	case KIND_FRAGMENT:
		st->fragments++;
		return pass(st, kind);
	case KIND_NOT_OURS:
		st->not_ours++;
		return pass(st, kind);
	default: /* IKE and NAT-keepalives: the daemon's */
		return pass(st, kind);
	}

	key.vip = vip;
	key.client = p.src;
	cv = bpf_map_lookup_elem(&clients, &key);
	if (!cv) {
		st->miss++;
		return pass(st, kind);
	}
	/* A plain store: one aligned 64-bit write, atomic on 64-bit CPUs; the daemon only reads it. */
	cv->last_seen = bpf_ktime_get_ns();
	rs_id = cv->rs;
	sv = bpf_map_lookup_elem(&servers, &rs_id);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!sv || !cfg) {
		st->miss++;
		return pass(st, kind);
	}
	/* A total length beyond the frame: classify() accepts it (a truncated copy in user space),
	 * but forwarded it would be a stub; the stack drops it (ip_rcv), as without a fast path. */
	if (p.tot_len > skb->len - ETH_HLEN)
		return pass(st, kind);

	switch (sv->method) {
	case METHOD_DR:
		return forward_dr_nat(skb, st, &p, kind, sv, cfg, rs_id, 0);
	case METHOD_NAT:
		return forward_dr_nat(skb, st, &p, kind, sv, cfg, rs_id, 1);
	case METHOD_TUN:
		return forward_tun(skb, st, &p, kind, sv, cfg, rs_id);
	default:
		st->miss++;
		return pass(st, kind);
	}
}

char LICENSE[] SEC("license") = "GPL";
