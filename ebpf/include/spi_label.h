/* spi_label.h: which real server chose an SPI, read from its label bits (mirrors director/spi_label.py).
 *
 * strongSwan servers stamp a per-server label into every IKE SPI they choose (charon.spi_mask /
 * spi_label, on the SPI as it is on the wire, most significant byte first) and draw their inbound
 * ESP SPIs from a per-server range (spi_min / spi_max). docs/scale-out.md has the measurements.
 * The server's IKE SPI is the responder SPI when the client started the IKE SA and the initiator
 * SPI when the server did (a server-started rekey): IKEv2's I flag says which; IKEv1 has no such
 * flag, so both fields are read and a disagreement answers "none". SPIs are host-order numbers
 * here (bpf_be64_to_cpu / bpf_ntohl of the packet's fields). The fast path (fastpath.h: fp_label)
 * decodes the ESP SPI of a `clients` miss with spi_label_esp(); the maps it uses are below.
 */
#ifndef VPN_DIRECTOR_SPI_LABEL_H
#define VPN_DIRECTOR_SPI_LABEL_H

#include <linux/types.h>

#define SPI_LABEL_SLOTS 16 /* real servers per service that can carry a label */
#define SPI_LABEL_NONE 0xffff /* no label, or no server owns it */
#define SPI_LABEL_IKE_F_INITIATOR 0x08 /* IKEv2 header flag: sent by the SA's original initiator */

/* One service's labels; slot i is real server rs[i]. Validated in user space (SpiLabels.build):
 * mask contiguous and non-zero, labels inside it and unique, ESP ranges in 256..2^32-1 and
 * disjoint. esp_max[i] == 0: slot i has no ESP range. */
struct spi_label_cfg {
	__u64 mask; /* 0: labels off for the service */
	__u64 label[SPI_LABEL_SLOTS]; /* positioned as in strongswan.conf's spi_label */
	__u32 esp_min[SPI_LABEL_SLOTS];
	__u32 esp_max[SPI_LABEL_SLOTS];
	__u16 rs[SPI_LABEL_SLOTS];
	__u16 n; /* slots in use */
	__u8 pad[6];
};

static __always_inline __u16 spi_label_of(const struct spi_label_cfg *c, __u64 spi)
{
	__u64 v;
	int i;

	if (!spi || !c->mask)
		return SPI_LABEL_NONE;
	v = spi & c->mask;
	/* constant bound for the verifier; n <= SPI_LABEL_SLOTS */
	for (i = 0; i < SPI_LABEL_SLOTS; i++) {
		if (i >= c->n)
			break;
		if (c->label[i] == v)
			return c->rs[i];
	}
	return SPI_LABEL_NONE;
}

/* major: the IKE major version (2 or 1, the header's version byte >> 4); flags: its flags byte */
static __always_inline __u16 spi_label_ike(const struct spi_label_cfg *c, __u64 spi_i, __u64 spi_r,
					   __u8 major, __u8 flags)
{
	__u16 by_i, by_r;

	if (major == 2)
		return spi_label_of(c, (flags & SPI_LABEL_IKE_F_INITIATOR) ? spi_r : spi_i);
	by_r = spi_label_of(c, spi_r);
	by_i = spi_label_of(c, spi_i);
	if (by_r == SPI_LABEL_NONE)
		return by_i;
	if (by_i == SPI_LABEL_NONE || by_i == by_r)
		return by_r;
	return SPI_LABEL_NONE; /* both carry different labels: one is a chance match */
}

static __always_inline __u16 spi_label_esp(const struct spi_label_cfg *c, __u32 spi)
{
	int i;

	for (i = 0; i < SPI_LABEL_SLOTS; i++) {
		if (i >= c->n)
			break;
		if (c->esp_max[i] && spi >= c->esp_min[i] && spi <= c->esp_max[i])
			return c->rs[i];
	}
	return SPI_LABEL_NONE;
}

/* -- the fast path's label maps (maps.h: spi_labels, label_seen, label_stats; docs/fastpath.md) -- */

/* label_seen values: a labelled ESP or ESP-in-UDP packet forwarded in the kernel for a client key
 * with no `clients` entry; the daemon drains the map each tick and creates the ESTABLISHED entry
 * through the decision core. Written once per key (BPF_NOEXIST) until the daemon deletes it. */
struct label_seen_val {
	__u32 spi;   /* the ESP SPI, host order */
	__u16 rs;    /* the real server its label named */
	__u16 pad;
	__u64 first; /* bpf_ktime_get_ns() of the packet that made the record */
};

/* label_stats (per CPU): what label decoding did on `clients` misses. */
struct label_stats {
	__u64 forwarded; /* labelled packets forwarded in the kernel (also in fwd_packets[kind]) */
	__u64 unknown;   /* misses of a labelled service whose SPI named no real server: passed */
	__u64 recorded;  /* records written to label_seen (one per new client key until drained) */
};

_Static_assert(sizeof(struct spi_label_cfg) == 304, "spi_label_cfg");
_Static_assert(sizeof(struct label_seen_val) == 16, "label_seen_val");
_Static_assert(sizeof(struct label_stats) == 24, "label_stats");

#endif /* VPN_DIRECTOR_SPI_LABEL_H */
