/* The return path through the director (return_path = "director"), in director_reply: DR/TUN real
 * servers' replies, source the VIP, arriving on the real-server-facing interface (docs/fastpath.md,
 * "The return path").
 *
 * ESP, AH and ESP-in-UDP from a VIP in `return_vips` go to the client when the client's entry in
 * `clients` (the same keys as the client-side program: port 0 for ESP/AH, the client's port for
 * ESP-in-UDP) names the real server whose MAC sent the frame (`return_macs`, kept by the daemon
 * from its neighbour table): TTL - 1, bpf_fib_lookup, bpf_redirect; the source stays the VIP. A
 * frame from another MAC is dropped (DROP_RETURN_WRONG_SERVER), as is anything from the VIP that
 * is no IPsec at all (DROP_RETURN_NOT_IPSEC). IKE (the daemon records the responder SPI from it),
 * NAT-keepalives, fragments, malformed packets and ESP of a client not in the map pass to the
 * stack, where the reply queue takes them before the martian check and the core decides.
 * Counted in `return_stats` (per CPU): [reason - 80] drops, [RET_FORWARDED] forwarded packets.
 */
#ifndef VPN_DIRECTOR_RETURN_PATH_H
#define VPN_DIRECTOR_RETURN_PATH_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"
#include "maps.h"
#include "drop_reasons.h"
#include "parsing.h"
#include "fib.h"
#include "skb.h"

#define RET_DROP_BASE 80 /* return_stats[reason - RET_DROP_BASE] */
#define RET_FORWARDED 15 /* return_stats[RET_FORWARDED]: forwarded to the client in the kernel */
#define RET_STATS 16

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);   /* a VIP whose service has return_path = "director", network order */
	__type(value, __u32); /* its service id */
} return_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);   /* a real server's MAC in the first 6 bytes (memory order), then 0 0 */
	__type(value, __u32); /* its real server id */
} return_macs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RET_STATS);
	__type(key, __u32);
	__type(value, __u64);
} return_stats SEC(".maps");

static __always_inline void return_count(__u32 i)
{
	__u64 *n = bpf_map_lookup_elem(&return_stats, &i);

	if (n)
		(*n)++;
}

/* A reply about to be sent on toward the client with source `src` (the VIP): 0 with `fib` filled
 * when the route and the neighbour are known; 1 when the stack must take it instead (a stub, TTL
 * 1, no route or neighbour yet), counted. Used by the NAT replies too (director_reply.bpf.c). */
static __always_inline int reply_route(struct __sk_buff *skb, struct dp_config *cfg, struct dp_stats *st,
				       struct bpf_fib_lookup *fib, const struct pkt *p, __u32 src)
{
	__u32 in_ifindex;
	long rc;

	if (p->tot_len > skb->len - ETH_HLEN) /* a stub: the stack drops it (ip_rcv) */
		return 1;
	if (p->ttl <= 1) {
		st->ttl_pass++;
		return 1;
	}
	/* Toward the client, as ip_forward would route the (rewritten) packet arriving here. */
	in_ifindex = cfg->lan_ifindex ? cfg->lan_ifindex : skb->ingress_ifindex;
	rc = fib_forward(skb, cfg, fib, in_ifindex, src, p->dst, p->tos, p->proto, p->tot_len);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count_fib_failure(st, rc);
		return 1;
	}
	return 0;
}

/* A frame from the server side whose IPv4 source is not a NAT real server's: the return path's, or
 * not ours (TC_ACT_OK). Returns a tc action, or -1 when a helper failed halfway (drop it). */
static __always_inline int return_path(struct __sk_buff *skb, struct dp_config *cfg, struct dp_stats *st)
{
	struct bpf_fib_lookup fib;
	struct client_key key = {};
	struct client_val *cv;
	struct pkt p = {};
	void *data, *data_end, *ip;
	__u32 vip, *svc, *rs;
	__u64 mac = 0;
	int kind, ret;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + sizeof(struct ipv4_hdr) > data_end)
		return TC_ACT_OK;
	ip = data + ETH_HLEN;
	vip = ((struct ipv4_hdr *)ip)->saddr;
	svc = bpf_map_lookup_elem(&return_vips, &vip);
	if (!svc)
		return TC_ACT_OK;
	kind = classify(ip, data_end, 1, &p);
	if (kind < 0 || kind == KIND_FRAGMENT || kind == KIND_IKE_INITIAL || kind == KIND_IKE ||
	    kind == KIND_NATT_KEEPALIVE)
		return TC_ACT_OK;
	if (kind == KIND_NOT_OURS) {
		return_count(DROP_RETURN_NOT_IPSEC - RET_DROP_BASE);
		return TC_ACT_SHOT;
	}
	key.vip = vip;
	key.client = p.dst;
	key.port = kind == KIND_ESP_IN_UDP ? p.dport : 0;
	cv = bpf_map_lookup_elem(&clients, &key);
	if (!cv)
		return TC_ACT_OK; /* no ESTABLISHED client in the map (yet): the core decides */
	__builtin_memcpy(&mac, ((struct ethhdr *)data)->h_source, ETH_ALEN);
	rs = bpf_map_lookup_elem(&return_macs, &mac);
	if (!rs || *rs != cv->rs) {
		return_count(DROP_RETURN_WRONG_SERVER - RET_DROP_BASE);
		return TC_ACT_SHOT;
	}
	if (reply_route(skb, cfg, st, &fib, &p, vip))
		return TC_ACT_OK;
	if (skb_decrease_ttl(skb, ETH_HLEN, p.ttl, p.proto))
		return -1;
	ret = skb_eth_redirect(skb, &fib);
	if (ret == TC_ACT_SHOT)
		return -1;
	return_count(RET_FORWARDED);
	return ret;
}

#endif
