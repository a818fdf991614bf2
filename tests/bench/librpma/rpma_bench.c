// SPDX-License-Identifier: Apache-2.0
/*
 * rpma_bench.c -- the librpma anchor of `make bench` (tests/bench/versus.py): the same durable-write
 * workloads as rdax, through librpma 1.3 (Debian 13 librpma-dev), over RDMA CM.
 *
 * Built in the lab at bench time, never committed as a binary:
 *     gcc -O2 -Wall -o /tmp/rpma_bench tests/bench/librpma/rpma_bench.c -lrpma -libverbs
 *
 * server ADDR PORT PATH SIZE [FIEMAP_SYNC_SECONDS]
 *     maps PATH (a file on the DAX mount, created and sized to SIZE) with MAP_SHARED_VALIDATE | MAP_SYNC,
 *     registers it for RDMA WRITE and FLUSH (librpma falls back to an On-Demand-Paging registration when
 *     the pinned one fails with EOPNOTSUPP, as it does on fsdax), declares direct_write_to_pmem, and
 *     accepts connections one after another; the memory region's and the peer configuration's
 *     descriptors travel in the connection's private data. Prints one JSON line once listening.
 *     Stops on SIGTERM / SIGINT.
 *     With FIEMAP_SYNC_SECONDS > 0 (a diagnostic, not librpma's own behaviour), a thread calls
 *     ioctl(FS_IOC_FIEMAP, FIEMAP_FLAG_SYNC) over the whole file that often, as rdax-server's seal audit
 *     does (service/node.py audit, every 5 s): on a DAX file the sync writes back the dirty entries, which
 *     write-protects the mapping's pages and so invalidates the On-Demand-Paging memory region's pages.
 *
 * client ADDR PORT
 *     connects, then reads one command per stdin line and answers one JSON line on stdout:
 *         run SIZE DEPTH COUNT
 *             COUNT writes of SIZE bytes, sequential from offset 0 of the remote region (wrapping).
 *             DEPTH 1: one at a time, each RDMA WRITE followed by a FLUSH(persistent) of its range and one
 *             completion wait (the FLUSH is the only signalled request); every write+flush is timed.
 *             DEPTH > 1: up to DEPTH writes in flight (one in min(16, DEPTH/2) signalled), then one
 *             FLUSH(persistent) of the whole range written and one wait.
 *         quit
 *     Busy-polls the completion queue (no completion channel wait), like rdax's Connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <infiniband/verbs.h>
#include <inttypes.h>
#include <librpma.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif

#define DESC_MAX 64
#define MAX_DEPTH 64
#define LOCAL_BUF (4u << 20) /* the client's source buffer: writes cycle through it */
#define FLUSH_ID (UINT64_MAX - 1) /* never a write's wr_id (those count from 1) */

