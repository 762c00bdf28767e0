/* The client-side fast path for IPv6 (docs/ipv6.md), beside fastpath.h's IPv4 one: fp_decide_any()
 * hands a frame with the IPv6 ethertype to fp_decide6(), any other to fp_decide(). The same
 * contract as IPv4 for what it does:
 * classified as director.packet.classify does (parsing6.h), malformed packets to a VIP dropped and
 * counted, ESP, AH (when the service takes it) and ESP-in-UDP of an ESTABLISHED client forwarded
 * by DR or NAT66, everything else passed untouched to the queue, and the stats invariant kept.
 *
 * What it leaves to the slow path, which does it for IPv6: IKE (with the admission and ingress
 * limits the core applies to IPv6 sources), ICMPv6 errors, misses (SPI labels and the ingress
 * limits of ESP and AH without an entry included), and headers deeper than V6_WALK_MAX. */
#ifndef VPN_DIRECTOR_FASTPATH6_H
#define VPN_DIRECTOR_FASTPATH6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"
#include "maps.h"
#include "parsing6.h"
#include "fastpath.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif

/* bpf_fib_lookup for IPv6, as fib_forward for IPv4: route, forwarding on in_ifindex, neighbour. */
static __always_inline long fib_forward6(void *ctx, const struct dp_config *cfg, struct bpf_fib_lookup *fib,
					 __u32 in_ifindex, const struct addr6 *src, const struct addr6 *dst,
					 __u8 proto, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = proto;
	fib->tot_len = tot_len;
	fib->ifindex = in_ifindex;
	__builtin_memcpy(fib->ipv6_src, src, sizeof(*src));
	__builtin_memcpy(fib->ipv6_dst, dst, sizeof(*dst));
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), cfg->flags & DP_F_FIB_RULES ? 0 : BPF_FIB_LOOKUP_DIRECT);
}

static __always_inline int fp_decide6(void *ctx, void *data, void *data_end, __u32 frame_len, __u32 in_ifindex,
				      struct fp *f)
{
	struct client6_key key = {};
	struct server6_val *s6;
	struct client_val *cv;
	struct server_val *sv;
	struct dp_config *cfg;
	struct vip_val *vv;
	struct ipv6_hdr *h = data + ETH_HLEN;
	struct dp_stats *st;
	__u32 zero = 0;
	long rc;
	int kind;

	if (!fp_start(f))
		return FP_PASS;
	st = f->st;
	f->v6 = 1;
	if ((void *)(h + 1) > data_end) {
		st->not_ours++;
		return FP_PASS;
	}
	vv = bpf_map_lookup_elem(&vips6, &h->daddr);
	if (!vv) {
		st->not_ours++;
		return FP_PASS;
	}
	kind = classify6(h, data_end, frame_len - ETH_HLEN, 0, &f->p);
	if (kind < 0) {
		st->drops[(-kind) & (N_DROP_REASONS - 1)]++;
		return FP_DROP;
	}
	if (kind == CLASSIFY_DEEP) {
		st->not_ours++;
		return fp_pass(st, KIND_NOT_OURS);
	}
	f->kind = kind;
	switch (kind) {
	case KIND_ESP:
		break;
	case KIND_ESP_IN_UDP:
		key.port = f->p.sport;
		break;
	case KIND_AH:
		if (vv->flags & VIP_F_AH)
			break;
		return fp_pass(st, kind); /* the slow path answers (ICMPv6 parameter problem) */
	case KIND_FRAGMENT:
		st->fragments++;
		return fp_pass(st, kind);
	case KIND_NOT_OURS: /* ICMPv6 errors included: the slow path relays them */
		st->not_ours++;
		return fp_pass(st, kind);
	default: /* IKE and NAT-keepalives: the daemon's */
		return fp_pass(st, kind);
	}
	__builtin_memcpy(&key.vip, &h->daddr, sizeof(key.vip));
	__builtin_memcpy(&key.client, &h->saddr, sizeof(key.client));
	cv = bpf_map_lookup_elem(&clients6, &key);
	if (!cv) {
		st->miss++;
		return fp_pass(st, kind);
	}
	{
		__u64 now = bpf_ktime_get_coarse_ns(); /* as fp_decide: at most once per grain */

		if (now - cv->last_seen >= LAST_SEEN_GRAIN_NS)
			cv->last_seen = now;
	}
	f->rs_id = cv->rs;
	sv = bpf_map_lookup_elem(&servers, &f->rs_id);
	s6 = bpf_map_lookup_elem(&servers6, &f->rs_id);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!sv || !s6 || addr6_low_block(&s6->addr) || !cfg) { /* no such IPv6 server */
		st->miss++;
		return fp_pass(st, kind);
	}
	f->rip6 = s6->addr;
	f->rs_slot = sv->slot;
	if (f->p.tot_len > frame_len - ETH_HLEN)
		return fp_pass(st, kind);
	if (cfg->client_ifindex)
		in_ifindex = cfg->client_ifindex;
	if (sv->method != METHOD_DR && sv->method != METHOD_NAT) { /* no IPv6 envelope here (docs/ipv6.md) */
		st->miss++;
		return fp_pass(st, kind);
	}
	if (f->p.ttl <= 1) { /* the stack sends the time exceeded */
		st->ttl_pass++;
		return fp_pass(st, kind);
	}
	if (sv->nh_ok)
		return fp_cached_hop(f, sv, f->p.tot_len) ? (sv->method == METHOD_DR ? FP_DR : FP_NAT)
							  : fp_pass(st, kind);
	rc = fib_forward6(ctx, cfg, &f->fib, in_ifindex, &h->saddr, &f->rip6, f->p.proto,
			  f->p.tot_len > 0xffff ? 0xffff : f->p.tot_len);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count_fib_failure(st, rc);
		return fp_pass(st, kind);
	}
	return sv->method == METHOD_DR ? FP_DR : FP_NAT;
}

/* The decision for any frame: IPv6 here, everything else as fastpath.h's fp_decide. */
static __always_inline int fp_decide_any(void *ctx, void *data, void *data_end, __u32 frame_len, __u32 in_ifindex,
					 struct fp *f)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IPV6))
		return fp_decide6(ctx, data, data_end, frame_len, in_ifindex, f);
	return fp_decide(ctx, data, data_end, frame_len, in_ifindex, f);
}

/* DR and NAT66 on packet memory, both hooks: NAT's destination (IPv6 has no header checksum),
 * hop limit - 1, the next hop's MACs. The UDP checksum of ESP-in-UDP under NAT is the hook's.
 * Returns 0, or -1 if the header is not in [data, data_end). */
static __always_inline int l3_rewrite6_in_place(void *data, void *data_end, const struct addr6 *rip, int nat,
						const struct bpf_fib_lookup *fib)
{
	struct ethhdr *eth = data;
	struct ipv6_hdr *h = data + ETH_HLEN;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (nat)
		h->daddr = *rip;
	h->hop_limit--;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return 0;
}

#endif
