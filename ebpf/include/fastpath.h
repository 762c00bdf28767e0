/* The client-side fast path's decision, shared by director_tc (tc) and director_xdp (XDP): what
 * to do with one frame, up to but not including the rewrite, which each hook does its own way.
 *
 * fp_decide() classifies the frame exactly as director.packet.classify does, looks the client up,
 * refreshes last_seen (on a miss of a labelled service, the ESP SPI's label may name the real
 * server instead: fp_label), and for a hit checks what the forwarding needs (TTL, route and neighbour,
 * TUN envelope size) before anything changes. It counts every pass and drop itself; a forwarding
 * verdict is counted by fp_forwarded() once the hook has rewritten and redirected the packet, or
 * by fp_internal_drop() if a rewrite failed halfway. So both hooks keep the stats invariant of
 * docs/fastpath.md: a packet to a VIP counts exactly once in fwd_packets[kind], pass_packets[kind]
 * or drops[reason].
 */
#ifndef VPN_DIRECTOR_FASTPATH_H
#define VPN_DIRECTOR_FASTPATH_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "structs.h"
#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "fib.h"
#include "ingress.h"

#define IPIP_HLEN 20 /* the outer header we prepend: IHL 5, no options (RFC 2003) */
#define IPIP_TTL 64
#define DROP_INTERNAL 0 /* drops[0]: a rewrite helper failed halfway (never a DropReason) */
#define LAST_SEEN_GRAIN_NS 100000000ULL /* clients' last_seen: refreshed at most every 100 ms */

/* What fp_decide() says; the hook maps it to its own return codes. */
enum fp_verdict {
	FP_PASS, /* to the stack, untouched (TC_ACT_OK, XDP_PASS) */
	FP_DROP, /* malformed, to a VIP (TC_ACT_SHOT, XDP_DROP) */
	FP_DR,   /* forward: TTL - 1, Ethernet rewrite, redirect to fib.ifindex */
	FP_NAT,  /* forward: destination -> real server, then as DR */
	FP_TUN,  /* forward: prepend `outer`, Ethernet rewrite, redirect */
};

/* Everything the rewrite of a forwarding verdict needs. */
struct fp {
	struct bpf_fib_lookup fib; /* the route: egress ifindex, MACs */
	struct ipv4_hdr outer;     /* TUN: the outer header, checksum done */
	struct pkt p;
	struct dp_stats *st;
	struct addr6 rip6; /* IPv6 (fastpath6.h): the real server's address */
	int v6;      /* the packet is IPv6 (fp_decide6) */
	__be32 rip;  /* the real server's address */
	__u32 rs_id;
	__u32 rs_slot; /* its counters' index in rs_stats */
	int kind;
	int labelled; /* the real server came from the SPI's label, not from `clients` (fp_label) */
	__u32 spi;    /* labelled: the ESP SPI, host order */
};

static __always_inline int fp_pass(struct dp_stats *st, int kind)
{
	st->pass_packets[kind & (N_KINDS - 1)]++;
	return FP_PASS;
}

/* A rewrite failed after the packet changed: it must not be sent, nor reach the stack. */
static __always_inline int fp_internal_drop(const struct fp *f)
{
	f->st->drops[DROP_INTERNAL]++;
	return FP_DROP;
}

/* Per-real-server counters, in the server's own slot of a per-CPU array (an inlined lookup). */
static __always_inline void count_rs(__u32 slot, int kind, __u32 bytes)
{
	struct rs_stats *r = bpf_map_lookup_elem(&rs_stats, &slot);

	if (!r)
		return;
	r->packets[kind & (N_KINDS - 1)]++;
	r->bytes[kind & (N_KINDS - 1)] += bytes;
}

#define ADMIT_SOURCE_WINDOW_NS 1000000000ULL /* a source's limit counts in 1 s windows */

/* May this initial IKE packet from src go up to the queue? Per source first (a spoofer's excess
 * costs nobody else), then the global limit (per_window in every window_ns). Returns 0 (admitted)
 * or the drop reason of the limit that refused it. Counts are atomic adds; a window's reset is a
 * plain store, so two CPUs crossing a window boundary together may admit a few packets more: a
 * bound within a few packets, not exact, which is all a flood limit needs. */
