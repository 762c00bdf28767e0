/* Map keys and values of the fast path (docs/fastpath.md), mirrored by director/dataplane/bpf_structs.py.
 *
 * Explicit padding everywhere: hash keys are compared bytewise, so an implicit hole would make two
 * equal keys differ; and the Python mirrors use standard sizes without alignment, so every byte
 * must be a named field. tests/bpf/test_struct_layout.py checks both sides against this object's BTF.
 * Byte order: addresses in network order (as in the packet), ports and ids in host order.
 */
#ifndef VPN_DIRECTOR_STRUCTS_H
#define VPN_DIRECTOR_STRUCTS_H

#include <linux/types.h>

#define VIP_F_AH 0x01 /* vip_val.flags: AH is accepted for this service */
#define DP_F_FIB_RULES 0x01 /* dp_config.flags: route lookups follow the ip rules (else the main table directly) */

/* server_val.method: director.service.Method */
enum method {
	METHOD_DR = 0,
	METHOD_TUN = 1,
	METHOD_NAT = 2,
};

/* director.packet.Kind: indexes of the per-kind counters */
enum kind {
	KIND_NOT_OURS = 0,
	KIND_IKE_INITIAL = 1,
	KIND_IKE = 2,
	KIND_NATT_KEEPALIVE = 3,
	KIND_ESP = 4,
	KIND_AH = 5,
	KIND_ESP_IN_UDP = 6,
	KIND_FRAGMENT = 7,
};
#define N_KINDS 8
#define N_DROP_REASONS 128 /* drops[] by enum drop_reason (codes up to 127) */

struct vip_val {
	__u16 svc;   /* service id */
	__u8 flags;  /* VIP_F_AH */
	__u8 pad;
};

struct client_key {
	__u32 vip;    /* network order */
	__u32 client; /* network order */
	__u16 port;   /* the client's UDP source port for ESP-in-UDP (host order); 0 for raw ESP and AH */
	__u16 pad;    /* always 0 */
};

struct client_val {
	__u16 rs; /* real server id: index of `servers` */
	__u16 pad0;
	__u32 pad1;
	__u64 last_seen; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, the clock of Python's time.monotonic() */
};

/* servers is an array indexed by real server id (0..65534, director.reconcile's ids): an inlined
 * lookup, not a hash. An unused slot is all zero (addr 0: no server). */
#define SERVER_IDS 65536
#define RS_STATS_SLOTS 4096 /* real servers with kernel counters at once (as many as the daemon may run) */

/* A real server and, when the daemon has resolved it (nh_ok, daemon.fastpath_fib = "cached"), its
 * next hop: the egress interface, its MTU and both MAC addresses, so that forwarding needs no route
 * or neighbour lookup per packet (docs/fastpath.md, "Next hops"). Without nh_ok the programs do the
 * full lookup (bpf_fib_lookup). The hot fields share the value's first cache line. */
struct server_val {
	__u32 addr;        /* the real server's address, network order */
	__u8 method;       /* enum method */
	__u8 nh_ok;        /* 1: the next hop below is valid */
	__u16 nh_mtu;      /* the egress interface's MTU (or the route's, if lower) */
	__u32 nh_ifindex;  /* egress interface */
	__u8 nh_dmac[6];   /* the next hop's MAC (the real server's, or its gateway's) */
	__u8 nh_smac[6];   /* the egress interface's MAC */
	__u16 slot;        /* its counters: index of rs_stats (0 .. RS_STATS_SLOTS - 1) */
	__u16 pad;
};

/* -- IPv6 (docs/ipv6.md): its own maps beside the IPv4 ones; servers and rs_stats are shared -- */

struct addr6 {
	__be32 w[4]; /* an IPv6 address, network order */
};

struct client6_key {
	struct addr6 vip;
	struct addr6 client;
	__u16 port; /* as client_key.port */
	__u16 pad;  /* always 0 */
};

