// SPDX-License-Identifier: GPL-2.0-only
/*
 * schedcp-probe: the sandbox's own measuring tools (schbench is not packaged in Debian).
 *
 *   schedcp-probe wakeup [-t SLEEPERS] [-H HOGS] [-p PERIOD_US] [-j JITTER_US] [-d DURATION_MS] [-P]
 *       SLEEPERS threads each sleep until an absolute deadline every PERIOD_US and record how late
 *       they woke up (now - deadline); HOGS threads spin on the CPU meanwhile, so a woken sleeper
 *       has to be scheduled in front of a CPU hog. That delay is what a scheduler decides: under a
 *       FIFO with long slices a sleeper waits behind the hogs, under a latency-aware one it does
 *       not. After each wakeup a sleeper also reads its own run_delay (/proc/thread-self/schedstat):
 *       the time it spent runnable but not running since the last wakeup, i.e. the run-queue wait
 *       alone, without the timer's own lateness (in a TCG guest the timer interrupt is often late
 *       by most of a tick, whichever scheduler runs, and that swamped the scheduler's share).
 *       Prints one JSON object: samples, p50_us .. max_us (deadline -> running), rq_mean_us,
 *       rq_tail_us (mean of the slowest 1 %), rq_p50_us .. rq_max_us (run-queue wait per wakeup),
 *       hog_loops.
 *
 *   schedcp-probe pingpong -c CPU [-d DURATION_MS]
 *       Two processes pinned to CPU pass one byte back and forth over two pipes (write, then read:
 *       a strict hand-off) for DURATION_MS. Every switch on that CPU is then a short task's wakeup:
 *       the steady refill that keeps a "short wakers first" queue non-empty at every pick, so that
 *       whatever waits behind it on that CPU starves unless the scheduler bounds it. Prints
 *       {"round_trips": N}.
 *
 *   schedcp-probe time CMD [ARG]...
 *       Runs CMD, waits, and prints one JSON object {"elapsed_s": ..., "rc": ...} (the guest's
 *       busybox `date` has no nanoseconds). rc is the exit status, or 128+signal.
 *
 * Static, no dependencies beyond libc and pthreads; built by the sandbox toolchain and shipped
 * into the VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_SAMPLES (1 << 20)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static atomic_int stop;
static int pin;	/* -P: thread i runs only on CPU i % ncpus */
static atomic_ullong hog_loops;
static uint64_t period_ns, jitter_ns, start_ns, end_ns;
static int nsleepers;

/* per-sleeper sample buffers; merged after the run */
static struct sleeper {
	pthread_t tid;
	uint64_t *lat_ns;	/* deadline -> running: timer delivery + run-queue wait */
	uint64_t *rq_ns;	/* runnable -> running: the run-queue wait alone (schedstat) */
	size_t n, cap;
} sleepers[MAX_THREADS];

/* This thread's run_delay (ns spent runnable, not running; 2nd field of schedstat), or 0. */
static uint64_t run_delay(int fd)
{
	char buf[96];
	ssize_t k = pread(fd, buf, sizeof(buf) - 1, 0);
	unsigned long long a = 0, b = 0;

	if (k <= 0)
		return 0;
	buf[k] = 0;
	return sscanf(buf, "%llu %llu", &a, &b) == 2 ? b : 0;
}

/*
 * -P pins thread i to CPU i % ncpus (sleepers and hogs numbered separately), so that every CPU has
 * the same hogs and sleepers in every run. Unpinned, where the threads happened to land decided a
 * run's figures: the median run-queue wait was 5 us in some runs and 30-40 us in others of the same
 * scheduler (a wakeup on the CPU its timer fired on vs. one that needs an IPI), and that run-to-run
 * state, not the scheduler, dominated an A/A comparison.
 */
