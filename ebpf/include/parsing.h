/* Header parsing of the fast path: the classifier that must agree with director.packet.classify.
 *
 * classify() is a line-by-line transcription of director/packet.py's classify(): the same checks
 * in the same order, the same kinds, the same drop reasons; tests/bpf/test_classifier_agreement.py
 * runs both on one table of packets. Python's "n" (bytes in the buffer) is data_end - ip here:
 * every `n < off + k` check is the bounds check `ip + off + k > data_end` the verifier wants anyway,
 * so each header read below is preceded by its own bounds check by construction.
 * References: RFC 791, RFC 768, RFC 2408 / RFC 7296 section 3.1, RFC 3948, RFC 4303, RFC 4302. */
#ifndef VPN_DIRECTOR_PARSING_H
#define VPN_DIRECTOR_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "drop_reasons.h"
#include "structs.h"

#define IKE_PORT 500
#define NATT_PORT 4500        /* RFC 3948 */
#define IKE_HEADER_LEN 28     /* RFC 2408 section 3.1, RFC 7296 section 3.1 */
#define IP_MF_OR_OFFSET 0x3fff /* More Fragments | 13-bit fragment offset (RFC 791) */

/* The deepest byte classify() reads: Ethernet 14 + IPv4 header up to 60 + UDP 8 + non-ESP marker
 * 4 + IKE header 28 = 114. Pulling this much into the linear area makes data_end - ip equal to
 * min(IP bytes in the frame, >= 100), which answers every length check of classify() exactly as
 * the whole packet would. */
#define PULL_LEN 128
#define L4_OFF_MAX 1024 /* classify_upper's offsets stay below this (IPv4: at most 60; IPv6: at most V6_WALK_MAX) */

/* A 20-byte IPv4 header without bitfields (linux/ip.h's version/ihl bitfields follow the
 * compiling host's byte order; this layout does not depend on it). */
