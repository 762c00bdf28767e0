/* Per-source ingress limits of a service, before the queue (docs/fastpath.md, "Ingress limits").
 *
 * ESP (raw and ESP-in-UDP) and AH of a source with no entry in `clients`, and IKE (UDP 500/4500,
 * not ESP), are limited per service (VIP) and per source to a packet rate with a burst; the excess
 * is dropped here, counted as INGRESS_ESP/AH/IKE_LIMITED, and costs no queue slot and no Python. An
 * established client's ESP (a `clients` hit) never gets here.
 *
 * A token bucket per (VIP, source, class), director/ingress.py's arithmetic integer for integer:
 * time in ns, tokens in nano-packets (a packet costs INGRESS_NS), at most burst * INGRESS_NS,
 * refilled by pps per ns elapsed; a new source starts full, one idle for INGRESS_IDLE_NS or more is
 * full again. So a source gets at most burst + pps * t packets through in any t seconds.
 *
 * The buckets are shared by all CPUs (not per-CPU: per-CPU buckets would let a flood spread over n
 * queues through n times the rate). The read-modify-write is not atomic: two CPUs updating one
 * source's bucket in the same instant may both pass a packet the bucket held once; a bound within
 * a packet per CPU, which is all a flood limit needs, at no lock's cost.
 *
 * Memory: ingress_src is an LRU hash of INGRESS_SOURCES entries; a spoofed flood from many
 * addresses evicts the least recently seen, it cannot grow the map.
 */
#ifndef VPN_DIRECTOR_INGRESS_H
#define VPN_DIRECTOR_INGRESS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "drop_reasons.h"

#define INGRESS_NS 1000000000ULL
#define INGRESS_IDLE_NS (10 * INGRESS_NS)
#define INGRESS_SOURCES 65536

/* The classes: director.ingress.ESP, AH, IKE; the drop reason is DROP_INGRESS_ESP_LIMITED + class. */
enum ingress_class {
	ING_ESP = 0, /* ESP and ESP-in-UDP */
	ING_AH = 1,
	ING_IKE = 2,
};

/* ingress_cfg values (key: the VIP, network order), written by the daemon from the service's
 * `ingress` table; 0 = that class unlimited, burst 0 = one second of each rate. */
struct ingress_cfg {
	__u32 esp_pps;
	__u32 ah_pps;
	__u32 ike_pps;
	__u32 burst;
};

struct ingress_key {
	__u32 vip; /* network order */
	__u32 src; /* network order */
	__u8 cls;  /* enum ingress_class */
	__u8 pad[3];
};

struct ingress_tb {
	__u64 tokens;  /* nano-packets */
	__u64 last_ns; /* bpf_ktime_get_ns() of the last refill */
};

_Static_assert(sizeof(struct ingress_cfg) == 16, "ingress_cfg");
_Static_assert(sizeof(struct ingress_key) == 12, "ingress_key");
_Static_assert(sizeof(struct ingress_tb) == 16, "ingress_tb");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256); /* as many as vips */
	__type(key, __u32);
	__type(value, struct ingress_cfg);
} ingress_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, INGRESS_SOURCES);
	__type(key, struct ingress_key);
	__type(value, struct ingress_tb);
} ingress_src SEC(".maps");

/* 0: the packet may go on; else the drop reason of the class's limit. */
static __always_inline int fp_ingress(__u32 vip, __be32 src, int cls)
{
	struct ingress_key k = {.vip = vip, .src = src, .cls = (__u8)cls};
	struct ingress_cfg *c = bpf_map_lookup_elem(&ingress_cfg, &vip);
	struct ingress_tb *b;
	__u64 pps, cap, now, tokens;
	__s64 elapsed;

	if (!c)
		return 0;
	pps = cls == ING_ESP ? c->esp_pps : cls == ING_AH ? c->ah_pps : c->ike_pps;
	if (!pps)
		return 0;
	cap = (__u64)(c->burst ? c->burst : pps) * INGRESS_NS;
	now = bpf_ktime_get_ns();
	b = bpf_map_lookup_elem(&ingress_src, &k);
	if (!b) {
		struct ingress_tb fresh = {.tokens = cap - INGRESS_NS, .last_ns = now};

		bpf_map_update_elem(&ingress_src, &k, &fresh, BPF_ANY);
		return 0;
	}
	elapsed = (__s64)(now - b->last_ns);
	if (elapsed >= (__s64)INGRESS_IDLE_NS) {
		tokens = cap;
	} else {
		tokens = b->tokens;
		if (elapsed > 0) {
			tokens += (__u64)elapsed * pps;
			if (tokens > cap)
				tokens = cap;
		}
	}
	if (elapsed > 0)
		b->last_ns = now;
	if (tokens < INGRESS_NS) {
		b->tokens = tokens;
		return DROP_INGRESS_ESP_LIMITED + cls;
	}
	b->tokens = tokens - INGRESS_NS;
	return 0;
}

#endif