static __always_inline int fp_admit(__be32 src)
{
	struct admit_src *as;
	struct admit *a;
	__u32 zero = 0;
	__u64 now, w;

	a = bpf_map_lookup_elem(&admit, &zero);
	if (!a || !((a->per_window && a->window_ns) | a->per_source))
		return 0;
	now = bpf_ktime_get_ns();
	if (a->per_source) {
		w = now / ADMIT_SOURCE_WINDOW_NS;
		as = bpf_map_lookup_elem(&admit_src, &src);
		if (!as) {
			struct admit_src fresh = {.window = w, .count = 1};

			bpf_map_update_elem(&admit_src, &src, &fresh, BPF_ANY);
		} else {
			if (as->window != w) {
				as->window = w;
				as->count = 0;
			}
			__sync_fetch_and_add(&as->count, 1);
			if (as->count > a->per_source)
				return DROP_SOURCE_RATE_LIMITED;
		}
	}
	if (a->per_window && a->window_ns) {
		w = now / a->window_ns;
		if (a->window != w) {
			a->window = w;
			a->count = 0;
		}
		__sync_fetch_and_add(&a->count, 1);
		if (a->count > a->per_window)
			return DROP_RATE_LIMITED;
	}
	return 0;
}

/* -- SPI labels (docs/fastpath.md, "SPI labels") ------------------------------------------------
 * A `clients` miss of ESP or ESP-in-UDP to a service with labels: the real server whose inbound
 * ESP range holds the SPI gets the packet, forwarded as a hit would be (fp_label: returns 1 with
 * f->rs_id set, else 0: not labelled, a miss as before). Once forwarded, the client key is
 * recorded once in label_seen (fp_label_forwarded) for the daemon, which creates the ESTABLISHED
 * entry; then the `clients` map has it. A labelled packet passed instead (TTL, route, MTU) is
 * not recorded: the slow path sees it and decides (director.core: _label_esp). */
static __always_inline struct label_stats *fp_label_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&label_stats, &zero);
}

static __always_inline void fp_label_forwarded(const struct fp *f)
{
	struct label_stats *ls = fp_label_stats();
	struct client_key key = {.vip = f->p.dst, .client = f->p.src};
	struct label_seen_val rec = {.spi = f->spi, .rs = f->rs_id};

	if (f->kind == KIND_ESP_IN_UDP)
		key.port = f->p.sport;
	if (ls)
		ls->forwarded++;
	if (bpf_map_lookup_elem(&label_seen, &key))
		return; /* recorded already, not drained yet */
	rec.first = bpf_ktime_get_ns();
	if (!bpf_map_update_elem(&label_seen, &key, &rec, BPF_NOEXIST) && ls)
		ls->recorded++;
}

static __always_inline int fp_label(void *ip, void *data_end, const struct vip_val *vv, struct fp *f)
{
	struct spi_label_cfg *c;
	struct label_stats *ls;
	__u32 svc = vv->svc, spi;
	__u16 rs;

	if (f->kind != KIND_ESP && f->kind != KIND_ESP_IN_UDP)
		return 0;
	c = bpf_map_lookup_elem(&spi_labels, &svc);
	if (!c)
		return 0; /* a service without labels: one lookup, nothing more */
	spi = esp_spi(ip, data_end, &f->p, f->kind);
	rs = spi ? spi_label_esp(c, spi) : SPI_LABEL_NONE;
	if (rs == SPI_LABEL_NONE) {
		ls = fp_label_stats();
		if (ls)
			ls->unknown++;
		return 0;
	}
	f->rs_id = rs;
	f->spi = spi;
	f->labelled = 1;
	return 1;
}

/* Ingress limits (include/ingress.h): to the stack within the source's limit, else dropped and
 * counted by the limit's reason. */
static __always_inline int fp_limited_pass(struct dp_stats *st, __u32 vip, __be32 src, int cls, int kind)
{
	int refused = fp_ingress(vip, src, cls);

	if (!refused)
		return fp_pass(st, kind);
	st->drops[refused & (N_DROP_REASONS - 1)]++;
	return FP_DROP;
}

/* The packet was rewritten and handed to the redirect. */
static __always_inline void fp_forwarded(const struct fp *f)
{
	int k = f->kind & (N_KINDS - 1);

	f->st->fwd_packets[k]++;
	f->st->fwd_bytes[k] += f->p.tot_len;
	count_rs(f->rs_slot, f->kind, f->p.tot_len);
	if (f->labelled)
		fp_label_forwarded(f);
}

/* The next hop the daemon resolved for this real server (server_val.nh_*), in place of the route
 * and neighbour lookup: only what the rewrite and the redirect read of f->fib is filled in. len is
 * the length of the packet that will leave; above the egress MTU it is the slow path's (which
 * fragments or answers), as bpf_fib_lookup's FRAG_NEEDED. Returns 1, or 0 (counted: pass it). */
static __always_inline int fp_cached_hop(struct fp *f, const struct server_val *sv, __u32 len)
{
	if (len > sv->nh_mtu) {
		f->st->mtu_pass++;
		return 0;
	}
	f->fib.ifindex = sv->nh_ifindex;
	__builtin_memcpy(f->fib.dmac, sv->nh_dmac, ETH_ALEN);
	__builtin_memcpy(f->fib.smac, sv->nh_smac, ETH_ALEN);
	return 1;
}