struct ipv4_hdr {
	__u8 vihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

/* What the forwarding needs from a classified packet. */
struct pkt {
	__be32 src;    /* IPv4 only (an IPv6 packet's addresses stay in the packet) */
	__be32 dst;
	__u16 ihl;     /* IP header length in bytes; IPv6: where the upper-layer header starts */
	__u16 sport;   /* UDP ports, host order (0 when not UDP) */
	__u32 tot_len; /* IP total length, host order; IPv6: 40 + payload length */
	__u16 dport;
	__u8 proto;
	__u8 ttl;      /* IPv6: the hop limit */
	__u8 tos;
	__u8 pad[3];
};

/* Classify the IPv4 packet at ip, as director.packet.classify(data, reply): returns a Kind (>= 0)
 * and fills *p, or -DropReason for a malformed packet. reply selects the UDP source port instead
 * of the destination port, as classify(reply=True). */
static __always_inline int classify_upper(void *ip, __u32 off, __u32 total, void *data_end, int reply,
					  struct pkt *p);

static __always_inline int classify(void *ip, void *data_end, int reply, struct pkt *p)
{
	struct ipv4_hdr *iph = ip;
	__u32 ihl, total;
	__u8 vihl;

	if ((void *)(iph + 1) > data_end)
		return -DROP_IP_TRUNCATED;
	vihl = iph->vihl;
	if (vihl >> 4 != 4)
		return -DROP_IP_BAD_VERSION;
	ihl = (__u32)(vihl & 0x0f) << 2;
	if (ihl < 20)
		return -DROP_IP_BAD_IHL;
	if (ip + ihl > data_end)
		return -DROP_IP_TRUNCATED;
	total = bpf_ntohs(iph->tot_len);
	if (total < ihl)
		return -DROP_IP_BAD_TOTAL_LENGTH;

	p->src = iph->saddr;
	p->dst = iph->daddr;
	p->ihl = ihl;
	p->tot_len = total;
	p->proto = iph->protocol;
	p->ttl = iph->ttl;
	p->tos = iph->tos;
	p->sport = 0;
	p->dport = 0;
	/* A non-first fragment has no L4 header; a first one has only part of the message. */
	if (iph->frag_off & bpf_htons(IP_MF_OR_OFFSET))
		return KIND_FRAGMENT;
	return classify_upper(ip, ihl, total, data_end, reply, p);
}

/* The upper-layer half of classify() and classify6(), director.packet._upper: the ESP, AH or UDP
 * header at ip + off (off < L4_OFF_MAX), the packet ending at total by its IP header. */
static __always_inline int classify_upper(void *ip, __u32 off, __u32 total, void *data_end, int reply, struct pkt *p)
{
	struct udphdr *udp;
	__u8 *l4, *pl;
	__u32 plen, ulen, size, port;

	plen = total - off; /* the IP payload by the header, whatever the frame holds */
	l4 = ip + (off & (L4_OFF_MAX - 1));

	if (p->proto == IPPROTO_ESP) { /* RFC 4303 section 2: SPI 4, sequence 4 */
		if (plen < 8 || (void *)(l4 + 8) > data_end)
			return -DROP_ESP_TRUNCATED;
		if (!*(__u32 *)l4) /* SPI 0 is reserved (RFC 4303 section 2.1) */
			return -DROP_ESP_ZERO_SPI;
		return KIND_ESP;
	}

	if (p->proto == IPPROTO_AH) { /* RFC 4302 section 2 */
		__u32 ah_len;

		if (plen < 12 || (void *)(l4 + 12) > data_end)
			return -DROP_AH_TRUNCATED;
		ah_len = ((__u32)l4[1] + 2) << 2; /* "payload length": 32-bit words minus 2 */
		if (ah_len < 12 || ah_len > plen)
			return -DROP_AH_BAD_LENGTH;
		if (!*(__u32 *)(l4 + 4)) /* RFC 4302 section 2.4 */
			return -DROP_AH_ZERO_SPI;
		return KIND_AH;
	}

	if (p->proto != IPPROTO_UDP)
		return KIND_NOT_OURS;

	/* UDP, RFC 768 */
	if (plen < 8 || (void *)(l4 + 8) > data_end)
		return -DROP_UDP_TRUNCATED;
	udp = (struct udphdr *)l4;
	ulen = bpf_ntohs(udp->len);
	if (ulen < 8 || ulen > plen)
		return -DROP_UDP_BAD_LENGTH;
	p->sport = bpf_ntohs(udp->source);
	p->dport = bpf_ntohs(udp->dest);
	port = reply ? p->sport : p->dport;
	pl = l4 + 8;     /* the UDP payload */
	size = ulen - 8; /* its length by the UDP header */

	if (port == NATT_PORT) { /* RFC 3948 section 2 */
		if (size == 1) { /* NAT-keepalive: one 0xFF byte (section 2.3) */
			if ((void *)(pl + 1) <= data_end && *pl == 0xff)
				return KIND_NATT_KEEPALIVE;
			return -DROP_NATT_TRUNCATED;
		}
		if (size < 4 || (void *)(pl + 4) > data_end)
			return -DROP_NATT_TRUNCATED;
		if (*(__u32 *)pl) { /* a non-zero SPI: ESP-in-UDP, never the non-ESP marker */
			if (size < 8 || (void *)(pl + 8) > data_end)
				return -DROP_NATT_TRUNCATED;
			return KIND_ESP_IN_UDP;
		}
		pl += 4; /* the non-ESP marker; an IKE header follows */
		size -= 4;
	} else if (port != IKE_PORT) {
		return KIND_NOT_OURS;
	}

	/* IKE header; nothing past its 28 bytes is read. 32-bit reads: the header sits at any
	 * 4-byte boundary after the IP options and the marker. */
	if (size < IKE_HEADER_LEN || (void *)(pl + IKE_HEADER_LEN) > data_end)
		return -DROP_IKE_TRUNCATED;
	{
		__u32 *w = (__u32 *)pl;
		__u8 major = pl[17] >> 4;

		if (major != 1 && major != 2)
			return -DROP_IKE_BAD_VERSION;
		if (!(w[0] | w[1])) /* initiator cookie / SPI */
			return -DROP_IKE_ZERO_SPI_I;
		if (bpf_ntohl(w[6]) != size) /* size >= 28 here, so this also rejects length < 28 */
			return -DROP_IKE_BAD_LENGTH;
		return (w[2] | w[3]) ? KIND_IKE : KIND_IKE_INITIAL;
	}
}

/* An ICMP error to a VIP about the VIP's packet to a client (RFC 792: the quoted IPv4 header and
 * the first 8 bytes after it): the `clients` key of that client's conversation, as director.core
 * matches it for an ESTABLISHED entry. A transcription of director.packet.parse_icmp_error's
 * checks (tests/bpf/test_classifier_agreement.py runs both): types 3, 11 and 12; the quoted
 * header whole and well formed, then min(8, its payload) bytes (none for a non-first fragment),
 * all within the outer total length and [ip, data_end); the quoted source the VIP. Raw ESP and AH
 * give the client's key (port 0), UDP from 4500 the client's NAT-T port. Returns 1 with
 * key->client and key->port set, else 0: not such an error, a quote of IKE on 500 (the daemon's),
 * or a malformed one. A 0 goes to the slow path, which drops a malformed error with its reason
 * (ICMP_TRUNCATED...): the fast path only ever forwards these, it never judges them. */
static __always_inline int icmp_error_key(void *ip, void *data_end, const struct pkt *p, struct client_key *key)
{
	struct ipv4_hdr *q;
	struct udphdr *udp;
	__u8 *icmp, *l4;
	__u32 qihl, qtotal, need, quote;

	if (p->proto != IPPROTO_ICMP)
		return 0;
	icmp = ip + p->ihl;
	q = (struct ipv4_hdr *)(icmp + 8);
	if ((void *)(q + 1) > data_end || (__u32)p->tot_len < p->ihl + 8 + sizeof(*q))
		return 0;
	if (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12)
		return 0;
	qihl = (__u32)(q->vihl & 0x0f) << 2;
	qtotal = bpf_ntohs(q->tot_len);
	if (q->vihl >> 4 != 4 || qihl < 20 || qtotal < qihl)
		return 0;
	need = 0; /* a non-first fragment quotes no L4 header */
	if (!(q->frag_off & bpf_htons(0x1fff)))
		need = qtotal - qihl < 8 ? qtotal - qihl : 8;
	quote = (__u32)p->tot_len - p->ihl - 8; /* the quote's length by the outer total length */
	l4 = (__u8 *)q + qihl;
	if (quote < qihl + need || (void *)(l4 + need) > data_end)
		return 0;
	if (q->saddr != p->dst)
		return 0;
	key->client = q->daddr;
	if (q->protocol == IPPROTO_ESP || q->protocol == IPPROTO_AH) {
		key->port = 0;
		return 1;
	}
	udp = (struct udphdr *)l4;
	if (q->protocol == IPPROTO_UDP && need == 8 && (void *)(udp + 1) <= data_end &&
	    udp->source == bpf_htons(NATT_PORT)) {
		key->port = bpf_ntohs(udp->dest);
		return 1;
	}
	return 0;
}

/* SPI labels: the SPI (host order) of a packet classify() found to be ESP (RFC 4303 section 2:
 * the first 4 bytes after the IP header) or ESP-in-UDP (RFC 3948 section 2.2: after the 8-byte
 * UDP header); 0 for any other kind. classify() checked these bytes are there; the verifier
 * wants its own check. */
static __always_inline __u32 esp_spi(void *ip, void *data_end, const struct pkt *p, int kind)
{
	__u8 *spi = ip + (p->ihl & 0x3c); /* 20..60, a multiple of 4: the mask bounds it for the verifier */

	if (kind == KIND_ESP_IN_UDP)
		spi += 8;
	else if (kind != KIND_ESP)
		return 0;
	if ((void *)(spi + 4) > data_end)
		return 0;
	return bpf_ntohl(*(__u32 *)spi);
}

#endif
