// SPDX-License-Identifier: GPL-2.0
/* test_spi_label: runs include/spi_label.h's decoders on SPIs carried in a test frame, for
 * tests/bpf/test_spi_label_bpf.py through BPF_PROG_TEST_RUN; never attached to an interface.
 *
 * Input: 14 bytes of (ignored) Ethernet header, then initiator SPI (8), responder SPI (8),
 * IKE major version (1), flags (1), pad (2), ESP SPI (4), in network order as in packets. The config is
 * entry 0 of spi_label_test_cfg. Returns (IKE result << 16) | ESP result; -1 on a short frame.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "spi_label.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spi_label_cfg);
} spi_label_test_cfg SEC(".maps");

struct spi_label_probe {
	__u8 eth[14];
	__be64 spi_i;
	__be64 spi_r;
	__u8 major;
	__u8 flags;
	__u8 pad[2];
	__be32 esp_spi;
} __attribute__((packed));

SEC("tc")
int spi_label_probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct spi_label_probe *in = data;
	struct spi_label_cfg *c;
	__u32 zero = 0;
	__u16 ike, esp;

	if ((void *)(in + 1) > end)
		return -1;
	c = bpf_map_lookup_elem(&spi_label_test_cfg, &zero);
	if (!c)
		return -1;
	ike = spi_label_ike(c, bpf_be64_to_cpu(in->spi_i), bpf_be64_to_cpu(in->spi_r), in->major, in->flags);
	esp = spi_label_esp(c, bpf_ntohl(in->esp_spi));
	return ((__u32)ike << 16) | esp;
}

char LICENSE[] SEC("license") = "GPL";