/* DR and NAT: the packet is routed toward the real server as ip_forward would, TTL decremented;
 * NAT also turns the destination VIP into the real server's address. */
static __always_inline int fp_route_dr_nat(void *ctx, struct fp *f, const struct server_val *sv,
					   const struct dp_config *cfg, __u32 in_ifindex,
					   int verdict)
{
	long rc;

	if (f->p.ttl <= 1) { /* the stack sends the time-exceeded (RFC 1812 section 5.3.1) */
		f->st->ttl_pass++;
		return fp_pass(f->st, f->kind);
	}
	if (sv->nh_ok)
		return fp_cached_hop(f, sv, f->p.tot_len) ? verdict : fp_pass(f->st, f->kind);
	rc = fib_forward(ctx, cfg, &f->fib, in_ifindex, f->p.src, sv->addr, f->p.tos, f->p.proto, f->p.tot_len);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count_fib_failure(f->st, rc);
		return fp_pass(f->st, f->kind);
	}
	return verdict;
}

/* TUN: the whole packet inside an outer IPv4 header (RFC 2003) from lan_addr to the real server,
 * as director.forwarding.rewrite.ipip_encap builds it in the slow path. The inner packet is not
 * touched (no TTL decrement, as the slow path's envelope sent from user space). */
static __always_inline int fp_route_tun(void *ctx, struct fp *f, const struct server_val *sv,
					const struct dp_config *cfg, __u32 in_ifindex)
{
	__u32 envelope = (__u32)f->p.tot_len + IPIP_HLEN;
	struct ipv4_hdr *o = &f->outer;
	long rc;

	/* The slow path fragments a large envelope (DF clear); here it could not. An unset config
	 * (lan_mtu 0) sends every TUN packet to the slow path. */
	if (envelope > cfg->lan_mtu || envelope > 0xffff) {
		f->st->mtu_pass++;
		return fp_pass(f->st, f->kind);
	}
	if (!cfg->lan_addr) {
		f->st->fib_miss++;
		return fp_pass(f->st, f->kind);
	}
	if (sv->nh_ok) {
		if (!fp_cached_hop(f, sv, envelope))
			return fp_pass(f->st, f->kind);
	} else {
		rc = fib_forward(ctx, cfg, &f->fib, in_ifindex, cfg->lan_addr, sv->addr, f->p.tos, IPPROTO_IPIP,
				 envelope);
		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			count_fib_failure(f->st, rc);
			return fp_pass(f->st, f->kind);
		}
	}

	o->vihl = 0x45;
	o->tos = f->p.tos; /* DSCP and ECN copied whole (RFC 6040 section 4.1 normal mode) */
	o->tot_len = bpf_htons(envelope);
	/* DF clear, so the envelope may be fragmented on the way; a random ID keeps reassembly at the
	 * real server safe without shared state between CPUs (RFC 6864 section 4.1). */
	o->id = (__be16)bpf_get_prandom_u32();
	o->frag_off = 0;
	o->ttl = IPIP_TTL;
	o->protocol = IPPROTO_IPIP;
	o->check = 0;
	o->saddr = cfg->lan_addr;
	o->daddr = sv->addr;
	o->check = ipv4_csum20(o);
	return FP_TUN;
}

/* Every decision starts here: the per-CPU stats, and the fields a verdict reads. 0: no stats map
 * value (cannot happen once loaded): pass. */
static __always_inline int fp_start(struct fp *f)
{
	__u32 zero = 0;

	f->st = bpf_map_lookup_elem(&stats, &zero);
	f->labelled = 0;
	f->v6 = 0;
	return f->st != 0;
}

/* The decision for the frame [data, data_end) of frame_len bytes in all (more than data_end - data
 * when tc's skb is not linear). in_ifindex: the fib lookups' input interface when the config
 * names none. Packet pointers are not kept: the hook re-reads them for its rewrite. */
static __always_inline int fp_decide(void *ctx, void *data, void *data_end, __u32 frame_len, __u32 in_ifindex,
				     struct fp *f)
{
	struct client_key key = {};
	struct client_val *cv;
	struct server_val *sv;
	struct dp_config *cfg;
	struct vip_val *vv;
	struct ethhdr *eth = data;
	struct dp_stats *st;
	__u32 zero = 0, vip;
	void *ip;
	int kind;

