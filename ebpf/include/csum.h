/* Internet checksums (RFC 1071, RFC 1624) as plain arithmetic: a whole header built on the stack,
 * and the incremental updates that XDP, which has no csum helpers, applies to packet memory.
 *
 * csum_replace4/2 are the kernel's own formulas (include/net/checksum.h: csum_replace4, and
 * csum_replace2 over 16-bit ones' complement words), so a rewrite done here gives the same bytes as
 * bpf_l3_csum_replace/bpf_l4_csum_replace at tc, the 0x0000/0xffff corner included. Values are used
 * as they sit in memory (network order loaded natively): ones' complement sums do not depend on the
 * byte order as long as the result is stored the same way. The skb-based rewrites of the tc
 * programs are in skb.h. */
#ifndef VPN_DIRECTOR_CSUM_H
#define VPN_DIRECTOR_CSUM_H

#include <linux/types.h>

#define CSUM_MANGLED_0 0xffff /* a UDP checksum that computes to 0 is sent as 0xffff (RFC 768) */

/* ~(end-around-carry fold of s): the checksum field for a 32-bit accumulated sum. */
static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* RFC 1071 checksum of a 20-byte IPv4 header (no options) held on the stack, check field 0.
 * Ten 16-bit words, a constant bound the verifier unrolls. */
static __always_inline __u16 ipv4_csum20(const void *h)
{
	const __u16 *w = h;
	__u32 s = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return csum_fold32(s);
}

/* 32-bit ones' complement addition (end-around carry). */
static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

/* 16-bit ones' complement addition (end-around carry). */
static __always_inline __u16 csum_add16(__u16 a, __u16 b)
{
	__u16 r = a + b;

	return r + (r < b);
}

/* The checksum after a 32-bit field changed from `from` to `to` (RFC 1624 eqn. 3):
 * HC' = ~(~HC + ~m + m'), summed in 32 bits and folded. */
static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u32 s = ~(__u32)check;

	s = csum_add32(s, ~from);
	s = csum_add32(s, to);
	return csum_fold32(s);
}

/* The same for a 16-bit field, in 16-bit arithmetic. */
static __always_inline __u16 csum_replace2(__u16 check, __u16 from, __u16 to)
{
	return (__u16)~csum_add16(csum_add16((__u16)~check, (__u16)~from), to);
}

#endif