/* servers6 is an array indexed by real server id, as servers: an IPv6 real server's address
 * (all zero: none). Its method, next hop and counter slot are in its servers entry. */
struct server6_val {
	struct addr6 addr;
};

struct dp_config {
	__u32 lan_addr;       /* network order: TUN outer source */
	__u32 lan_ifindex;    /* real-server-facing interface (the reply program's fib lookups) */
	__u32 lan_mtu;        /* TUN: an envelope above this goes to the slow path (which fragments) */
	__u32 client_ifindex; /* client-facing interface (the tc program's fib lookups) */
	__u32 flags;          /* DP_F_FIB_RULES */
};

struct dp_stats {
	__u64 fwd_packets[N_KINDS]; /* by kind, forwarded in the kernel */
	__u64 fwd_bytes[N_KINDS];   /* IP total length, as the slow path counts */
	__u64 pass_packets[N_KINDS]; /* by kind, packets to a VIP handed to the stack */
	__u64 miss;      /* ESP/AH/ESP-in-UDP with no client (or no server) in the maps */
	__u64 fragments; /* fragments to a VIP, passed untouched */
	__u64 not_ours;  /* not IPv4, not to a VIP, or to a VIP but no IPsec: passed untouched */
	__u64 fib_miss;  /* no route/neighbour for the real server (or client) yet: passed */
	__u64 mtu_pass;  /* TUN envelope above lan_mtu, or above the egress MTU: passed */
	__u64 ttl_pass;  /* TTL <= 1 where we would decrement it: passed (the stack answers) */
	__u64 replies;   /* NAT replies rewritten by the reply program */
	__u64 drops[N_DROP_REASONS]; /* by enum drop_reason: malformed packets to a VIP */
};

/* Admission of initial IKE packets to the slow path, before the queue (docs/fastpath.md): the
 * daemon's daemon.new_entries_rate and new_entries_per_source, enforced here so a flood's excess
 * costs no queue slot and no Python. The global limit counts in short fixed windows (the daemon
 * picks window_ns so that per_window is at least 8: 1 ms at 20,000/s), so what it admits reaches
 * the queue and the real servers as an even stream, not as one burst per window. The daemon writes
 * per_window, per_source and window_ns (0 = no limit); window and count are the current global
 * window's state, kept by the programs. */
struct admit {
	__u32 per_window; /* initial IKE packets per window, all sources together */
	__u32 per_source; /* per source address and second */
	__u64 window_ns;  /* the global window's length */
	__u64 window;     /* bpf_ktime_get_ns() / window_ns of the current global window */
	__u64 count;      /* initial IKE packets seen in it (atomic adds) */
};

/* admit_src values: one source's current window (bpf_ktime_get_ns() / ADMIT_SOURCE_WINDOW_NS). */
struct admit_src {
	__u64 window;
	__u64 count;
};

struct rs_stats {
	__u64 packets[N_KINDS];
	__u64 bytes[N_KINDS];
};

_Static_assert(sizeof(struct vip_val) == 4, "vip_val");
_Static_assert(sizeof(struct client_key) == 12, "client_key");
_Static_assert(sizeof(struct client_val) == 16, "client_val");
_Static_assert(sizeof(struct server_val) == 28, "server_val");
_Static_assert(sizeof(struct dp_config) == 20, "dp_config");
_Static_assert(sizeof(struct addr6) == 16, "addr6");
_Static_assert(sizeof(struct client6_key) == 36, "client6_key");
_Static_assert(sizeof(struct server6_val) == 16, "server6_val");
_Static_assert(sizeof(struct dp_stats) == 8 * (3 * N_KINDS + 7 + N_DROP_REASONS), "dp_stats");
_Static_assert(sizeof(struct rs_stats) == 8 * 2 * N_KINDS, "rs_stats");
_Static_assert(sizeof(struct admit) == 32, "admit");
_Static_assert(sizeof(struct admit_src) == 16, "admit_src");

#endif
