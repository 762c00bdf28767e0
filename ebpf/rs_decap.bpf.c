// SPDX-License-Identifier: GPL-2.0
/* rs_decap: the lab real server's IP-in-IP decapsulation, at tc clsact ingress on eth0.
 *
 * In TUN mode the director sends each client packet to a real server wrapped in an outer IPv4
 * header (protocol 4, outer source = director, destination = the real server's address). A
 * production real server decapsulates with the kernel's ipip driver:
 *
 *     ip link add tunl0 type ipip          # or: ip tunnel add tunl0 mode ipip; ip link set tunl0 up
 *     ip addr add VIP/32 dev lo            # the VIP, never ARP-announced
 *     sysctl net.ipv4.conf.tunl0.rp_filter=0 net.ipv4.conf.all.rp_filter=0
 *     sysctl net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
 *
 * The lab kernel has no ipip driver (CONFIG_NET_IPIP is off and nothing loads as a module), so
 * this program stands in for tunl0: it drops the outer header and lets the stack receive the
 * inner packet on eth0, whose destination is the VIP on lo.
 *
 * IPv6 (ip6ip6, next header 41) likewise: decap6 below, in place of an ip6tnl device.
 *
 * An outer header that was fragmented on the way (the envelope exceeded the 1500-byte MTU) cannot
 * be decapsulated here: tc sees each fragment alone, before IP reassembly. Those pass untouched;
 * the kernel reassembles them at local delivery and the lab responder (--decap) strips the outer
 * header from a raw IPPROTO_IPIP socket and writes the inner packet into the TUN device decap0.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* An IPv6 header without bitfields: only the version nibble and the next header are read. */
struct ip6_hdr40 {
	__u8 vtc;
	__u8 rest[5];
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 addrs[32];
};

/* ip6ip6 (RFC 2473): an outer IPv6 header with next header 41 around an IPv6 packet. The
 * director's envelopes carry no extension headers; a fragmented one (next header 44) passes, and
 * the responder (--decap) takes it from a raw socket after reassembly, as for IPv4. */
static __always_inline int decap6(struct __sk_buff *skb, void *data, void *data_end)
{
	struct ip6_hdr40 *outer = data + sizeof(struct ethhdr), *inner;

	if ((void *)(outer + 1) > data_end || outer->nexthdr != 41)
		return TC_ACT_OK;
	inner = outer + 1;
	if ((void *)(inner + 1) > data_end || inner->vtc >> 4 != 6)
		return TC_ACT_OK;
	bpf_skb_adjust_room(skb, -(int)sizeof(*outer), BPF_ADJ_ROOM_MAC, 0);
	return TC_ACT_OK;
}

/* IPv4 flags/fragment-offset word: More Fragments bit | 13-bit offset (RFC 791). Either set means
 * this skb holds only part of the envelope. */
#define IP_MF_OR_OFFSET 0x3fff

SEC("tc")
int rs_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer, *inner;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return decap6(skb, data, data_end);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;

	outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > data_end)
		return TC_ACT_OK;
	if (outer->protocol != IPPROTO_IPIP)
		return TC_ACT_OK;
	/* The shrink below removes exactly 20 bytes; an outer header with options would leave them
	 * in front of the inner header. The director never sends options, so such a packet is not
	 * ours to fix: the stack drops it (no handler for protocol 4). */
	if (outer->ihl != 5)
		return TC_ACT_OK;
	if (outer->frag_off & bpf_htons(IP_MF_OR_OFFSET))
		return TC_ACT_OK;

	/* Only strip what really holds an IPv4 packet: otherwise the stack would parse the
	 * envelope's payload as a header. */
	inner = (void *)(outer + 1);
	if ((void *)(inner + 1) > data_end)
		return TC_ACT_OK;
	if (inner->version != 4)
		return TC_ACT_OK;

	/* BPF_ADJ_ROOM_MAC removes len bytes right after the Ethernet header, i.e. the outer IPv4
	 * header; skb->protocol stays ETH_P_IP, which is what the inner packet is. */
	if (bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_OK;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