static void pin_to(int i)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t set;

	if (!pin || n < 1)
		return;
	CPU_ZERO(&set);
	CPU_SET(i % n, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static void *sleeper_main(void *arg)
{
	struct sleeper *s = arg;
	pin_to((int)(s - sleepers));
	/* the default 50 us timer slack would be measured as latency */
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	/*
	 * Phases spread evenly over the period from one common start: sleepers that happened to start
	 * together would wake together and queue behind each other, and how much depends on thread
	 * start-up jitter — a different convoy every run, which made p99 vary 2x between runs of the
	 * same scheduler.
	 */
	uint64_t next = start_ns + period_ns * (uint64_t)(s - sleepers) / (uint64_t)nsleepers;
	int fd = open("/proc/thread-self/schedstat", O_RDONLY);
	uint64_t rd = fd >= 0 ? run_delay(fd) : 0;
	uint64_t rnd = 0x9e3779b97f4a7c15ull * (uint64_t)(s - sleepers + 1);
	for (;;) {
		next += period_ns;
		if (jitter_ns) {	/* -j: every phase against the tick within one run, not one per run */
			rnd ^= rnd << 13;
			rnd ^= rnd >> 7;
			rnd ^= rnd << 17;
			next = next - jitter_ns + rnd % (2 * jitter_ns + 1);
		}
		if (next >= end_ns)
			break;
		struct timespec ts = { .tv_sec = next / 1000000000ull, .tv_nsec = next % 1000000000ull };
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
			;
		uint64_t t = now_ns();
		uint64_t rd1 = fd >= 0 ? run_delay(fd) : 0;
		if (s->n < s->cap) {
			s->rq_ns[s->n] = rd1 - rd;
			s->lat_ns[s->n++] = t > next ? t - next : 0;
		}
		rd = rd1;
		/* a very late wakeup skips the deadlines it missed rather than bursting to catch up */
		if (t > next + period_ns)
			next = t - (t - next) % period_ns;
	}
	if (fd >= 0)
		close(fd);
	return NULL;
}

static void *hog_main(void *arg)
{
	pin_to((int)(intptr_t)arg);
	unsigned long long loops = 0;
	volatile uint64_t x = 1;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		for (int i = 0; i < 10000; i++)
			x = x * 6364136223846793005ull + 1442695040888963407ull;
		loops++;
	}
	atomic_fetch_add(&hog_loops, loops);
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct_us(const uint64_t *v, size_t n, double p)
{
	if (!n)
		return 0.0;
	size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
	return (double)v[i < n ? i : n - 1] / 1000.0;
}

static int do_wakeup(int argc, char **argv)
{
	int nsleep = 4, nhog = 2, opt;
	long period_us = 2000, duration_ms = 1000, jitter_us = 0;
	while ((opt = getopt(argc, argv, "t:H:p:j:d:P")) != -1) {
		switch (opt) {
		case 'P': pin = 1; break;
		case 't': nsleep = atoi(optarg); break;
		case 'H': nhog = atoi(optarg); break;
		case 'p': period_us = atol(optarg); break;
		case 'j': jitter_us = atol(optarg); break;
		case 'd': duration_ms = atol(optarg); break;
		default:
			fprintf(stderr, "usage: schedcp-probe wakeup [-t N] [-H N] [-p US] [-j US] [-d MS] [-P]\n");
			return 2;
		}
	}
	if (nsleep < 1 || nsleep > MAX_THREADS || nhog < 0 || nhog > MAX_THREADS || period_us < 10 ||
	    duration_ms < 1 || jitter_us < 0 || jitter_us >= period_us) {
		fprintf(stderr, "schedcp-probe: out of range (1..%d sleepers, 0..%d hogs, period >= 10 us)\n",
			MAX_THREADS, MAX_THREADS);
		return 2;
	}
	period_ns = (uint64_t)period_us * 1000;
	jitter_ns = (uint64_t)jitter_us * 1000;
	nsleepers = nsleep;
	start_ns = now_ns() + 20 * period_ns;	/* after every thread has started */
	end_ns = start_ns + (uint64_t)duration_ms * 1000000ull;
	size_t cap = (size_t)(duration_ms * 1000 / period_us) + 2;
	if (cap > MAX_SAMPLES)
		cap = MAX_SAMPLES;

	pthread_t hogs[MAX_THREADS];
	for (int i = 0; i < nhog; i++)
		if (pthread_create(&hogs[i], NULL, hog_main, (void *)(intptr_t)i)) {
			perror("pthread_create");
			return 1;
		}
	for (int i = 0; i < nsleep; i++) {
		sleepers[i].lat_ns = calloc(cap, sizeof(uint64_t));
		sleepers[i].rq_ns = calloc(cap, sizeof(uint64_t));
		sleepers[i].cap = cap;
		if (!sleepers[i].lat_ns || !sleepers[i].rq_ns || pthread_create(&sleepers[i].tid, NULL, sleeper_main, &sleepers[i])) {
			perror("schedcp-probe: sleeper");
			return 1;
		}
	}
	for (int i = 0; i < nsleep; i++)
		pthread_join(sleepers[i].tid, NULL);
	atomic_store(&stop, 1);
	for (int i = 0; i < nhog; i++)
		pthread_join(hogs[i], NULL);

	size_t n = 0;
	for (int i = 0; i < nsleep; i++)
		n += sleepers[i].n;
	uint64_t *all = malloc((n ? n : 1) * sizeof(uint64_t)), *rq = malloc((n ? n : 1) * sizeof(uint64_t));
	if (!all || !rq) {
		perror("malloc");
		return 1;
	}
	size_t k = 0;
	for (int i = 0; i < nsleep; i++) {
		memcpy(all + k, sleepers[i].lat_ns, sleepers[i].n * sizeof(uint64_t));
		memcpy(rq + k, sleepers[i].rq_ns, sleepers[i].n * sizeof(uint64_t));
		k += sleepers[i].n;
	}
	double rq_sum = 0;
	for (size_t j = 0; j < n; j++)
		rq_sum += (double)rq[j];
	qsort(all, n, sizeof(uint64_t), cmp_u64);
	qsort(rq, n, sizeof(uint64_t), cmp_u64);
	/* the tail's mean: the slowest 1 % of waits averaged (a quantile at the edge between "preempted
	 * at once" and "waited for the tick" jumps between the two modes; this moves in proportion) */
	size_t ntail = n / 100 ? n / 100 : 1;
	double tail_sum = 0;
	for (size_t j = n > ntail ? n - ntail : 0; j < n; j++)
		tail_sum += (double)rq[j];
	printf("{\"samples\": %zu, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
	       "\"rq_mean_us\": %.2f, \"rq_tail_us\": %.2f, \"rq_p50_us\": %.1f, \"rq_p90_us\": %.1f, \"rq_p99_us\": %.1f, \"rq_max_us\": %.1f, "
	       "\"hog_loops\": %llu, \"sleepers\": %d, \"hogs\": %d, \"period_us\": %ld}\n",
	       n, pct_us(all, n, 50), pct_us(all, n, 90), pct_us(all, n, 99), n ? (double)all[n - 1] / 1000.0 : 0.0,
	       n ? rq_sum / (double)n / 1000.0 : 0.0, n ? tail_sum / (double)ntail / 1000.0 : 0.0, pct_us(rq, n, 50), pct_us(rq, n, 90), pct_us(rq, n, 99), n ? (double)rq[n - 1] / 1000.0 : 0.0,
	       (unsigned long long)atomic_load(&hog_loops), nsleep, nhog, period_us);
	return n ? 0 : 1;
}

static int do_time(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: schedcp-probe time CMD [ARG]...\n");
		return 2;
	}
	uint64_t t0 = now_ns();
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		execvp(argv[1], argv + 1);
		fprintf(stderr, "schedcp-probe: exec %s: %s\n", argv[1], strerror(errno));
		_exit(127);
	}
	int status;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	double s = (double)(now_ns() - t0) / 1e9;
	int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	printf("{\"elapsed_s\": %.6f, \"rc\": %d}\n", s, rc);
	return rc;
}

