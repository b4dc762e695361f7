/*
 * Baseline for bench/fio_qemu.py: the floor of a blocking userspace dirty-log server.
 *
 * A stateless dm-log-userspace responder in C: one blocking recv()/sendto() loop on the
 * netlink connector (index 7, value 1), the same answers as bench/guest/naive_responder.py
 * (every region in sync and clean, MARK/CLEAR/FLUSH accepted and forgotten, GET_SYNC_COUNT
 * the region count taken from the CTR).  It keeps no dirty log at all, so it is only
 * harmless on a nosync mirror that is never recovered; it exists to show, in the same QEMU
 * boot, what the kernel's round trips cost a process that does nothing else.
 *
 * Built by bench/fio_qemu.py on the host, statically (the guest has no compiler):
 *     cc -O2 -static -o c_responder c_responder.c
 * Usage: c_responder [--unix PATH] [POLL_US]   prints "c responder ready" and serves until
 * killed; with POLL_US > 0 it polls the socket (non-blocking recv) for up to POLL_US after
 * each reply before it blocks again.  --unix serves the same datagrams over a Unix datagram
 * socket bound at PATH instead (ulogd's test transport; the smoke test and
 * bench/transport_latency.py use it), replying to each sender.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/connector.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DM_IDX 7
#define DM_VAL 1
#define MAX_LOGS 64

enum {
	T_CTR = 1, T_GET_REGION_SIZE = 6, T_IS_CLEAN = 7, T_IN_SYNC = 8,
	T_GET_RESYNC_WORK = 12, T_GET_SYNC_COUNT = 14, T_STATUS_INFO = 15,
	T_STATUS_TABLE = 16, T_IS_REMOTE_RECOVERING = 17,
};

/* The request as dm-log-userspace lays it out (160 bytes before the payload). */
struct request {
	uint64_t luid;
	char uuid[129];
	char pad[3];
	uint32_t version;
	int32_t error;
	uint32_t seq;
	uint32_t type;
	uint32_t data_size;
	char data[];
} __attribute__((packed));

struct geometry {
	uint64_t luid;
	uint64_t region_size;
	uint64_t regions;
};

static struct geometry logs[MAX_LOGS];
static int nlogs;

static struct geometry *find(uint64_t luid)
{
	for (int i = 0; i < nlogs; i++)
		if (logs[i].luid == luid)
			return &logs[i];
	return NULL;
}

/* CTR's arguments: "<target sectors> [integrated_flush] <type> [<log device>] <region> ..."
 * The region size is the first all-digit word after the first two. */
static void remember(uint64_t luid, const char *args, uint32_t len)
{
	char text[256];
	unsigned long long target = 0, region = 0;
	struct geometry *g = find(luid);
	char *save = NULL, *word;
	int index = 0;

	if (len >= sizeof(text))
		len = sizeof(text) - 1;
	memcpy(text, args, len);
	text[len] = 0;
	for (word = strtok_r(text, " ", &save); word; word = strtok_r(NULL, " ", &save), index++) {
		if (index == 0)
			target = strtoull(word, NULL, 10);
		else if (index >= 2 && strspn(word, "0123456789") == strlen(word)) {
			region = strtoull(word, NULL, 10);
			break;
		}
	}
	if (region == 0)
		return;
	if (!g) {
		if (nlogs == MAX_LOGS)
			return;
		g = &logs[nlogs++];
	}
	g->luid = luid;
	g->region_size = region;
	g->regions = (target + region - 1) / region;
}

static uint64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static int open_connector(void)
{
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_groups = 1u << (DM_IDX - 1) };
	int group = DM_IDX;
	int fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);

	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) < 0) {
		perror("c_responder: netlink connector");
		exit(1);
	}
	return fd;
}

static int open_unix(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_DGRAM, 0);

	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "c_responder: path too long: %s\n", path);
		exit(2);
	}
	strcpy(addr.sun_path, path);
	unlink(path);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("c_responder: unix socket");
		exit(1);
	}
	return fd;
}

int main(int argc, char **argv)
{
	static char in[65536], out[4096];
	struct sockaddr_storage peer;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	int unix_mode = argc > 2 && strcmp(argv[1], "--unix") == 0;
	int fd = unix_mode ? open_unix(argv[2]) : open_connector();
	int arg = unix_mode ? 3 : 1;
	uint64_t poll_ns = argc > arg ? strtoull(argv[arg], NULL, 10) * 1000 : 0;

	printf("c responder ready\n");
	fflush(stdout);
	int flags = 0; /* MSG_DONTWAIT while polling after a reply */
	uint64_t until = 0;

	for (;;) {
		socklen_t peer_len = sizeof(peer);
		ssize_t n = recvfrom(fd, in, sizeof(in), flags, (struct sockaddr *)&peer, &peer_len);

		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (monotonic_ns() >= until)
					flags = 0;
				continue;
			}
			if (errno == EINTR || errno == ENOBUFS)
				continue;
			perror("c_responder: recv");
			return 1;
		}
		size_t head = NLMSG_HDRLEN + sizeof(struct cn_msg);
		if ((size_t)n < head + sizeof(struct request))
			continue;
		struct cn_msg *cn = (struct cn_msg *)(in + NLMSG_HDRLEN);
		struct request *rq = (struct request *)(in + head);
		uint32_t type = rq->type & 0xff;
		struct geometry *g = find(rq->luid);
		uint64_t regions = g ? g->regions : 0;
		int64_t one = 1;
		uint64_t u[2] = { 0, 0 };
		const void *payload = NULL;
		uint32_t size = 0;

		switch (type) {
		case T_CTR:
			remember(rq->luid, rq->data, rq->data_size);
			break;
		case T_GET_REGION_SIZE:
			u[0] = g ? g->region_size : 1024;
			payload = u, size = 8;
			break;
		case T_IS_CLEAN:
		case T_IN_SYNC:
			payload = &one, size = 8;
			break;
		case T_GET_RESYNC_WORK:
			payload = u, size = 16;
			break;
		case T_GET_SYNC_COUNT:
			u[0] = regions;
			payload = u, size = 8;
			break;
		case T_STATUS_INFO:
		case T_STATUS_TABLE:
			payload = "1 clustered-core", size = 17;
			break;
		case T_IS_REMOTE_RECOVERING:
			u[1] = regions;
			payload = u, size = 16;
			break;
		}
		struct nlmsghdr *nh = (struct nlmsghdr *)out;
		struct cn_msg *rcn = (struct cn_msg *)(out + NLMSG_HDRLEN);
		struct request *rp = (struct request *)(out + head);
		size_t total = head + sizeof(struct request) + size;

		memset(nh, 0, NLMSG_HDRLEN);
		nh->nlmsg_len = total;
		nh->nlmsg_type = NLMSG_DONE;
		*rcn = *cn;
		rcn->len = sizeof(struct request) + size;
		memcpy(rp, rq, sizeof(struct request));
		rp->error = 0;
		rp->data_size = size;
		if (size)
			memcpy(rp->data, payload, size);
		if (unix_mode ? sendto(fd, out, total, 0, (struct sockaddr *)&peer, peer_len) < 0
			      : sendto(fd, out, total, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
			perror("c_responder: sendto");
		if (poll_ns) {
			until = monotonic_ns() + poll_ns;
			flags = MSG_DONTWAIT;
		}
	}
}
