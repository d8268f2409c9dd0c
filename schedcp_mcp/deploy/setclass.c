// SPDX-License-Identifier: GPL-2.0-only
/*
 * schedcp-setclass: move tasks between SCHED_EXT and SCHED_NORMAL, for a scoped deployment.
 *
 * With a scheduler loaded in partial mode (SCX_OPS_SWITCH_PARTIAL) only tasks whose policy is
 * SCHED_EXT (7) run on it; children inherit the policy. util-linux's chrt (2.41) has no SCHED_EXT,
 * so this sets it with sched_setattr(2), keeping each task's nice value.
 *
 *   schedcp-setclass ext|normal pid PID      every thread of PID
 *   schedcp-setclass ext|normal cgroup DIR   every thread in DIR/cgroup.threads (cgroup v2)
 *   schedcp-setclass ext exec CMD [ARG...]   set itself, then exec CMD (its children follow)
 *   schedcp-setclass ext start OUT CMD [ARG...]  start CMD in its own session on SCHED_EXT (its
 *                                            children follow), output to OUT; prints `@@SCOPEPID P`
 *                                            once CMD has been exec'd, so the caller never races it
 *   schedcp-setclass normal all              every SCHED_EXT task on the machine back to SCHED_NORMAL
 *   schedcp-setclass policy PID              print the policy of PID (0 normal, 7 ext, ...)
 *
 * Prints `moved N` (tasks changed) and exits 1 when a named task could not be moved.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SCHED_NORMAL_ 0
#define SCHED_EXT_ 7

struct attr {
	uint32_t size, policy;
	uint64_t flags;
	int32_t nice;
	uint32_t prio;
	uint64_t runtime, deadline, period;
	uint32_t util_min, util_max;
};

static int policy_of(int tid)
{
	struct attr a;
	memset(&a, 0, sizeof(a));
	if (syscall(SYS_sched_getattr, tid, &a, sizeof(a), 0))
		return -1;
	return (int)a.policy;
}

static int set(int tid, int policy)
{
	struct attr a;
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.policy = policy;
	errno = 0;
	int nice = getpriority(PRIO_PROCESS, tid);
	a.nice = errno ? 0 : nice;
	return syscall(SYS_sched_setattr, tid, &a, 0) ? -errno : 0;
}

static int moved, failed;

static void move(int tid, int policy)
{
	int r = set(tid, policy);
	if (r == 0)
		moved++;
	else if (r != -ESRCH) {  /* a task that exited meanwhile is not a failure */
		fprintf(stderr, "schedcp-setclass: task %d: %s\n", tid, strerror(-r));
		failed++;
	}
}

static void move_pid(int pid, int policy)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	DIR *d = opendir(path);
	if (!d) {
		fprintf(stderr, "schedcp-setclass: no process %d\n", pid);
		failed++;
		return;
	}
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			move(atoi(e->d_name), policy);
	closedir(d);
}

/* Fork; the child leaves our session, sets SCHED_EXT and execs CMD. A close-on-exec pipe tells the
 * parent which happened: EOF means CMD is running on SCHED_EXT; a message means it is not. */
static int start(const char *out, char **cmd)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC)) {
		perror("schedcp-setclass: pipe");
		return 1;
	}
	pid_t c = fork();
	if (c < 0) {
		perror("schedcp-setclass: fork");
		return 1;
	}
	if (c == 0) {
		char msg[512];
		int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644), n = open("/dev/null", O_RDONLY);
		int r = (o < 0 || n < 0) ? -errno : set(0, SCHED_EXT_);
		if (r == 0) {
			dup2(n, 0);
			dup2(o, 1);
			dup2(o, 2);
			for (int fd = 3; fd < 1024; fd++)
				if (fd != p[1])
					close(fd);
			setsid();
			execvp(cmd[0], cmd);
			snprintf(msg, sizeof(msg), "cannot run %s: %s", cmd[0], strerror(errno));
		} else {
			snprintf(msg, sizeof(msg), "cannot set SCHED_EXT or open %s: %s", out, strerror(-r));
		}
		if (write(p[1], msg, strlen(msg)) < 0)
			_exit(126);
		_exit(127);
	}
	close(p[1]);
	char msg[512];
	ssize_t len = read(p[0], msg, sizeof(msg) - 1);
	if (len > 0) {
		msg[len] = 0;
		fprintf(stderr, "schedcp-setclass: %s\n", msg);
		waitpid(c, NULL, 0);
		return 1;
	}
	printf("@@SCOPEPID %d\n", c);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		goto usage;
	int policy = !strcmp(argv[1], "ext") ? SCHED_EXT_ : !strcmp(argv[1], "normal") ? SCHED_NORMAL_ : -1;
	if (!strcmp(argv[1], "policy")) {
		int p = policy_of(atoi(argv[2]));
		printf("%d\n", p);
		return p < 0;
	}
	if (policy < 0)
		goto usage;
	if (!strcmp(argv[2], "pid") && argc == 4) {
		move_pid(atoi(argv[3]), policy);
	} else if (!strcmp(argv[2], "cgroup") && argc == 4) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/cgroup.threads", argv[3]);
		FILE *f = fopen(path, "r");
		if (!f) {
			fprintf(stderr, "schedcp-setclass: cannot read %s: %s\n", path, strerror(errno));
			return 1;
		}
		int tid;
		while (fscanf(f, "%d", &tid) == 1)
			move(tid, policy);
		fclose(f);
	} else if (!strcmp(argv[2], "exec") && argc >= 4 && policy == SCHED_EXT_) {
		int r = set(0, policy);
		if (r) {
			fprintf(stderr, "schedcp-setclass: cannot set SCHED_EXT: %s\n", strerror(-r));
			return 1;
		}
		execvp(argv[3], argv + 3);
		fprintf(stderr, "schedcp-setclass: cannot run %s: %s\n", argv[3], strerror(errno));
		return 127;
	} else if (!strcmp(argv[2], "start") && argc >= 5 && policy == SCHED_EXT_) {
		return start(argv[3], argv + 4);
	} else if (!strcmp(argv[2], "all") && policy == SCHED_NORMAL_) {
		DIR *d = opendir("/proc");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			int pid = atoi(e->d_name);
			if (pid <= 0)
				continue;
			char path[64];
			snprintf(path, sizeof(path), "/proc/%d/task", pid);
			DIR *t = opendir(path);
			struct dirent *te;
			while (t && (te = readdir(t))) {
				int tid = atoi(te->d_name);
				if (tid > 0 && policy_of(tid) == SCHED_EXT_)
					move(tid, SCHED_NORMAL_);
			}
			if (t)
				closedir(t);
		}
		if (d)
			closedir(d);
	} else {
		goto usage;
	}
	printf("moved %d\n", moved);
	return failed ? 1 : 0;
usage:
	fprintf(stderr, "usage: schedcp-setclass ext|normal pid PID | ext|normal cgroup DIR | ext exec CMD... | ext start OUT CMD... | "
			"normal all | policy PID\n");
	return 2;
}
