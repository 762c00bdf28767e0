/* The DR and NAT rewrite on packet memory that both hooks share (XDP has nothing else; tc uses
 * it too, since the skb store and csum helpers cost about 60 ns per packet more, measured with
 * BPF_PROG_TEST_RUN). Only the ESP-in-UDP checksum under NAT stays per hook: tc must keep the
 * skb's checksum state (skb.h), XDP does it by arithmetic (xdp.h). */
#ifndef VPN_DIRECTOR_REWRITE_H
#define VPN_DIRECTOR_REWRITE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "parsing.h"
#include "csum.h"

/* DR and NAT on packet memory, for both hooks: NAT's destination with the IP checksum, TTL - 1
 * with the IP checksum over the 16-bit word TTL|protocol (as the kernel's ip_decrease_ttl), and
 * the Ethernet addresses of the next hop. The caller has checked ttl > 1 and done what the hook
 * needs for an ESP-in-UDP checksum under NAT. At tc this needs no skb->csum fix: an IP header
 * whose checksum is right sums to 0xffff whatever its fields, and at ingress skb->csum does not
 * cover the MAC header. Returns 0, or -1 if the headers are not in [data, data_end). */
static __always_inline int l3_rewrite_in_place(void *data, void *data_end, __be32 rip, int nat,
					       const struct bpf_fib_lookup *fib)
{
	struct ethhdr *eth = data;
	struct ipv4_hdr *iph = data + ETH_HLEN;
	__u16 old_word, new_word;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (nat) {
		iph->check = csum_replace4(iph->check, iph->daddr, rip);
		iph->daddr = rip;
	}
	old_word = *(__u16 *)&iph->ttl;
	iph->ttl--;
	new_word = *(__u16 *)&iph->ttl;
	iph->check = csum_replace2(iph->check, old_word, new_word);
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return 0;
}


#endif