static int do_pingpong(int argc, char **argv)
{
	int cpu = 0, opt, ab[2], ba[2];
	long duration_ms = 1000;
	while ((opt = getopt(argc, argv, "c:d:")) != -1) {
		switch (opt) {
		case 'c': cpu = atoi(optarg); break;
		case 'd': duration_ms = atol(optarg); break;
		default:
			fprintf(stderr, "usage: schedcp-probe pingpong -c CPU [-d MS]\n");
			return 2;
		}
	}
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) || pipe(ab) || pipe(ba)) {
		perror("schedcp-probe pingpong");
		return 1;
	}
	char c = 0;
	pid_t pid = fork();	/* the child inherits the affinity */
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(ab[1]);
		close(ba[0]);
		while (read(ab[0], &c, 1) == 1 && write(ba[1], &c, 1) == 1)
			;
		_exit(0);
	}
	close(ab[0]);
	close(ba[1]);
	uint64_t end = now_ns() + (uint64_t)duration_ms * 1000000ull, trips = 0;
	while (now_ns() < end && write(ab[1], &c, 1) == 1 && read(ba[0], &c, 1) == 1)
		trips++;
	close(ab[1]);
	waitpid(pid, NULL, 0);
	printf("{\"round_trips\": %llu}\n", (unsigned long long)trips);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "pingpong"))
		return do_pingpong(argc - 1, argv + 1);
	if (argc >= 2 && !strcmp(argv[1], "wakeup"))
		return do_wakeup(argc - 1, argv + 1);
	if (argc >= 2 && !strcmp(argv[1], "time"))
		return do_time(argc - 1, argv + 1);
	fprintf(stderr, "usage: schedcp-probe wakeup [-t N] [-H N] [-p US] [-d MS] | pingpong -c CPU [-d MS] | time CMD [ARG]...\n");
	return 2;
}
