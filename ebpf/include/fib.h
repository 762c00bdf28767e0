/* The route and neighbour lookup of every forwarding (bpf_fib_lookup), for tc and XDP alike: the
 * helper takes either program's context. The Ethernet rewrite and redirect that follow are
 * per hook: skb.h (tc), xdp.h (XDP). */
#ifndef VPN_DIRECTOR_FIB_H
#define VPN_DIRECTOR_FIB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* A forwarding lookup as the stack's ip_forward would do it, arriving on in_ifindex: route,
 * forwarding enabled on that interface (else BPF_FIB_LKUP_RET_FWD_DISABLED), and a resolved
 * neighbour (else BPF_FIB_LKUP_RET_NO_NEIGH: the slow path's packet makes the kernel resolve it).
 * tot_len is the length of the packet that will leave: the helper compares it with the egress
 * MTU and answers BPF_FIB_LKUP_RET_FRAG_NEEDED above it. Returns BPF_FIB_LKUP_RET_* (>= 0) or a
 * negative errno (e.g. -ENODEV for an unknown in_ifindex). */
static __always_inline long fib_forward(void *ctx, const struct dp_config *cfg, struct bpf_fib_lookup *fib,
					__u32 in_ifindex,
					__be32 src, __be32 dst, __u8 tos, __u8 proto, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = proto;
	fib->tot_len = tot_len;
	fib->ifindex = in_ifindex;
	fib->tos = tos;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	/* Without DP_F_FIB_RULES the lookup goes to the main table (or the input interface's VRF)
	 * directly: the daemon's own fwmark rules for the slow path split the local and main tables
	 * and put a rule walk before every full lookup (about 150-280 ns per packet measured in DR). */
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), cfg->flags & DP_F_FIB_RULES ? 0 : BPF_FIB_LOOKUP_DIRECT);
}

/* Count a failed lookup and say why in the stats. */
static __always_inline void count_fib_failure(struct dp_stats *st, long rc)
{
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		st->mtu_pass++;
	else
		st->fib_miss++;
}

#endif
