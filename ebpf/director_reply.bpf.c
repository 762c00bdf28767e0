// SPDX-License-Identifier: GPL-2.0
/* director_reply: NAT replies in the kernel, at tc clsact ingress of the real-server-facing
 * interface (docs/fastpath.md).
 *
 * A NAT real server answers its clients through the director, from its own address. ESP and
 * ESP-in-UDP (classified as director.packet.classify(reply=True): source port 4500, non-zero
 * first word) from an address in `nat_replies` get the VIP as source (IP checksum, and the UDP
 * checksum when non-zero, incrementally), TTL - 1, and are routed to the client with
 * bpf_fib_lookup + bpf_redirect. Everything else passes untouched: IKE replies (the daemon records
 * the responder's SPIs from them), malformed packets (the slow path drops them with their reason),
 * other traffic. As in director_tc, the route lookup comes before any rewrite.
 *
 * From a VIP whose service has return_path = "director" (DR/TUN replies through the director):
 * include/return_path.h.
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
#include "skb.h"
#include "return_path.h"

#define DROP_INTERNAL 0 /* drops[0]: a rewrite helper failed halfway (never a DropReason) */

SEC("tc")
int director_reply(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib;
	struct dp_config *cfg;
	struct dp_stats *st;
	struct pkt p = {};
	void *data, *data_end, *ip;
	__u32 zero = 0, rip, *vipp;
	__be32 vip;
	int kind, ret;

	st = bpf_map_lookup_elem(&stats, &zero);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!st || !cfg)
		return TC_ACT_OK;
	skb_pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + sizeof(struct ipv4_hdr) > data_end)
		return TC_ACT_OK;
	if (((struct ethhdr *)data)->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + ETH_HLEN;
	rip = ((struct ipv4_hdr *)ip)->saddr;
	vipp = bpf_map_lookup_elem(&nat_replies, &rip);
	if (!vipp) {
		ret = return_path(skb, cfg, st); /* DR/TUN replies from a VIP (include/return_path.h) */
		if (ret < 0)
			goto fail;
		return ret;
	}
	vip = *vipp;

	kind = classify(ip, data_end, 1, &p);
	if (kind != KIND_ESP && kind != KIND_ESP_IN_UDP)
		return TC_ACT_OK;
	if (reply_route(skb, cfg, st, &fib, &p, vip)) /* include/return_path.h */
		return TC_ACT_OK;
	/* From here on the packet changes: a helper failure must drop, not pass, it. */
	if (skb_nat_addr(skb, ETH_HLEN, offsetof(struct iphdr, saddr), ETH_HLEN + p.ihl, kind == KIND_ESP_IN_UDP,
			 rip, vip))
		goto fail;
	if (skb_decrease_ttl(skb, ETH_HLEN, p.ttl, p.proto))
		goto fail;
	ret = skb_eth_redirect(skb, &fib);
	if (ret == TC_ACT_SHOT)
		goto fail;
	st->replies++;
	return ret;
fail:
	st->drops[DROP_INTERNAL]++;
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
