// SPDX-License-Identifier: MIT
/* pktgen: send COUNT copies of one Ethernet frame out of one interface, fast, then say how it went.
 *
 *     pktgen IFACE HEXFRAME COUNT [--rate PPS] [--batch N] [--seconds S] [--seq] [--seq-offset OFF]
 *            [--src-bits N]
 *
 * The benchmark's traffic source (bench/bench_dataplane.py), run inside a lab namespace and pinned
 * to one core with taskset. The kernel has no pktgen module and trafgen stalls under sustained
 * forwarding load ("Flushing TX_RING failed" on the machines this was written on), so this is a
 * small AF_PACKET sender:
 *
 *   - AF_PACKET SOCK_RAW with protocol 0: the frame goes out as given (we build the Ethernet header)
 *     and the socket receives nothing, so it costs nothing on the receive side.
 *   - PACKET_QDISC_BYPASS: dev_direct_xmit() straight into the driver (veth), no qdisc lock.
 *   - SO_SNDBUFFORCE: a socket send buffer larger than wmem_max, which root may set even inside a
 *     namespace (SO_SNDBUF is capped by the init namespace's wmem_max).
 *   - sendmmsg(): up to --batch frames per system call.
 *
 * --seq writes a 32-bit big-endian counter (1, 2, 3, ...) into the last 4 bytes of every frame;
 * --seq-offset OFF writes it at byte OFF instead (e.g. into an IKE initiator SPI: one new ISAKMP
 * conversation per packet). Callers zero the UDP checksum of such frames (RFC 768: no checksum).
 * --src-bits N (1..24) spoofs the IPv4 source per packet, for floods from many addresses: the low N
 * bits of the frame's source address become the counter modulo 2^N (the frame's own source gives
 * the network, e.g. 100.64.0.0 with N = 22 walks 100.64.0.0/10), and the IPv4 header checksum is
 * recomputed for every frame. It needs an untagged IPv4 frame (EtherType 0x0800 at byte 12) and
 * can be combined with --seq-offset (the same counter, e.g. a new IKE SPI and a new source).
 * --rate paces whole batches against the clock (absolute sleeps, so pacing errors do not add up);
 * without it the sender goes as fast as the core allows.
 *
 * Bounded: it stops after COUNT frames, after --seconds, and never later than MAX_SECONDS, and on
 * SIGINT/SIGTERM. Output, always one JSON line on stdout:
 *     {"sent": N, "seconds": T, "pps": N/T, "errors": E, "batch": B, "rate": R}
 * ("errors": sendmmsg calls that failed, e.g. ENOBUFS; the frames of a failed call are not sent).
 * Exit 0 when it ran, 1 when the socket could not be set up, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 9216     /* a jumbo frame; ours are ~100 bytes */
#define MIN_FRAME 14       /* an Ethernet header */
#define MAX_BATCH 1024
#define MAX_SECONDS 30.0   /* the hard cap, whatever COUNT and --seconds say */
#define SNDBUF (4 << 20)   /* 4 MiB: tens of thousands of small frames in flight */

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Sleep until absolute monotonic time t (seconds); returns early on a signal. */
static void sleep_until(double t)
{
	struct timespec ts = { .tv_sec = (time_t)t, .tv_nsec = (long)((t - (time_t)t) * 1e9) };

	clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decode hex into out (at most max bytes); returns the length, or -1 when it is not even-length
 * hex or is too long. */
static long unhex(const char *s, unsigned char *out, size_t max)
{
	size_t n = strlen(s);

	if (n % 2 || n / 2 > max)
		return -1;
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (unsigned char)(hi << 4 | lo);
	}
	return (long)(n / 2);
}