struct pdata {
	uint8_t mr_desc_size;
	uint8_t pcfg_desc_size;
	char desc[DESC_MAX];
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void die(const char *what, int ret)
{
	/* one JSON line, so the driver reads the reason */
	printf("{\"ok\": false, \"error\": \"%s failed: %d (%s)\"}\n", what, ret,
	       ret == RPMA_E_PROVIDER ? strerror(errno) : "librpma error code");
	fflush(stdout);
	exit(1);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------------- */
struct fiemap_sync {
	int fd;
	size_t size;
	double every_s;
	unsigned long calls;
};

static void *fiemap_sync_thread(void *arg)
{
	struct fiemap_sync *fs = arg;
	struct fiemap fm;
	while (!stop) {
		struct timespec ts = {(time_t)fs->every_s, (long)((fs->every_s - (double)(time_t)fs->every_s) * 1e9)};
		nanosleep(&ts, NULL);
		memset(&fm, 0, sizeof(fm));
		fm.fm_start = 0;
		fm.fm_length = fs->size;
		fm.fm_flags = FIEMAP_FLAG_SYNC;
		fm.fm_extent_count = 0; /* count only: the sync is what this is for */
		if (ioctl(fs->fd, FS_IOC_FIEMAP, &fm) != 0)
			fprintf(stderr, "rpma_bench server: FIEMAP: %s\n", strerror(errno));
		fs->calls++;
	}
	return NULL;
}

static int server(const char *addr, const char *port, const char *path, size_t size, double fiemap_sync_s)
{
	int fd = open(path, O_RDWR | O_CREAT, 0644);
	if (fd < 0)
		die("open", -errno);
	int err = posix_fallocate(fd, 0, (off_t)size);
	if (err) {
		errno = err;
		die("posix_fallocate", RPMA_E_PROVIDER);
	}
	void *ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0);
	if (ptr == MAP_FAILED)
		die("mmap(MAP_SHARED_VALIDATE | MAP_SYNC): not a DAX file?", RPMA_E_PROVIDER);

	struct rpma_peer_cfg *pcfg = NULL;
	struct ibv_context *ctx = NULL;
	struct rpma_peer *peer = NULL;
	struct rpma_ep *ep = NULL;
	struct rpma_mr_local *mr = NULL;
	int ret;
	if ((ret = rpma_peer_cfg_new(&pcfg)))
		die("rpma_peer_cfg_new", ret);
	/* the bytes an RDMA WRITE puts into this mapping reach persistence with a FLUSH: say so */
	if ((ret = rpma_peer_cfg_set_direct_write_to_pmem(pcfg, true)))
		die("rpma_peer_cfg_set_direct_write_to_pmem", ret);
	if ((ret = rpma_utils_get_ibv_context(addr, RPMA_UTIL_IBV_CONTEXT_LOCAL, &ctx)))
		die("rpma_utils_get_ibv_context", ret);
	int odp = 0;
	(void)rpma_utils_ibv_context_is_odp_capable(ctx, &odp);
	if ((ret = rpma_peer_new(ctx, &peer)))
		die("rpma_peer_new", ret);
	if ((ret = rpma_ep_listen(peer, addr, port, &ep)))
		die("rpma_ep_listen", ret);
	double t0 = now_s();
	ret = rpma_mr_reg(peer, ptr, size,
			  RPMA_MR_USAGE_WRITE_DST | RPMA_MR_USAGE_FLUSH_TYPE_PERSISTENT |
				  RPMA_MR_USAGE_FLUSH_TYPE_VISIBILITY,
			  &mr);
	if (ret)
		die("rpma_mr_reg", ret);
	double reg_ms = (now_s() - t0) * 1e3;

	struct pdata pd;
	memset(&pd, 0, sizeof(pd));
	size_t mr_size = 0, pcfg_size = 0;
	if ((ret = rpma_mr_get_descriptor_size(mr, &mr_size)))
		die("rpma_mr_get_descriptor_size", ret);
	if ((ret = rpma_peer_cfg_get_descriptor_size(pcfg, &pcfg_size)))
		die("rpma_peer_cfg_get_descriptor_size", ret);
	if (mr_size + pcfg_size > DESC_MAX)
		die("descriptors too large", RPMA_E_INVAL);
	pd.mr_desc_size = (uint8_t)mr_size;
	pd.pcfg_desc_size = (uint8_t)pcfg_size;
	if ((ret = rpma_mr_get_descriptor(mr, &pd.desc[0])))
		die("rpma_mr_get_descriptor", ret);
	if ((ret = rpma_peer_cfg_get_descriptor(pcfg, &pd.desc[mr_size])))
		die("rpma_peer_cfg_get_descriptor", ret);

	struct fiemap_sync fs = {fd, size, fiemap_sync_s, 0};
	pthread_t syncer;
	if (fiemap_sync_s > 0 && pthread_create(&syncer, NULL, fiemap_sync_thread, &fs) != 0)
		die("pthread_create", RPMA_E_NOMEM);

	printf("{\"ok\": true, \"pid\": %d, \"listening\": \"%s:%s\", \"path\": \"%s\", \"size\": %zu, "
	       "\"odp_capable\": %d, \"mr_reg_ms\": %.3f, \"direct_write_to_pmem\": true, "
	       "\"fiemap_sync_every_s\": %.1f}\n",
	       (int)getpid(), addr, port, path, size, odp, reg_ms, fiemap_sync_s);
	fflush(stdout);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: a blocking CM wait returns */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	while (!stop) {
		struct rpma_conn_req *req = NULL;
		struct rpma_conn *conn = NULL;
		enum rpma_conn_event ev = RPMA_CONN_UNDEFINED;
		struct rpma_conn_private_data priv = {&pd, sizeof(pd)};
		if (rpma_ep_next_conn_req(ep, NULL, &req))
			break;
		if (rpma_conn_req_connect(&req, &priv, &conn))
			continue;
		if (rpma_conn_next_event(conn, &ev) || ev != RPMA_CONN_ESTABLISHED) {
			(void)rpma_conn_delete(&conn);
			continue;
		}
		fprintf(stderr, "rpma_bench server: connection established\n");
		/* the data path needs nothing from this process: wait for the client to go */
		while (!stop && rpma_conn_next_event(conn, &ev) == 0 && ev != RPMA_CONN_CLOSED &&
		       ev != RPMA_CONN_LOST)
			;
		(void)rpma_conn_disconnect(conn);
		(void)rpma_conn_delete(&conn);
		fprintf(stderr, "rpma_bench server: connection closed\n");
	}
	(void)rpma_mr_dereg(&mr);
	(void)rpma_ep_shutdown(&ep);
	(void)rpma_peer_delete(&peer);
	(void)rpma_peer_cfg_delete(&pcfg);
	munmap(ptr, size);
	close(fd);
	return 0;
}

/* ---------------------------------------------------------------------------------------------- */
struct client {
	struct rpma_conn *conn;
	struct rpma_cq *cq;
	struct rpma_mr_remote *dst;
	struct rpma_mr_local *src;
	size_t region;
};

/* Wait until the completion carrying `want` (a wr_id) arrives; returns the highest write index retired
 * on the way in *retired (signalled writes carry their index + 1), 0 or -1 on a failed completion. */
static int poll_until(struct client *c, uint64_t want, uint64_t *retired, int any)
{
	struct ibv_wc wc[16];
	for (;;) {
		int got = 0;
		int ret = rpma_cq_get_wc(c->cq, 16, wc, &got);
		if (ret == RPMA_E_NO_COMPLETION)
			continue;
		if (ret) {
			fprintf(stderr, "rpma_cq_get_wc: %d\n", ret);
			return -1;
		}
		int done = 0;
		for (int i = 0; i < got; i++) {
			if (wc[i].status != IBV_WC_SUCCESS) {
				fprintf(stderr, "completion %" PRIu64 " failed: %s\n", (uint64_t)wc[i].wr_id,
					ibv_wc_status_str(wc[i].status));
				return -1;
			}
			if (wc[i].wr_id == want)
				done = 1;
			else if (retired && wc[i].wr_id != FLUSH_ID && wc[i].wr_id > *retired)
				*retired = wc[i].wr_id;
		}
		if (done || (any && got))
			return 0;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct(const uint64_t *sorted, size_t n, double q)
{
	double pos = (double)(n - 1) * q / 100.0;
	size_t lo = (size_t)pos, hi = lo + (lo + 1 < n);
	return ((double)sorted[lo] + ((double)sorted[hi] - (double)sorted[lo]) * (pos - (double)lo)) / 1e3;
}

static void run(struct client *c, size_t size, int depth, uint64_t count)
{
	if (size == 0 || size > LOCAL_BUF || size > c->region || depth < 1 || depth > MAX_DEPTH || count == 0) {
		printf("{\"ok\": false, \"error\": \"bad run arguments\"}\n");
		return;
	}
	uint64_t *samples = depth == 1 ? calloc(count, sizeof(uint64_t)) : NULL;
	uint64_t slots = c->region / size;
	int ret = 0;
	double t0 = now_s();
	if (depth == 1) {
		for (uint64_t i = 0; i < count && !ret; i++) {
			size_t off = (size_t)(i % slots) * size;
			uint64_t s0 = now_ns();
			ret = rpma_write(c->conn, c->dst, off, c->src, (i * size) % LOCAL_BUF, size,
					 RPMA_F_COMPLETION_ON_ERROR, NULL);
			ret = ret ? ret
				  : rpma_flush(c->conn, c->dst, off, size, RPMA_FLUSH_TYPE_PERSISTENT,
					       RPMA_F_COMPLETION_ALWAYS, (void *)(uintptr_t)FLUSH_ID);
			ret = ret ? ret : poll_until(c, FLUSH_ID, NULL, 0);
			samples[i] = now_ns() - s0;
		}
	} else {
		uint64_t every = (uint64_t)(depth / 2 < 16 ? depth / 2 : 16), posted = 0, retired = 0;
		while (posted < count && !ret) {
			while (posted - retired >= (uint64_t)depth && !ret)
				ret = poll_until(c, UINT64_MAX, &retired, 1);
			uint64_t i = posted++;
			int flags = (posted % every == 0) ? RPMA_F_COMPLETION_ALWAYS : RPMA_F_COMPLETION_ON_ERROR;
			ret = ret ? ret
				  : rpma_write(c->conn, c->dst, (size_t)(i % slots) * size, c->src,
					       (i * size) % LOCAL_BUF, size, flags, (void *)(uintptr_t)posted);
		}
		uint64_t span = count * size < c->region ? count * size : c->region;
		ret = ret ? ret
			  : rpma_flush(c->conn, c->dst, 0, span, RPMA_FLUSH_TYPE_PERSISTENT,
				       RPMA_F_COMPLETION_ALWAYS, (void *)(uintptr_t)FLUSH_ID);
		ret = ret ? ret : poll_until(c, FLUSH_ID, &retired, 0);
	}
	double secs = now_s() - t0;
	if (ret) {
		printf("{\"ok\": false, \"error\": \"run %zu %d %" PRIu64 " failed: %d\"}\n", size, depth, count, ret);
		free(samples);
		return;
	}
	double mib = (double)count * (double)size / (1 << 20);
	printf("{\"ok\": true, \"size\": %zu, \"depth\": %d, \"messages\": %" PRIu64 ", \"bytes\": %" PRIu64
	       ", \"seconds\": %.6f, \"bw_mib_s\": %.3f",
	       size, depth, count, count * size, secs, mib / secs);
	if (samples) {
		qsort(samples, count, sizeof(uint64_t), cmp_u64);
		double sum = 0;
		for (uint64_t i = 0; i < count; i++)
			sum += (double)samples[i];
		printf(", \"samples\": %" PRIu64 ", \"p50_us\": %.2f, \"p99_us\": %.2f, \"min_us\": %.2f, "
		       "\"max_us\": %.2f, \"mean_us\": %.2f",
		       count, pct(samples, count, 50), pct(samples, count, 99), samples[0] / 1e3,
		       samples[count - 1] / 1e3, sum / (double)count / 1e3);
	}
	printf("}\n");
	free(samples);
}

static int client(const char *addr, const char *port)
{
	struct ibv_context *ctx = NULL;
	struct rpma_peer *peer = NULL;
	struct rpma_conn_cfg *cfg = NULL;
	struct rpma_conn_req *req = NULL;
	struct client c;
	memset(&c, 0, sizeof(c));
	int ret;
	if ((ret = rpma_utils_get_ibv_context(addr, RPMA_UTIL_IBV_CONTEXT_REMOTE, &ctx)))
		die("rpma_utils_get_ibv_context", ret);
	if ((ret = rpma_peer_new(ctx, &peer)))
		die("rpma_peer_new", ret);
	if ((ret = rpma_conn_cfg_new(&cfg)))
		die("rpma_conn_cfg_new", ret);
	/* room for MAX_DEPTH writes and the FLUSH behind them */
	if ((ret = rpma_conn_cfg_set_sq_size(cfg, MAX_DEPTH + 2)) || (ret = rpma_conn_cfg_set_cq_size(cfg, 2 * MAX_DEPTH + 4)) ||
	    (ret = rpma_conn_cfg_set_rq_size(cfg, 1)) || (ret = rpma_conn_cfg_set_timeout(cfg, 10000)))
		die("rpma_conn_cfg_set_*", ret);
	if ((ret = rpma_conn_req_new(peer, addr, port, cfg, &req)))
		die("rpma_conn_req_new", ret);
	if ((ret = rpma_conn_req_connect(&req, NULL, &c.conn)))
		die("rpma_conn_req_connect", ret);
	enum rpma_conn_event ev = RPMA_CONN_UNDEFINED;
	if ((ret = rpma_conn_next_event(c.conn, &ev)) || ev != RPMA_CONN_ESTABLISHED)
		die("rpma_conn_next_event(ESTABLISHED)", ret ? ret : RPMA_E_UNKNOWN);

	struct rpma_conn_private_data priv;
	if ((ret = rpma_conn_get_private_data(c.conn, &priv)) || priv.len < sizeof(struct pdata))
		die("rpma_conn_get_private_data", ret ? ret : RPMA_E_INVAL);
	struct pdata *pd = priv.ptr;
	struct rpma_peer_cfg *pcfg = NULL;
	bool direct = false;
	if ((ret = rpma_peer_cfg_from_descriptor(&pd->desc[pd->mr_desc_size], pd->pcfg_desc_size, &pcfg)))
		die("rpma_peer_cfg_from_descriptor", ret);
	(void)rpma_peer_cfg_get_direct_write_to_pmem(pcfg, &direct);
	if ((ret = rpma_conn_apply_remote_peer_cfg(c.conn, pcfg)))
		die("rpma_conn_apply_remote_peer_cfg", ret);
	(void)rpma_peer_cfg_delete(&pcfg);
	if (!direct)
		die("the server does not declare direct_write_to_pmem (no persistent FLUSH)", RPMA_E_NOSUPP);
	if ((ret = rpma_mr_remote_from_descriptor(&pd->desc[0], pd->mr_desc_size, &c.dst)))
		die("rpma_mr_remote_from_descriptor", ret);
	if ((ret = rpma_mr_remote_get_size(c.dst, &c.region)))
		die("rpma_mr_remote_get_size", ret);
	int flush_type = 0;
	(void)rpma_mr_remote_get_flush_type(c.dst, &flush_type);

	void *buf = NULL;
	if (posix_memalign(&buf, 4096, LOCAL_BUF))
		die("posix_memalign", RPMA_E_NOMEM);
	for (size_t i = 0; i < LOCAL_BUF; i++)
		((unsigned char *)buf)[i] = (unsigned char)(i * 131 + 7);
	if ((ret = rpma_mr_reg(peer, buf, LOCAL_BUF, RPMA_MR_USAGE_WRITE_SRC, &c.src)))
		die("rpma_mr_reg(local)", ret);
	if ((ret = rpma_conn_get_cq(c.conn, &c.cq)))
		die("rpma_conn_get_cq", ret);

	printf("{\"ok\": true, \"pid\": %d, \"region\": %zu, \"direct_write_to_pmem\": %s, "
	       "\"remote_flush_persistent\": %s}\n",
	       (int)getpid(), c.region, direct ? "true" : "false",
	       (flush_type & RPMA_MR_USAGE_FLUSH_TYPE_PERSISTENT) ? "true" : "false");
	fflush(stdout);

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		size_t size;
		int depth;
		uint64_t count;
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (sscanf(line, "run %zu %d %" SCNu64, &size, &depth, &count) == 3)
			run(&c, size, depth, count);
		else
			printf("{\"ok\": false, \"error\": \"unknown command\"}\n");
		fflush(stdout);
	}
	(void)rpma_mr_dereg(&c.src);
	(void)rpma_mr_remote_delete(&c.dst);
	(void)rpma_conn_disconnect(c.conn);
	while (rpma_conn_next_event(c.conn, &ev) == 0 && ev != RPMA_CONN_CLOSED && ev != RPMA_CONN_LOST)
		;
	(void)rpma_conn_delete(&c.conn);
	(void)rpma_conn_cfg_delete(&cfg);
	(void)rpma_peer_delete(&peer);
	free(buf);
	return 0;
}

int main(int argc, char *argv[])
{
	rpma_log_set_threshold(RPMA_LOG_THRESHOLD, RPMA_LOG_LEVEL_NOTICE);
	rpma_log_set_threshold(RPMA_LOG_THRESHOLD_AUX, RPMA_LOG_LEVEL_INFO); /* stderr: the driver's log */
	if ((argc == 6 || argc == 7) && strcmp(argv[1], "server") == 0)
		return server(argv[2], argv[3], argv[4], strtoull(argv[5], NULL, 0), argc == 7 ? atof(argv[6]) : 0.0);
	if (argc == 4 && strcmp(argv[1], "client") == 0)
		return client(argv[2], argv[3]);
	fprintf(stderr, "usage: %s server ADDR PORT PATH SIZE [FIEMAP_SYNC_SECONDS] | client ADDR PORT\n", argv[0]);
	return 2;
}
