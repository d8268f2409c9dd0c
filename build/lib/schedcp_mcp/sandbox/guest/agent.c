// SPDX-License-Identifier: GPL-2.0-only
/*
 * schedcp-agent: the guest side of the sandbox VM's command channel (PID 1 after init.sh).
 *
 * Why C and not a shell loop: under TCG every fork costs 30-90 ms, and a shell agent needs ~10 of
 * them per request (dd, tar, wc, cat, rm, ...). This one forks once per request (the script's sh).
 *
 * Protocol over the channel device (a virtio-serial port), line headers + exact-length bodies:
 *   host: PING <nonce>\n                      agent: PONG <nonce>\n
 *   host: RUN <id> <len>\n<body>              agent: DONE <id> <rc> <len>\n<body>
 *   host: POWEROFF\n                          (sync, power off)
 * A body is a sequence of records: kind (1 byte), name length (u32 LE), data length (u32 LE), name,
 * data. Request kinds: 'S' the script, 'F' a file for the work dir, 'O' the name of an output file to
 * return. Reply kinds: 'o' stdout, 'e' stderr, 'F' an output file that existed.
 * The script runs as `sh script` in a fresh work dir, stdin /dev/null; the channel is close-on-exec, so
 * background jobs never hold it. With an idle timeout (argv[2] seconds, 0 = none) the guest powers off
 * when no request came for that long; an ephemeral VM (argv[3] = 1) powers off as soon as the host
 * closes the channel, so a VM never outlives the process that booted it, however that process died.
 * As PID 1 it also reaps orphaned processes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_BODY (512u << 20)

static int ch;                 /* the channel */
static char inbuf[1 << 16];    /* bytes read from the channel, not consumed yet */
static size_t in_len;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void reap(void)
{
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	_exit(0);
}

/* Fill the input buffer: >0 bytes added, 0 no data within timeout_ms, -1 the host end is closed. */
static int fill(int timeout_ms)
{
	struct pollfd p = { .fd = ch, .events = POLLIN };
	int r = poll(&p, 1, timeout_ms);
	if (r <= 0)
		return 0;
	ssize_t n = read(ch, inbuf + in_len, sizeof(inbuf) - in_len);
	if (n > 0) {
		in_len += n;
		return (int)n;
	}
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	return -1; /* EOF: no host connected (virtio ports read 0 then) */
}

static void write_all(const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(ch, p, len);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				usleep(1000);
				continue;
			}
			return; /* the host went away: nothing to do with the reply */
		}
		p += n;
		len -= n;
	}
}

/* Read exactly len bytes (after a header) into a new buffer. NULL when the host goes away. */
static char *read_exact(size_t len)
{
	char *out = malloc(len ? len : 1);
	size_t got = 0;
	if (!out)
		return NULL;
	while (got < len) {
		if (!in_len) {
			int r = fill(10000);
			if (r < 0) {
				usleep(100000);
				continue; /* wait for the host to come back; it will resync with PING */
			}
			if (r == 0)
				continue;
		}
		size_t take = in_len < len - got ? in_len : len - got;
		memcpy(out + got, inbuf, take);
		memmove(inbuf, inbuf + take, in_len - take);
		in_len -= take;
		got += take;
	}
	return out;
}

/* ---------------------------------------------------------------- records */

struct rec {
	char kind;
	char *name;
	char *data;
	uint32_t nlen, dlen;
};

static uint32_t le32(const char *p)
{
	const unsigned char *u = (const unsigned char *)p;
	return u[0] | u[1] << 8 | u[2] << 16 | (uint32_t)u[3] << 24;
}

struct outbuf {
	char *p;
	size_t len, cap;
};

static void out_add(struct outbuf *o, const void *d, size_t n)
{
	if (o->len + n > o->cap) {
		size_t cap = o->cap ? o->cap : 65536;
		while (cap < o->len + n)
			cap *= 2;
		o->p = realloc(o->p, cap);
		o->cap = cap;
	}
	memcpy(o->p + o->len, d, n);
	o->len += n;
}

static void out_rec(struct outbuf *o, char kind, const char *name, const char *data, size_t dlen)
{
	uint32_t nl = strlen(name), dl = dlen;
	char hdr[9] = { kind };
	for (int i = 0; i < 4; i++) {
		hdr[1 + i] = nl >> (8 * i);
		hdr[5 + i] = dl >> (8 * i);
	}
	out_add(o, hdr, 9);
	out_add(o, name, nl);
	out_add(o, data, dl);
}

static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	*len = 0;
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
		close(fd);
		return NULL;
	}
	char *buf = malloc(st.st_size + 1);
	size_t got = 0;
	ssize_t n;
	while (buf && (n = read(fd, buf + got, st.st_size - got)) > 0 && got < (size_t)st.st_size)
		got += n;
	close(fd);
	*len = got;
	return buf;
}

static int mkdirs_for(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(tmp, 0755);
			*p = '/';
		}
	}
	return 0;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb; (void)flag; (void)ftw;
	remove(p);
	return 0;
}

static int safe_name(const char *n)
{
	if (!*n || n[0] == '/' || strstr(n, ".."))
		return 0;
	return 1;
}

/* ---------------------------------------------------------------- one request */