/* strtod/strtoull that reject trailing junk and negative numbers. */
static int parse_num(const char *s, double *out)
{
	char *end;

	errno = 0;
	*out = strtod(s, &end);
	return errno || end == s || *end || *out < 0 ? -1 : 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: pktgen IFACE HEXFRAME COUNT [--rate PPS] [--batch N] [--seconds S]\n"
		"              [--seq] [--seq-offset OFF] [--src-bits N]\n"
		"  sends COUNT copies of the Ethernet frame HEXFRAME out of IFACE (AF_PACKET, sendmmsg,\n"
		"  PACKET_QDISC_BYPASS); stops after COUNT frames, S seconds or %.0f s, whichever is first;\n"
		"  prints {\"sent\", \"seconds\", \"pps\", \"errors\", \"batch\", \"rate\"} as one JSON line.\n",
		MAX_SECONDS);
}

static void put_be32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static uint32_t get_be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

#define ETH_LEN 14
#define IP_SRC (ETH_LEN + 12)
#define IP_CSUM (ETH_LEN + 10)

/* The IPv4 header checksum (RFC 791) of the header at ip, its own field taken as zero. */
static void ip_checksum(unsigned char *ip)
{
	unsigned int ihl = (ip[0] & 0x0f) * 4u;
	uint32_t sum = 0;

	ip[10] = ip[11] = 0;
	for (unsigned int i = 0; i + 1 < ihl; i += 2)
		sum += (uint32_t)ip[i] << 8 | ip[i + 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	ip[10] = (unsigned char)(~sum >> 8);
	ip[11] = (unsigned char)~sum;
}

int main(int argc, char **argv)
{
	static unsigned char frame[MAX_FRAME];
	static unsigned char bufs[MAX_BATCH][MAX_FRAME];
	static struct mmsghdr msgs[MAX_BATCH];
	static struct iovec iovs[MAX_BATCH];
	double rate = 0, seconds = MAX_SECONDS, count_d, v;
	long batch = 64, seq_off = -1, len, src_bits = 0;
	int seq = 0;

	if (argc < 4) {
		usage();
		return 2;
	}
	const char *ifname = argv[1];
	len = unhex(argv[2], frame, sizeof(frame));
	if (len < MIN_FRAME) {
		fprintf(stderr, "pktgen: HEXFRAME must be even-length hex, %d..%d bytes\n", MIN_FRAME, MAX_FRAME);
		return 2;
	}
	if (parse_num(argv[3], &count_d) || count_d < 1) {
		fprintf(stderr, "pktgen: COUNT must be a positive number\n");
		return 2;
	}
	uint64_t count = (uint64_t)count_d;

	for (int i = 4; i < argc; i++) {
		const char *opt = argv[i];

		if (!strcmp(opt, "--seq")) {
			seq = 1;
			continue;
		}
		if (i + 1 >= argc || parse_num(argv[i + 1], &v)) {
			fprintf(stderr, "pktgen: %s needs a non-negative number\n", opt);
			return 2;
		}
		i++;
		if (!strcmp(opt, "--rate")) {
			rate = v; /* 0 = as fast as possible */
		} else if (!strcmp(opt, "--batch")) {
			batch = (long)v;
		} else if (!strcmp(opt, "--seconds")) {
			seconds = v;
		} else if (!strcmp(opt, "--seq-offset")) {
			seq = 1;
			seq_off = (long)v;
		} else if (!strcmp(opt, "--src-bits")) {
			src_bits = (long)v;
		} else {
			usage();
			return 2;
		}
	}
	if (batch < 1 || batch > MAX_BATCH) {
		fprintf(stderr, "pktgen: --batch must be 1..%d\n", MAX_BATCH);
		return 2;
	}
	if (seconds <= 0 || seconds > MAX_SECONDS)
		seconds = MAX_SECONDS;
	if (seq && seq_off < 0)
		seq_off = len - 4; /* the last 4 bytes */
	if (seq && seq_off + 4 > len) {
		fprintf(stderr, "pktgen: --seq-offset %ld leaves no room for 4 bytes in a %ld-byte frame\n",
			seq_off, len);
		return 2;
	}

	if (src_bits && (src_bits < 1 || src_bits > 24)) {
		fprintf(stderr, "pktgen: --src-bits must be 1..24\n");
		return 2;
	}
	if (src_bits && (len < ETH_LEN + 20 || frame[12] != 0x08 || frame[13] != 0x00 ||
			 (frame[ETH_LEN] >> 4) != 4 || (frame[ETH_LEN] & 0x0f) < 5 ||
			 len < ETH_LEN + (frame[ETH_LEN] & 0x0f) * 4)) {
		fprintf(stderr, "pktgen: --src-bits needs an untagged IPv4 frame\n");
		return 2;
	}
	if (src_bits && seq && seq_off < IP_SRC + 4 && seq_off + 4 > IP_CSUM) {
		fprintf(stderr, "pktgen: --seq-offset overlaps the IPv4 checksum or source (--src-bits)\n");
		return 2;
	}
	uint32_t src_mask = src_bits ? (1u << src_bits) - 1 : 0;
	uint32_t src_net = get_be32(frame + IP_SRC) & ~src_mask;

	unsigned int ifindex = if_nametoindex(ifname);
	if (!ifindex) {
		fprintf(stderr, "pktgen: no interface %s: %s\n", ifname, strerror(errno));
		return 1;
	}
	/* Protocol 0: a send-only packet socket (nothing is delivered to it). */
	int fd = socket(AF_PACKET, SOCK_RAW, 0);
	if (fd < 0) {
		perror("pktgen: socket(AF_PACKET)");
		return 1;
	}
	int one = 1, sndbuf = SNDBUF;
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
		perror("pktgen: PACKET_QDISC_BYPASS (going on through the qdisc)");
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
		perror("pktgen: SO_SNDBUFFORCE (going on with the default buffer)");
	struct sockaddr_ll sll = {
		.sll_family = AF_PACKET,
		.sll_ifindex = (int)ifindex,
		.sll_protocol = 0,
	};
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
		perror("pktgen: bind");
		return 1;
	}

	for (long i = 0; i < batch; i++) {
		memcpy(bufs[i], frame, (size_t)len);
		iovs[i].iov_base = bufs[i];
		iovs[i].iov_len = (size_t)len;
		msgs[i].msg_hdr.msg_iov = &iovs[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}

	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	prctl(PR_SET_TIMERSLACK, 1UL); /* wake from paced sleeps within ~1 us, not the default 50 */

	uint64_t sent = 0, errors = 0;
	double t0 = now(), deadline = t0 + seconds, t = t0;

	while (sent < count && !stop) {
		unsigned int n = (unsigned int)(count - sent < (uint64_t)batch ? count - sent : (uint64_t)batch);

		if (rate > 0) {
			/* Batch k leaves no earlier than t0 + (frames before it) / rate. */
			double due = t0 + (double)sent / rate;

			if (due > deadline)
				break;
			if (due > t)
				sleep_until(due);
		}
		if (seq)
			for (unsigned int i = 0; i < n; i++)
				put_be32(bufs[i] + seq_off, (uint32_t)(sent + i + 1));
		if (src_bits)
			for (unsigned int i = 0; i < n; i++) {
				put_be32(bufs[i] + IP_SRC, src_net | ((uint32_t)(sent + i + 1) & src_mask));
				ip_checksum(bufs[i] + ETH_LEN);
			}
		int r = sendmmsg(fd, msgs, n, 0);
		if (r < 0) {
			if (errno != EINTR)
				errors++;
			if (errno == ENOBUFS || errno == EAGAIN)
				sched_yield(); /* let the stack drain; the batch is retried */
			else if (errno != EINTR) {
				perror("pktgen: sendmmsg");
				break;
			}
		} else {
			sent += (uint64_t)r; /* a short count: the rest is retried next round */
		}
		t = now();
		if (t >= deadline)
			break;
	}
	double elapsed = now() - t0;

	printf("{\"sent\": %llu, \"seconds\": %.6f, \"pps\": %.1f, \"errors\": %llu, \"batch\": %ld, "
	       "\"rate\": %.1f}\n",
	       (unsigned long long)sent, elapsed, elapsed > 0 ? sent / elapsed : 0.0,
	       (unsigned long long)errors, batch, rate);
	close(fd);
	return 0;
}