	if (!fp_start(f))
		return FP_PASS;
	st = f->st;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		st->not_ours++;
		return FP_PASS;
	}
	ip = eth + 1;
	/* Without the 20 bytes of a header the destination is unknown: whose packet it is cannot be
	 * told, so it is not ours to judge (the stack drops it). */
	if (ip + sizeof(struct ipv4_hdr) > data_end) {
		st->not_ours++;
		return FP_PASS;
	}
	vip = ((struct ipv4_hdr *)ip)->daddr;
	vv = bpf_map_lookup_elem(&vips, &vip);
	if (!vv) {
		st->not_ours++;
		return FP_PASS;
	}

	kind = classify(ip, data_end, 0, &f->p);
	if (kind < 0) {
		st->drops[(-kind) & (N_DROP_REASONS - 1)]++;
		return FP_DROP;
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
		/* the slow path answers (ICMP protocol unreachable), within the AH ingress limit */
		return fp_limited_pass(st, vip, f->p.src, ING_AH, kind);
	case KIND_FRAGMENT:
		st->fragments++;
		return fp_pass(st, kind);
	case KIND_NOT_OURS:
		/* An ICMP error about an ESTABLISHED conversation: relayed to its real server below, as
		 * its ESP would be (NAT: by the slow path, which rewrites the quote). Counted as a
		 * forwarded NOT_OURS packet (fwd_packets[0]: nothing else of that kind is forwarded). */
		if (icmp_error_key(ip, data_end, &f->p, &key))
			break;
		st->not_ours++;
		return fp_pass(st, kind);
	case KIND_IKE_INITIAL: { /* the daemon's, within the admission limits */
		int refused = fp_ingress(vip, f->p.src, ING_IKE);

		if (!refused)
			refused = fp_admit(f->p.src);

		if (!refused)
			return fp_pass(st, kind);
		st->drops[refused & (N_DROP_REASONS - 1)]++;
		return FP_DROP;
	}
	case KIND_IKE: /* the daemon's, within the IKE ingress limit */
		return fp_limited_pass(st, vip, f->p.src, ING_IKE, kind);
	default: /* NAT-keepalives: the daemon's */
		return fp_pass(st, kind);
	}

	key.vip = vip;
	if (kind != KIND_NOT_OURS) /* an ICMP error's key names the client it quotes */
		key.client = f->p.src;
	cv = bpf_map_lookup_elem(&clients, &key);
	if (cv) {
		/* A plain store: one aligned 64-bit write, atomic on 64-bit CPUs; the daemon only reads
		 * it. An ICMP error is no sign of the client's life: it refreshes nothing. */
		if (kind != KIND_NOT_OURS) {
			/* The coarse clock (CLOCK_MONOTONIC as of the last tick): a load, where
			 * bpf_ktime_get_ns reads the clocksource; a tick is nothing against the 100 ms
			 * grain. Written at most once per grain: a write on every packet would dirty the
			 * entry's cache line for every CPU that reads it (docs/fastpath.md). */
			__u64 now = bpf_ktime_get_coarse_ns();

			if (now - cv->last_seen >= LAST_SEEN_GRAIN_NS)
				cv->last_seen = now;
		}
		f->rs_id = cv->rs;
	} else if (!fp_label(ip, data_end, vv, f)) { /* SPI labels: the SPI may name the server */
		/* no ESTABLISHED client and no label naming a server: ESP and AH within the source's
		 * ingress limit (include/ingress.h) */
		if (kind != KIND_NOT_OURS) {
			int refused = fp_ingress(vip, f->p.src, kind == KIND_AH ? ING_AH : ING_ESP);

			if (refused) {
				st->drops[refused & (N_DROP_REASONS - 1)]++;
				return FP_DROP;
			}
		}
		st->miss++;
		return fp_pass(st, kind);
	}
	sv = bpf_map_lookup_elem(&servers, &f->rs_id);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!sv || !sv->addr || !cfg) { /* addr 0: no such server (an unused slot) */
		st->miss++;
		return fp_pass(st, kind);
	}
	f->rip = sv->addr;
	f->rs_slot = sv->slot;
	/* A total length beyond the frame: classify() accepts it (a truncated copy in user space),
	 * but forwarded it would be a stub; the stack drops it (ip_rcv), as without a fast path. */
	if (f->p.tot_len > frame_len - ETH_HLEN)
		return fp_pass(st, kind);
	/* The configured interface, else the one the packet came in on (the same in production;
	 * BPF_PROG_TEST_RUN has no real ingress interface, so tests configure it). */
	if (cfg->client_ifindex)
		in_ifindex = cfg->client_ifindex;

	if (kind == KIND_NOT_OURS && sv->method != METHOD_DR && sv->method != METHOD_TUN)
		return fp_pass(st, kind); /* NAT: the quoted source needs rewriting too (slow path) */
	switch (sv->method) {
	case METHOD_DR:
		return fp_route_dr_nat(ctx, f, sv, cfg, in_ifindex, FP_DR);
	case METHOD_NAT:
		return fp_route_dr_nat(ctx, f, sv, cfg, in_ifindex, FP_NAT);
	case METHOD_TUN:
		return fp_route_tun(ctx, f, sv, cfg, in_ifindex);
	default:
		st->miss++;
		return fp_pass(st, kind);
	}
}

#endif
