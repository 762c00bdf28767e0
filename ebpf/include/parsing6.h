/* IPv6 header parsing of the fast path: director.packet's ipv6_header and ipv6_upper transcribed
 * (tests/bpf/test_classifier_agreement.py runs both on one table of IPv6 packets), then the same
 * upper-layer classification as IPv4 (parsing.h: classify_upper).
 *
 * One difference, by design: the walk stops classifying at V6_WALK_MAX bytes of extension headers.
 * A packet whose upper-layer header lies deeper (or beyond the linear part of a tc skb, though
 * within the packet) is CLASSIFY_DEEP: passed untouched, and the slow path classifies it whole.
 * References: RFC 8200 sections 4 and 4.5, RFC 6946 (atomic fragments), RFC 4291 section 2.5. */
#ifndef VPN_DIRECTOR_PARSING6_H
#define VPN_DIRECTOR_PARSING6_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "drop_reasons.h"
#include "structs.h"
#include "parsing.h"

#define IP6_HLEN 40
#define MAX_EXT_HEADERS 8 /* director.packet.MAX_EXT_HEADERS */
#define V6_WALK_MAX 512   /* the deepest upper-layer header the fast path classifies */
#define V6_PULL_LEN 600   /* tc: what to make linear of an IPv6 frame (V6_WALK_MAX + 40 + Ethernet) */
#define CLASSIFY_DEEP 16  /* not a Kind: "deeper than V6_WALK_MAX, the slow path's" */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define IP6_FRAGMENTED 0xfff9 /* offset | M of a fragment header's word: a real fragment */

struct ipv6_hdr {
	__u8 vtc;    /* version, then the traffic class's high nibble */
	__u8 tcfl;   /* the traffic class's low nibble, then the flow label */
	__be16 fl;
	__be16 plen; /* payload length */
	__u8 nexthdr;
	__u8 hop_limit;
	struct addr6 saddr;
	struct addr6 daddr;
};

/* In ::/96 (unspecified, loopback, IPv4-compatible): refused as director.packet.ipv6_header does. */
static __always_inline int addr6_low_block(const struct addr6 *a)
{
	return !(a->w[0] | a->w[1] | a->w[2]);
}

/* Classify the IPv6 packet at ip (ip_len bytes of it in the frame), as director.packet.classify:
 * a Kind, -DropReason, or CLASSIFY_DEEP. p->ihl is where the upper-layer header starts. */
static __always_inline int classify6(void *ip, void *data_end, __u32 ip_len, int reply, struct pkt *p)
{
	struct ipv6_hdr *h = ip;
	__u32 total, off = IP6_HLEN, count;
	__u8 nh;

	if ((void *)(h + 1) > data_end)
		return -DROP_IP_TRUNCATED;
	if (h->vtc >> 4 != 6)
		return -DROP_IP_BAD_VERSION;
	if (addr6_low_block(&h->saddr) || addr6_low_block(&h->daddr))
		return -DROP_IP6_BAD_ADDRESS;
	total = IP6_HLEN + bpf_ntohs(h->plen);
	p->src = 0;
	p->dst = 0;
	p->tot_len = total;
	p->ttl = h->hop_limit;
	p->tos = ((h->vtc & 0x0f) << 4) | (h->tcfl >> 4); /* the traffic class */
	p->sport = 0;
	p->dport = 0;
	p->ihl = 0;
	nh = h->nexthdr;
	for (count = 0; count <= MAX_EXT_HEADERS; count++) {
		__u8 *e;
		__u32 size;

		if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_FRAGMENT && nh != NEXTHDR_DEST)
			break;
		if (count == MAX_EXT_HEADERS)
			return -DROP_IP6_EXT_CHAIN_TOO_LONG;
		if (nh == NEXTHDR_HOP && count)
			return -DROP_IP6_BAD_HOP_BY_HOP;
		if (total < off + 8 || ip_len < off + 8)
			return -DROP_IP6_EXT_TRUNCATED;
		if (off > V6_WALK_MAX)
			return CLASSIFY_DEEP;
		e = ip + (off & (L4_OFF_MAX - 1));
		if ((void *)(e + 8) > data_end)
			return CLASSIFY_DEEP; /* in the packet, past the linear data */
		if (nh == NEXTHDR_FRAGMENT) {
			__u16 word = bpf_ntohs(*(__be16 *)(e + 2));

			off += 8;
			if (word & IP6_FRAGMENTED) {
				p->proto = e[0];
				p->ihl = off;
				return KIND_FRAGMENT;
			}
			nh = e[0];
			continue;
		}
		size = ((__u32)e[1] + 1) << 3;
		if (total < off + size || ip_len < off + size)
			return -DROP_IP6_EXT_TRUNCATED;
		if (nh == NEXTHDR_ROUTING && e[3]) { /* segments left: the VIP is not the last stop */
			p->proto = NEXTHDR_ROUTING;
			p->ihl = off;
			return KIND_NOT_OURS;
		}
		nh = e[0];
		off += size;
	}
	if (off > V6_WALK_MAX)
		return CLASSIFY_DEEP;
	p->proto = nh;
	p->ihl = off;
	return classify_upper(ip, off, total, data_end, reply, p);
}

#endif