static void handle_run(const char *id, size_t len)
{
	char *body = read_exact(len);
	if (!body)
		return;
	char dir[256], work[300], path[4400];
	snprintf(dir, sizeof(dir), "/run/req/%s", id);
	snprintf(work, sizeof(work), "%s/work", dir);
	mkdir("/run/req", 0755);
	mkdir(dir, 0755);
	mkdir(work, 0755);

	const char *outs[1024];
	int nouts = 0;
	int have_script = 0;
	size_t off = 0;
	while (off + 9 <= len) {
		char kind = body[off];
		uint32_t nl = le32(body + off + 1), dl = le32(body + off + 5);
		off += 9;
		if (off + nl + dl > len)
			break;
		char *name = strndup(body + off, nl);
		const char *data = body + off + nl;
		off += nl + dl;
		if (kind == 'S') {
			snprintf(path, sizeof(path), "%s/script.sh", dir);
			int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
			if (fd >= 0) {
				if (write(fd, data, dl) != (ssize_t)dl)
					fprintf(stderr, "schedcp-agent: short write of the script\n");
				close(fd);
				have_script = 1;
			}
			free(name);
		} else if (kind == 'F' && safe_name(name)) {
			snprintf(path, sizeof(path), "%s/%s", work, name);
			mkdirs_for(path);
			int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
			if (fd >= 0) {
				size_t w = 0;
				ssize_t n;
				while (w < dl && (n = write(fd, data + w, dl - w)) > 0)
					w += n;
				close(fd);
			}
			free(name);
		} else if (kind == 'O' && safe_name(name) && nouts < 1024) {
			outs[nouts++] = name;
		} else {
			free(name);
		}
	}
	free(body);

	int rc = 254;
	char so[320], se[320];
	snprintf(so, sizeof(so), "%s/stdout", dir);
	snprintf(se, sizeof(se), "%s/stderr", dir);
	if (have_script) {
		pid_t pid = fork();
		if (pid == 0) {
			int in = open("/dev/null", O_RDONLY);
			int o = open(so, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			int e = open(se, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			if (in < 0 || o < 0 || e < 0 || chdir(work))
				_exit(253);
			dup2(in, 0);
			dup2(o, 1);
			dup2(e, 2);
			close(in);
			close(o);
			close(e);
			char script[300];
			snprintf(script, sizeof(script), "%s/script.sh", dir);
			execl("/bin/sh", "sh", script, (char *)NULL);
			_exit(127);
		}
		int st = 0;
		if (pid > 0 && waitpid(pid, &st, 0) == pid)
			rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	}

	struct outbuf ob = { 0 };
	size_t n;
	char *d = slurp(so, &n);
	out_rec(&ob, 'o', "stdout", d ? d : "", d ? n : 0);
	free(d);
	d = slurp(se, &n);
	out_rec(&ob, 'e', "stderr", d ? d : "", d ? n : 0);
	free(d);
	for (int i = 0; i < nouts; i++) {
		snprintf(path, sizeof(path), "%s/%s", work, outs[i]);
		d = slurp(path, &n);
		if (d)
			out_rec(&ob, 'F', outs[i], d, n);
		free(d);
		free((char *)outs[i]);
	}
	char hdr[128];
	int hl = snprintf(hdr, sizeof(hdr), "DONE %s %d %zu\n", id, rc, ob.len);
	write_all(hdr, hl);
	write_all(ob.p, ob.len);
	free(ob.p);
	nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---------------------------------------------------------------- main loop */

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: schedcp-agent DEVICE [IDLE_SECONDS [EPHEMERAL]]\n");
		return 2;
	}
	double idle = argc > 2 ? atof(argv[2]) : 0;
	int ephemeral = argc > 3 && atoi(argv[3]);
	ch = open(argv[1], O_RDWR | O_CLOEXEC | O_NOCTTY);
	if (ch < 0) {
		perror(argv[1]);
		return 1;
	}
	struct utsname u;
	uname(&u);
	char ready[256];
	int rl = snprintf(ready, sizeof(ready), "READY %s\n", u.release);
	write_all(ready, rl);

	double last = now();
	for (;;) {
		char *nl = memchr(inbuf, '\n', in_len);
		if (!nl) {
			if (in_len == sizeof(inbuf))
				in_len = 0; /* garbage without newlines: drop it */
			int r = fill(1000);
			reap();
			if (r < 0 && ephemeral) {
				/* the VM's owner is gone (even SIGKILLed: its socket closed): do not outlive it */
				fprintf(stderr, "schedcp-agent: the host closed the channel, powering off\n");
				power_off();
			}
			if (r < 0)
				usleep(100000); /* no host connected */
			if (r <= 0 && idle > 0 && now() - last >= idle) {
				fprintf(stderr, "schedcp-agent: idle for %.0f s, powering off\n", idle);
				power_off();
			}
			continue;
		}
		*nl = 0;
		char line[512];
		snprintf(line, sizeof(line), "%s", inbuf);
		size_t used = nl - inbuf + 1;
		memmove(inbuf, inbuf + used, in_len - used);
		in_len -= used;
		last = now();

		char cmd[16] = "", id[64] = "";
		unsigned long long len = 0;
		int nf = sscanf(line, "%15s %63s %llu", cmd, id, &len);
		if (nf >= 2 && !strcmp(cmd, "PING")) {
			char out[128];
			write_all(out, snprintf(out, sizeof(out), "PONG %s\n", id));
		} else if (nf >= 1 && !strcmp(cmd, "POWEROFF")) {
			power_off();
		} else if (nf == 3 && !strcmp(cmd, "RUN") && len <= MAX_BODY && safe_name(id) && !strchr(id, '/')) {
			handle_run(id, len);
			last = now();
		} else if (nf >= 1) {
			char out[600];
			write_all(out, snprintf(out, sizeof(out), "ERR bad request: %.500s\n", line));
		}
	}
}
