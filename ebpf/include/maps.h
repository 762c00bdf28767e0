/* The fast path's maps (docs/fastpath.md), BTF-defined. Every object that includes this creates all
 * of them; the loader pins them by path (bpf_map__set_pin_path) so that the tc program, the reply
 * program and the daemon share one instance of each. Pinning compares max_entries, so `clients`
 * must be sized the same (daemon.capacity) in every object before load. */
#ifndef VPN_DIRECTOR_MAPS_H
#define VPN_DIRECTOR_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "structs.h"
#include "spi_label.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32); /* VIP, network order */
	__type(value, struct vip_val);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sets daemon.capacity before load */
	__type(key, struct client_key);
	__type(value, struct client_val);
} clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SERVER_IDS);
	__type(key, __u32); /* rs_id, host order */
	__type(value, struct server_val); /* all zero: no such server */
} servers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* a NAT real server's address, network order */
	__type(value, __u32); /* its VIP, network order */
} nat_replies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dp_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dp_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RS_STATS_SLOTS);
	__type(key, __u32); /* server_val.slot: the daemon gives each real server its own */
	__type(value, struct rs_stats);
} rs_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct admit);
} admit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* a spoofed flood churns it; the least recently seen go first */
	__type(key, __u32);         /* source address, network order */
	__type(value, struct admit_src);
} admit_src SEC(".maps");

/* -- IPv6 (docs/ipv6.md) -- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct addr6); /* an IPv6 VIP */
	__type(value, struct vip_val);
} vips6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sets daemon.capacity before load, as for clients */
	__type(key, struct client6_key);
	__type(value, struct client_val);
} clients6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SERVER_IDS);
	__type(key, __u32); /* rs_id, host order */
	__type(value, struct server6_val);
} servers6 SEC(".maps");

/* -- SPI labels (docs/fastpath.md, "SPI labels"): decoding on a `clients` miss -- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256); /* as many as vips: one per labelled service */
	__type(key, __u32);       /* service id (vip_val.svc), host order */
	__type(value, struct spi_label_cfg);
} spi_labels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384); /* a spoofed flood churns it; the daemon drains it each tick */
	__type(key, struct client_key);
	__type(value, struct label_seen_val);
} label_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct label_stats);
} label_stats SEC(".maps");

#endif
