// SPDX-License-Identifier: GPL-2.0
/* director_xdp: the fast path for established clients at XDP (native) on the client-facing
 * interface, the alternative to director_tc selected by daemon.fastpath_hook = "xdp"
 * (docs/fastpath.md, "The XDP hook").
 *
 * The same decision as director_tc (include/fastpath.h): the same classification, map lookups,
 * last_seen refresh, counters, passes (XDP_PASS where tc says TC_ACT_OK) and drops (XDP_DROP where
 * tc says TC_ACT_SHOT). Only the rewrites differ, done on packet memory (include/xdp.h), and the
 * redirect, which goes through the xdp_tx_ports DEVMAP: only to an interface the loader checked
 * can transmit XDP frames; a route to any other passes to the stack (fib_miss), never into a
 * silent drop.
 *
 * One more pass than tc: ESP-in-UDP whose UDP checksum is still the partial one of a local sender
 * (include/xdp.h: xdp_udp_csum_partial), which XDP cannot finish and tc's skb carries along.
 *
 * The fib lookups' input interface is the configured client_ifindex only: XDP's BPF_PROG_TEST_RUN
 * reports the loopback device as ingress, and the loader writes the config before it attaches.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drop_reasons.h"
#include "structs.h"
#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "fib.h"
#include "fastpath.h"
#include "fastpath6.h"
#include "xdp.h"

SEC("xdp")
int director_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct fp f;
	int v, rc;

	v = fp_decide_any(ctx, data, data_end, (__u32)(data_end - data), 0, &f);
	if (v == FP_PASS)
		return XDP_PASS;
	if (v == FP_DROP)
		return XDP_DROP;
	if (f.kind == KIND_ESP_IN_UDP &&
	    (f.v6 ? xdp_udp_csum_partial6(data, data_end, &f.p) : xdp_udp_csum_partial(data, data_end, &f.p))) {
		fp_pass(f.st, f.kind);
		return XDP_PASS;
	}
	/* The redirect is set up first: its lookup of the egress in xdp_tx_ports is the only one, and
	 * an egress missing there gives XDP_PASS (the flags' fallback) before the frame changed. The
	 * redirect takes effect only if the program returns XDP_REDIRECT. */
	if (bpf_redirect_map(&xdp_tx_ports, f.fib.ifindex, XDP_PASS) != XDP_REDIRECT) {
		f.st->fib_miss++; /* the slow path forwards it, the route is the kernel's */
		fp_pass(f.st, f.kind);
		return XDP_PASS;
	}
	if (v == FP_TUN) {
		rc = xdp_encap_tun(ctx, &f.outer, &f.fib);
		if (rc > 0) {
			fp_pass(f.st, f.kind);
			return XDP_PASS;
		}
	} else if (f.v6) {
		rc = xdp_rewrite_dr_nat6(ctx, &f.p, &f.rip6, v == FP_NAT, &f.fib);
	} else {
		rc = xdp_rewrite_dr_nat(ctx, &f.p, f.rip, v == FP_NAT, &f.fib);
	}
	if (rc) {
		fp_internal_drop(&f);
		return XDP_DROP;
	}
	fp_forwarded(&f);
	return XDP_REDIRECT;
}

char LICENSE[] SEC("license") = "GPL";
