// SPDX-License-Identifier: GPL-2.0-only
/*
 * schedcp-loader: a generic libbpf loader for sched_ext schedulers (runs inside the sandbox guest,
 * or on a host with sched_ext).
 *
 * It does, for any BPF object, what the kernel's per-scheduler C loaders do with their skeletons:
 *   - fills every `__SCX_<NAME>` rodata variable with the running kernel's BTF enum value <NAME>
 *     (SCX_ENUM_INIT; without it scx_simple dies at once because e.g. SCX_DSQ_GLOBAL reads as 0),
 *   - sets `const volatile` rodata parameters by name, type-checked against the object's BTF,
 *   - sets map sizes, the ops' hotplug_seq, and optionally sched_ext_ops.timeout_ms (watchdog),
 *   - sizes the user-exit-info dump buffer (UEI_SET_SIZE),
 *   - loads (capturing libbpf's output, which includes the kernel verifier log of a rejected
 *     program, with source lines when the object carries BTF line info),
 *   - attaches the struct_ops link and checks /sys/kernel/sched_ext,
 *   - reports per-program verified and translated instruction counts,
 *   - then detaches after a moment of scheduling (--verify: an error exit then fails it) or stays
 *     attached (--run) until a signal, the duration, or the kernel disabling the scheduler, and
 *     reports the user exit info (kind, reason, message) once the kernel finished disabling it.
 *
 * --verify --load-only stops after the load: the kernel verifier has run on every program, and
 * nothing is attached, so no scheduler ever takes over the CPUs. This is the only mode used on a
 * host kernel before a deployment token exists.
 *
 * stdout: exactly one JSON object. stderr: a human log. Exit: 0 ok, 1 rejected/failed, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#define MAX_PARAMS 64
#define SCX_SYSFS "/sys/kernel/sched_ext"
#define SCX_EXIT_ERROR 1024   /* enum scx_exit_kind: this and above are errors */
#define VERIFY_SETTLE_MS 20   /* --verify keeps the scheduler attached at least this long */
#define POLL_US 2000          /* between reads of the sched_ext state */

/* ---------- a growable text buffer and JSON output ---------- */

struct buf {
	char *p;
	size_t len, cap;
};

static void buf_add(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p)
			return;
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void buf_printf(struct buf *b, const char *fmt, ...)
{
	char tmp[8192];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n > 0)
		buf_add(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

static void buf_json_str(struct buf *b, const char *s)
{
	buf_add(b, "\"", 1);
	for (; s && *s; s++) {
		unsigned char c = (unsigned char)*s;
		char esc[8];
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = c;
			buf_add(b, esc, 2);
		} else if (c == '\n') {
			buf_add(b, "\\n", 2);
		} else if (c == '\t') {
			buf_add(b, "\\t", 2);
		} else if (c < 0x20 || c == 0x7f) {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			buf_add(b, esc, 6);
		} else {
			buf_add(b, (const char *)&c, 1);
		}
	}
	buf_add(b, "\"", 1);
}

/* everything the JSON result will say */
static struct {
	const char *stage;
	bool ok;
	char error[1024];
	struct buf log;      /* libbpf + kernel verifier output */
	struct buf programs; /* JSON array body */
	struct buf enums;    /* JSON object body: filled __SCX_ values */
	struct buf missing;  /* JSON array body: enums not in kernel BTF */
	struct buf params;   /* JSON object body: params set */
	char ops_name[160];
	char state_attached[32];
	char state_final[32];
	char root_ops[160];
	bool have_uei;
	int uei_kind;
	char uei_kind_name[64];
	long long uei_exit_code;
	char uei_reason[129];
	char uei_msg[1025];
	char *uei_dump;
	double run_s;
	const char *stop_reason;
	struct buf timings; /* JSON object body: seconds per phase */
	const char *enums_from; /* "table" (ENUMS_PATH) or "btf" (the kernel's BTF parsed here) */
} R = { .stage = "start" };

static double now_s(void);
static double t_mark;
/* record how long the phase that ends now took */
static void mark(const char *phase)
{
	double t = now_s();
	buf_printf(&R.timings, "%s\"%s\": %.4f", R.timings.len ? ", " : "", phase, t - t_mark);
	t_mark = t;
}

static void fail(const char *stage, const char *fmt, ...)
{
	va_list ap;
	R.stage = stage;
	va_start(ap, fmt);
	vsnprintf(R.error, sizeof(R.error), fmt, ap);
	va_end(ap);
	fprintf(stderr, "loader: %s: %s\n", stage, R.error);
}

static void emit_result(void)
{
	struct buf o = { 0 };
	buf_printf(&o, "{\"ok\": %s, \"stage\": ", R.ok ? "true" : "false");
	buf_json_str(&o, R.stage);
	buf_printf(&o, ", \"error\": ");
	if (R.error[0])
		buf_json_str(&o, R.error);
	else
		buf_printf(&o, "null");
	buf_printf(&o, ", \"ops_name\": ");
	buf_json_str(&o, R.ops_name);
	buf_printf(&o, ", \"sched_ext\": {\"state_attached\": ");
	buf_json_str(&o, R.state_attached);
	buf_printf(&o, ", \"root_ops\": ");
	buf_json_str(&o, R.root_ops);
	buf_printf(&o, ", \"state_final\": ");
	buf_json_str(&o, R.state_final);
	buf_printf(&o, "}, \"programs\": [%s], \"enums_set\": {%s}, \"enums_missing\": [%s], \"params\": {%s}",
		   R.programs.p ? R.programs.p : "", R.enums.p ? R.enums.p : "",
		   R.missing.p ? R.missing.p : "", R.params.p ? R.params.p : "");
	buf_printf(&o, ", \"uei\": ");
	if (R.have_uei) {
		buf_printf(&o, "{\"kind\": %d, \"kind_name\": ", R.uei_kind);
		buf_json_str(&o, R.uei_kind_name);
		buf_printf(&o, ", \"exit_code\": %lld, \"reason\": ", R.uei_exit_code);
		buf_json_str(&o, R.uei_reason);
		buf_printf(&o, ", \"message\": ");
		buf_json_str(&o, R.uei_msg);
		buf_printf(&o, ", \"dump\": ");
		buf_json_str(&o, R.uei_dump ? R.uei_dump : "");
		buf_printf(&o, "}");
	} else {
		buf_printf(&o, "null");
	}
	buf_printf(&o, ", \"run_s\": %.3f, \"stop_reason\": ", R.run_s);
	if (R.stop_reason)
		buf_json_str(&o, R.stop_reason);
	else
		buf_printf(&o, "null");
	buf_printf(&o, ", \"timings\": {%s}, \"enums_from\": ", R.timings.p ? R.timings.p : "");
	buf_json_str(&o, R.enums_from ? R.enums_from : "");
	buf_printf(&o, ", \"log\": ");
	buf_json_str(&o, R.log.p ? R.log.p : "");
	buf_printf(&o, "}\n");
	fwrite(o.p, 1, o.len, stdout);
	fflush(stdout);
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char tmp[65536];
	va_list ap2;
	va_copy(ap2, ap);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap2);
	va_end(ap2);
	if (n <= 0)
		return n;
	if ((size_t)n >= sizeof(tmp)) {
		/* a long verifier log: format it whole */
		char *big = malloc((size_t)n + 1);
		if (big) {
			vsnprintf(big, (size_t)n + 1, fmt, ap);
			buf_add(&R.log, big, (size_t)n);
			fputs(big, stderr);
			free(big);
			return n;
		}
		n = sizeof(tmp) - 1;
	}
	if (level != LIBBPF_DEBUG) {
		buf_add(&R.log, tmp, (size_t)n);
		fputs(tmp, stderr);
	}
	return n;
}

/* ---------- sysfs ---------- */

static void read_line(const char *path, char *out, size_t len)
{
	out[0] = 0;
	FILE *f = fopen(path, "r");
	if (!f)
		return;
	if (fgets(out, (int)len, f)) {
		size_t n = strlen(out);
		while (n && (out[n - 1] == '\n' || out[n - 1] == ' '))
			out[--n] = 0;
	}
	fclose(f);
}

/* ---------- BTF helpers ---------- */

static const struct btf_type *skip_mods(const struct btf *btf, __u32 id, __u32 *res_id)
{
	const struct btf_type *t = btf__type_by_id(btf, id);
	while (t && (btf_is_typedef(t) || btf_is_const(t) || btf_is_volatile(t) || btf_is_restrict(t) ||
		     btf_is_type_tag(t))) {
		id = t->type;
		t = btf__type_by_id(btf, id);
	}
	if (res_id)
		*res_id = id;
	return t;
}

/* A variable inside a data section map, located by name. */
struct var_loc {
	struct bpf_map *map;
	void *data;  /* the map's initial value (mmaped) */
	size_t off, size;
	__u32 type_id;
};

typedef int (*var_cb)(const char *name, struct var_loc *loc, void *ctx);

/* Call cb for every variable of every internal map whose section name starts with `prefix`. */
static int for_each_var(struct bpf_object *obj, const char *prefix, var_cb cb, void *ctx)
{
	struct btf *btf = bpf_object__btf(obj);
	struct bpf_map *map;
	if (!btf)
		return 0;
	bpf_object__for_each_map(map, obj) {
		if (!bpf_map__is_internal(map))
			continue;
		const struct btf_type *sec = btf__type_by_id(btf, bpf_map__btf_value_type_id(map));
		if (!sec || !btf_is_datasec(sec))
			continue;
		const char *secname = btf__name_by_offset(btf, sec->name_off);
		if (strncmp(secname, prefix, strlen(prefix)) != 0)
			continue;
		size_t sz = 0;
		void *data = bpf_map__initial_value(map, &sz);
		const struct btf_var_secinfo *vs = btf_var_secinfos(sec);
		for (int i = 0; i < btf_vlen(sec); i++, vs++) {
			const struct btf_type *v = btf__type_by_id(btf, vs->type);
			if (!v || !btf_is_var(v))
				continue;
			struct var_loc loc = { map, data, vs->offset, vs->size, v->type };
			int r = cb(btf__name_by_offset(btf, v->name_off), &loc, ctx);
			if (r)
				return r;
		}
	}
	return 0;
}

/* ---------- __SCX_* enum rodata ---------- */

struct enum_want {
	char name[128];
	struct var_loc loc;
	bool found;
	unsigned long long val;
};

struct enum_ctx {
	struct enum_want *w;
	int n, cap;
};

static int collect_enum_var(const char *name, struct var_loc *loc, void *vctx)
{
	struct enum_ctx *c = vctx;
	if (strncmp(name, "__SCX_", 6) != 0 || loc->size != 8 || !loc->data)
		return 0;
	if (c->n == c->cap) {
		int cap = c->cap ? c->cap * 2 : 64;
		struct enum_want *w = realloc(c->w, sizeof(*c->w) * cap);
		if (!w) {
			fail("open", "out of memory collecting __SCX_ enum variables");
			return 1;
		}
		c->w = w;
		c->cap = cap;
	}
	struct enum_want *w = &c->w[c->n++];
	memset(w, 0, sizeof(*w));
	snprintf(w->name, sizeof(w->name), "%s", name + 2); /* "SCX_..." */
	w->loc = *loc;
	return 0;
}

static int cmp_want(const void *a, const void *b)
{
	return strcmp(((const struct enum_want *)a)->name, ((const struct enum_want *)b)->name);
}

static struct enum_want *find_want(struct enum_ctx *c, const char *name)
{
	struct enum_want key;
	snprintf(key.name, sizeof(key.name), "%s", name);
	return bsearch(&key, c->w, c->n, sizeof(*c->w), cmp_want);
}

/* ---------- the kernel's SCX_* enumerators ----------
 *
 * What the loader needs of the kernel's BTF is enumerators: the __SCX_* rodata, a flag
 * (SCX_OPS_SWITCH_PARTIAL) and the exit kinds' names. Parsing the BTF for them cost ~0.1 s of every
 * load under TCG (libbpf parses it again inside bpf_object__load). The image build writes them with
 * this loader (`--dump-enums BTF RELEASE`, from the very BTF the guest kernel carries) to ENUMS_PATH
 * in the guest: a header line `schedcp-kernel-enums 1 RELEASE BTF_BYTES`, then `TYPE BITS NAME RAW`
 * per SCX_* enumerator in BTF order. The table is used only when RELEASE and BTF_BYTES are the running
 * kernel's; else (the host, another kernel) the BTF is parsed as before.
 */
#define ENUMS_PATH "/usr/share/schedcp/kernel-enums"
#define ENUMS_MAGIC "schedcp-kernel-enums 1"

struct kenum {
	char type[64], name[96];
	bool is64;
	unsigned long long raw; /* the enumerator's bits: u32 for a 32-bit enum */
};
static struct kenum *kenums;
static int nkenums;

/* every SCX_* enumerator of `btf` in type order, as ENUMS_PATH holds them */
static int dump_enums(const char *btf_path, const char *release)
{
	struct btf *btf = btf__parse_raw(btf_path);
	struct stat st;
	if (!btf || stat(btf_path, &st)) {
		fprintf(stderr, "loader: cannot read BTF %s\n", btf_path);
		return 1;
	}
	printf("%s %s %lld\n", ENUMS_MAGIC, release, (long long)st.st_size);
	__u32 cnt = btf__type_cnt(btf);
	for (__u32 id = 1; id < cnt; id++) {
		const struct btf_type *t = btf__type_by_id(btf, id);
		bool is64 = btf_is_enum64(t);
		if (!is64 && !btf_is_enum(t))
			continue;
		const char *type = btf__name_by_offset(btf, t->name_off);
		for (int i = 0; i < btf_vlen(t); i++) {
			const struct btf_enum *e = is64 ? NULL : btf_enum(t) + i;
			const struct btf_enum64 *e64 = is64 ? btf_enum64(t) + i : NULL;
			const char *n = btf__name_by_offset(btf, is64 ? e64->name_off : e->name_off);
			if (strncmp(n, "SCX_", 4))
				continue;
			printf("%s %d %s %llu\n", type && type[0] ? type : "-", is64 ? 64 : 32, n,
			       is64 ? btf_enum64_value(e64) : (unsigned long long)(__u32)e->val);
		}
	}
	btf__free(btf);
	return fflush(stdout) ? 1 : 0;
}

/* ENUMS_PATH into kenums when it is the running kernel's (true), else nothing (false) */
static bool load_enum_table(void)
{
	FILE *f = fopen(ENUMS_PATH, "r");
	struct utsname u;
	struct stat st;
	char line[256], release[128];
	long long size;
	if (!f)
		return false;
	bool ok = fgets(line, sizeof(line), f) && !uname(&u) && !stat("/sys/kernel/btf/vmlinux", &st) &&
		  !strncmp(line, ENUMS_MAGIC " ", sizeof(ENUMS_MAGIC)) &&
		  sscanf(line + sizeof(ENUMS_MAGIC), "%127s %lld", release, &size) == 2 &&
		  !strcmp(release, u.release) && size == (long long)st.st_size;
	int cap = 0;
	while (ok && fgets(line, sizeof(line), f)) {
		struct kenum k;
		int bits;
		if (sscanf(line, "%63s %d %95s %llu", k.type, &bits, k.name, &k.raw) != 4 || (bits != 32 && bits != 64)) {
			ok = false;
			break;
		}
		k.is64 = bits == 64;
		if (nkenums == cap) {
			cap = cap ? cap * 2 : 256;
			struct kenum *n = realloc(kenums, cap * sizeof(*n));
			if (!n) {
				ok = false;
				break;
			}
			kenums = n;
		}
		kenums[nkenums++] = k;
	}
	fclose(f);
	if (!ok || !nkenums) {
		free(kenums);
		kenums = NULL;
		nkenums = 0;
		return false;
	}
	return true;
}

/* One pass over the kernel's BTF: every enum member that a __SCX_ variable asks for. */
static void fill_scx_enums(struct bpf_object *obj, const struct btf *kbtf)
{
	struct enum_ctx c = { 0 };
	for_each_var(obj, ".rodata", collect_enum_var, &c);
	if (!c.n)
		return;
	qsort(c.w, c.n, sizeof(*c.w), cmp_want);
	for (int i = 0; !kbtf && i < nkenums; i++) {
		struct enum_want *w = find_want(&c, kenums[i].name);
		if (!w || w->found)
			continue;
		w->found = true;
		w->val = kenums[i].is64 ? kenums[i].raw : (unsigned long long)(long long)(__s32)(__u32)kenums[i].raw;
	}
	__u32 cnt = kbtf ? btf__type_cnt(kbtf) : 0;
	for (__u32 id = 1; id < cnt; id++) {
		const struct btf_type *t = btf__type_by_id(kbtf, id);
		bool is64 = btf_is_enum64(t);
		if (!is64 && !btf_is_enum(t))
			continue;
		for (int i = 0; i < btf_vlen(t); i++) {
			const struct btf_enum *e = is64 ? NULL : btf_enum(t) + i;
			const struct btf_enum64 *e64 = is64 ? btf_enum64(t) + i : NULL;
			const char *n = btf__name_by_offset(kbtf, is64 ? e64->name_off : e->name_off);
			if (strncmp(n, "SCX_", 4))
				continue;
			struct enum_want *w = find_want(&c, n);
			if (!w || w->found)
				continue;
			w->found = true;
			/* btf_enum.val is an __s32: the C loaders' `*v = e->val` sign-extends it into
			 * the u64 whatever the enum's signedness; do the same */
			w->val = is64 ? btf_enum64_value(e64) : (unsigned long long)(long long)(__s32)e->val;
		}
	}
	for (int i = 0; i < c.n; i++) {
		struct enum_want *w = &c.w[i];
		unsigned long long v = w->found ? w->val : 0;
		memcpy((char *)w->loc.data + w->loc.off, &v, 8);
		if (w->found) {
			buf_printf(&R.enums, "%s\"%s\": %llu", R.enums.len ? ", " : "", w->name, v);
		} else {
			buf_printf(&R.missing, "%s\"%s\"", R.missing.len ? ", " : "", w->name);
		}
	}
	free(c.w);
}

/* ---------- parameters ---------- */

struct param {
	const char *name, *value;
	bool done;
};
static struct param params[MAX_PARAMS];
static int nparams;

struct param_ctx {
	struct btf *btf;
	int err;
};

static int set_param_var(const char *name, struct var_loc *loc, void *vctx)
{
	struct param_ctx *c = vctx;
	for (int i = 0; i < nparams; i++) {
		struct param *p = &params[i];
		if (p->done || strcmp(p->name, name))
			continue;
		p->done = true;
		if (!loc->data) {
			fail("params", "parameter %s: its section has no data", name);
			c->err = 1;
			return 1;
		}
		const struct btf_type *t = skip_mods(c->btf, loc->type_id, NULL);
		bool is_signed = false, is_bool = false;
		if (t && btf_is_int(t)) {
			__u8 enc = btf_int_encoding(t);
			is_signed = enc & BTF_INT_SIGNED;
			is_bool = enc & BTF_INT_BOOL;
		} else if (t && (btf_is_enum(t) || btf_is_enum64(t))) {
			is_signed = btf_kflag(t);
		} else {
			fail("params", "parameter %s is not an integer or bool (only int/unsigned/bool/u64 can be set)", name);
			c->err = 1;
			return 1;
		}
		size_t sz = loc->size;
		const char *v = p->value;
		unsigned long long u = 0;
		char *end = NULL;
		errno = 0;
		if (is_bool || sz == 1) {
			if (!strcmp(v, "true") || !strcmp(v, "1"))
				u = 1;
			else if (!strcmp(v, "false") || !strcmp(v, "0"))
				u = 0;
			else if (is_bool) {
				fail("params", "parameter %s is a bool: value %s is not true/false/1/0", name, v);
				c->err = 1;
				return 1;
			} else
				goto parse_int;
		} else {
parse_int:
			if (is_signed) {
				long long s = strtoll(v, &end, 0);
				long long lo = sz >= 8 ? LLONG_MIN : -(1LL << (sz * 8 - 1));
				long long hi = sz >= 8 ? LLONG_MAX : (1LL << (sz * 8 - 1)) - 1;
				if (errno || !*v || *end || s < lo || s > hi) {
					fail("params", "parameter %s (signed %zu-byte integer): bad value %s", name, sz, v);
					c->err = 1;
					return 1;
				}
				u = (unsigned long long)s;
			} else {
				if (v[0] == '-') {
					fail("params", "parameter %s is unsigned: bad value %s", name, v);
					c->err = 1;
					return 1;
				}
				u = strtoull(v, &end, 0);
				unsigned long long hi = sz >= 8 ? ULLONG_MAX : (1ULL << (sz * 8)) - 1;
				if (errno || !*v || *end || u > hi) {
					fail("params", "parameter %s (unsigned %zu-byte integer): bad value %s", name, sz, v);
					c->err = 1;
					return 1;
				}
			}
		}
		char *dst = (char *)loc->data + loc->off;
		switch (sz) {
		case 1: { __u8 x = u; memcpy(dst, &x, 1); break; }
		case 2: { __u16 x = u; memcpy(dst, &x, 2); break; }
		case 4: { __u32 x = u; memcpy(dst, &x, 4); break; }
		case 8: memcpy(dst, &u, 8); break;
		default:
			fail("params", "parameter %s has unsupported size %zu", name, sz);
			c->err = 1;
			return 1;
		}
		buf_printf(&R.params, "%s\"%s\": ", R.params.len ? ", " : "", name);
		buf_json_str(&R.params, v);
	}
	return 0;
}

/* ---------- struct_ops member access ---------- */

static struct bpf_object *g_obj; /* the object being loaded (libbpf 1.5 has no bpf_map__object) */

static void *ops_member(struct bpf_map *ops, const char *member, size_t *size)
{
	struct btf *btf = bpf_object__btf(g_obj);
	size_t vsz;
	void *data = bpf_map__initial_value(ops, &vsz);
	const struct btf_type *t = skip_mods(btf, bpf_map__btf_value_type_id(ops), NULL);
	if (!data || !t || !btf_is_struct(t))
		return NULL;
	const struct btf_member *m = btf_members(t);
	for (int i = 0; i < btf_vlen(t); i++, m++) {
		if (strcmp(btf__name_by_offset(btf, m->name_off), member))
			continue;
		__u32 off = btf_member_bit_offset(t, i) / 8;
		if (size) {
			__s64 s = btf__resolve_size(btf, m->type);
			*size = s > 0 ? (size_t)s : 0;
		}
		return (char *)data + off;
	}
	return NULL;
}

static bool set_ops_u32(struct bpf_map *ops, const char *member, __u64 v)
{
	size_t sz = 0;
	void *p = ops_member(ops, member, &sz);
	if (!p)
		return false;
	if (sz == 4) {
		__u32 x = v;
		memcpy(p, &x, 4);
	} else if (sz == 8) {
		memcpy(p, &v, 8);
	} else
		return false;
	return true;
}

/* ---------- user exit info ---------- */

struct uei_loc {
	struct btf *btf;
	struct var_loc loc;
	bool found;
	char name[128];
};

static int find_uei_var(const char *name, struct var_loc *loc, void *vctx)
{
	struct uei_loc *u = vctx;
	const struct btf_type *t = skip_mods(u->btf, loc->type_id, NULL);
	if (t && btf_is_struct(t) && !strcmp(btf__name_by_offset(u->btf, t->name_off), "user_exit_info")) {
		u->loc = *loc;
		u->found = true;
		snprintf(u->name, sizeof(u->name), "%s", name);
		return 1;
	}
	return 0;
}

static long struct_member_off(struct btf *btf, __u32 type_id, const char *member)
{
	const struct btf_type *t = skip_mods(btf, type_id, NULL);
	if (!t || !btf_is_struct(t))
		return -1;
	const struct btf_member *m = btf_members(t);
	for (int i = 0; i < btf_vlen(t); i++, m++)
		if (!strcmp(btf__name_by_offset(btf, m->name_off), member))
			return btf_member_bit_offset(t, i) / 8;
	return -1;
}

/* the value of the kernel enumerator `name` (any enum), from its BTF */
static bool kernel_enum_value(const struct btf *kbtf, const char *name, unsigned long long *out)
{
	for (int i = 0; !kbtf && i < nkenums; i++) {
		if (!strcmp(kenums[i].name, name)) {
			*out = kenums[i].raw;
			return true;
		}
	}
	__u32 cnt = kbtf ? btf__type_cnt(kbtf) : 0;
	for (__u32 id = 1; id < cnt; id++) {
		const struct btf_type *t = btf__type_by_id(kbtf, id);
		bool is64 = btf_is_enum64(t);
		if (!is64 && !btf_is_enum(t))
			continue;
		for (int i = 0; i < btf_vlen(t); i++) {
			const struct btf_enum *e = is64 ? NULL : btf_enum(t) + i;
			const struct btf_enum64 *e64 = is64 ? btf_enum64(t) + i : NULL;
			if (strcmp(btf__name_by_offset(kbtf, is64 ? e64->name_off : e->name_off), name))
				continue;
			*out = is64 ? btf_enum64_value(e64) : (unsigned long long)(__u32)e->val;
			return true;
		}
	}
	return false;
}

static const char *exit_kind_name(const struct btf *kbtf, int kind)
{
	static char name[64];
	for (int i = 0; !kbtf && i < nkenums; i++) {
		if (!kenums[i].is64 && !strcmp(kenums[i].type, "scx_exit_kind") && (__s32)(__u32)kenums[i].raw == kind) {
			snprintf(name, sizeof(name), "%s", kenums[i].name);
			return name;
		}
	}
	__s32 id = kbtf ? btf__find_by_name_kind(kbtf, "scx_exit_kind", BTF_KIND_ENUM) : -1;
	if (id > 0) {
		const struct btf_type *t = btf__type_by_id(kbtf, id);
		const struct btf_enum *e = btf_enum(t);
		for (int i = 0; i < btf_vlen(t); i++, e++)
			if (e->val == kind) {
				snprintf(name, sizeof(name), "%s", btf__name_by_offset(kbtf, e->name_off));
				return name;
			}
	}
	snprintf(name, sizeof(name), "%d", kind);
	return name;
}

static int uei_kind_now(struct uei_loc *u)
{
	if (!u->found || !u->loc.data)
		return 0;
	long off = struct_member_off(u->btf, u->loc.type_id, "kind");
	if (off < 0)
		return 0;
	return __atomic_load_n((int *)((char *)u->loc.data + u->loc.off + off), __ATOMIC_SEQ_CST);
}

static void read_uei(struct uei_loc *u, struct bpf_object *obj, const struct btf *kbtf)
{
	if (!u->found || !u->loc.data)
		return;
	char *base = (char *)u->loc.data + u->loc.off;
	long o;
	R.have_uei = true;
	R.uei_kind = uei_kind_now(u);
	snprintf(R.uei_kind_name, sizeof(R.uei_kind_name), "%s", exit_kind_name(kbtf, R.uei_kind));
	if ((o = struct_member_off(u->btf, u->loc.type_id, "exit_code")) >= 0)
		memcpy(&R.uei_exit_code, base + o, 8);
	if ((o = struct_member_off(u->btf, u->loc.type_id, "reason")) >= 0)
		snprintf(R.uei_reason, sizeof(R.uei_reason), "%.*s", 128, base + o);
	if ((o = struct_member_off(u->btf, u->loc.type_id, "msg")) >= 0)
		snprintf(R.uei_msg, sizeof(R.uei_msg), "%.*s", 1024, base + o);
	/* the dump buffer lives in its own section ".data.<uei>_dump" */
	char sec[160];
	snprintf(sec, sizeof(sec), ".data.%s_dump", u->name);
	struct bpf_map *map;
	struct btf *btf = bpf_object__btf(obj);
	bpf_object__for_each_map(map, obj) {
		const struct btf_type *t = btf__type_by_id(btf, bpf_map__btf_value_type_id(map));
		if (!t || !btf_is_datasec(t) || strcmp(btf__name_by_offset(btf, t->name_off), sec))
			continue;
		size_t sz = 0;
		char *d = bpf_map__initial_value(map, &sz);
		if (d && sz && d[0]) {
			size_t n = strnlen(d, sz);
			if (n > 16384)
				n = 16384;
			R.uei_dump = strndup(d, n);
		}
	}
}

/* UEI_SET_SIZE: size the dump buffer to the ops' exit_dump_len (or the default) before load. */
static void size_uei_dump(struct bpf_object *obj, struct bpf_map *ops, struct uei_loc *u)
{
	if (!u->found)
		return;
	__u32 len = 0;
	size_t sz = 0;
	void *p = ops_member(ops, "exit_dump_len", &sz);
	if (p && sz == 4)
		memcpy(&len, p, 4);
	if (!len)
		len = 32768;
	char want[160], sec[160];
	snprintf(want, sizeof(want), "%s_dump_len", u->name);
	snprintf(sec, sizeof(sec), ".data.%s_dump", u->name);
	struct btf *btf = bpf_object__btf(obj);
	struct bpf_map *map;
	bpf_object__for_each_map(map, obj) {
		const struct btf_type *t = btf__type_by_id(btf, bpf_map__btf_value_type_id(map));
		if (!t || !btf_is_datasec(t))
			continue;
		const char *name = btf__name_by_offset(btf, t->name_off);
		if (!strcmp(name, sec)) {
			bpf_map__set_value_size(map, len);
		} else if (!strncmp(name, ".rodata", 7)) {
			size_t msz;
			char *d = bpf_map__initial_value(map, &msz);
			const struct btf_var_secinfo *vs = btf_var_secinfos(t);
			for (int i = 0; d && i < btf_vlen(t); i++, vs++) {
				const struct btf_type *v = btf__type_by_id(btf, vs->type);
				if (v && btf_is_var(v) && !strcmp(btf__name_by_offset(btf, v->name_off), want) &&
				    vs->size == 4)
					memcpy(d + vs->offset, &len, 4);
			}
		}
	}
}

/* ---------- main ---------- */

static volatile sig_atomic_t stop_signal;
static void on_signal(int sig) { stop_signal = sig; }

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: schedcp-loader OBJ.bpf.o (--verify [--load-only] | --run [--duration S])\n"
		"       [--param NAME=VALUE]... [--map-size MAP=N]... [--timeout-ms N] [--partial]\n"
		"  --load-only  load (the kernel verifier runs) and unload; never attach\n"
		"       schedcp-loader --dump-enums BTF RELEASE   (the image build's " ENUMS_PATH ")\n");
}

static void report_programs(struct bpf_object *obj)
{
	struct bpf_program *prog;
	bpf_object__for_each_program(prog, obj) {
		int fd = bpf_program__fd(prog);
		struct bpf_prog_info info = { 0 };
		__u32 len = sizeof(info);
		buf_printf(&R.programs, "%s{\"name\": ", R.programs.len ? ", " : "");
		buf_json_str(&R.programs, bpf_program__name(prog));
		buf_printf(&R.programs, ", \"section\": ");
		buf_json_str(&R.programs, bpf_program__section_name(prog));
		if (fd >= 0 && !bpf_prog_get_info_by_fd(fd, &info, &len))
			buf_printf(&R.programs,
				   ", \"loaded\": true, \"verified_insns\": %u, \"xlated_insns\": %u, \"jited_bytes\": %u}",
				   info.verified_insns, info.xlated_prog_len / 8, info.jited_prog_len);
		else
			buf_printf(&R.programs, ", \"loaded\": false, \"insns\": %zu}", bpf_program__insn_cnt(prog));
	}
}

/* ---------- main: options, then open -> set -> load -> attach -> run -> detach ---------- */

struct opts {
	const char *path;
	bool verify, run, load_only, partial;
	double duration;
	long timeout_ms;
	struct { const char *map; long n; } sizes[MAX_PARAMS];
	int nsizes;
};

/* a whole-string decimal/hex/octal integer in [lo, hi] */
static bool parse_long(const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 0);
	if (errno || end == s || *end || v < lo || v > hi)
		return false;
	*out = v;
	return true;
}

static bool parse_seconds(const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= 0 && v < 1e9))
		return false;
	*out = v;
	return true;
}

/* 0, or 2 with R.error saying which argument is wrong */
static int parse_args(int argc, char **argv, struct opts *o)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		char *next = i + 1 < argc ? argv[i + 1] : NULL;
		char *eq = next ? strchr(next, '=') : NULL;
		if (!strcmp(a, "--verify")) {
			o->verify = true;
		} else if (!strcmp(a, "--load-only")) {
			o->load_only = true;
		} else if (!strcmp(a, "--run")) {
			o->run = true;
		} else if (!strcmp(a, "--partial")) {
			o->partial = true;
		} else if (!strcmp(a, "--duration") && next) {
			if (!parse_seconds(next, &o->duration)) {
				fail("usage", "--duration wants seconds (a number >= 0), not %s", next);
				return 2;
			}
			i++;
		} else if (!strcmp(a, "--timeout-ms") && next) {
			if (!parse_long(next, 1, 3600000, &o->timeout_ms)) {
				fail("usage", "--timeout-ms wants milliseconds 1..3600000, not %s", next);
				return 2;
			}
			i++;
		} else if (!strcmp(a, "--param") && eq) {
			if (nparams == MAX_PARAMS) {
				fail("usage", "more than %d --param", MAX_PARAMS);
				return 2;
			}
			*eq = 0;
			params[nparams].name = next;
			params[nparams++].value = eq + 1;
			i++;
		} else if (!strcmp(a, "--map-size") && eq) {
			if (o->nsizes == MAX_PARAMS) {
				fail("usage", "more than %d --map-size", MAX_PARAMS);
				return 2;
			}
			*eq = 0;
			if (!parse_long(eq + 1, 1, UINT32_MAX, &o->sizes[o->nsizes].n)) {
				fail("params", "cannot size map %s to %s (wants an integer 1..%u)", next, eq + 1, UINT32_MAX);
				return 2;
			}
			o->sizes[o->nsizes++].map = next;
			i++;
		} else if (a[0] != '-' && !o->path) {
			o->path = a;
		} else {
			fail("usage", "unknown or incomplete argument: %s", a);
			return 2;
		}
	}
	if (!o->path || o->verify == o->run) {
		fail("usage", "need one object and exactly one of --verify / --run");
		return 2;
	}
	if (o->load_only && !o->verify) {
		fail("usage", "--load-only goes with --verify");
		return 2;
	}
	return 0;
}

/* everything set before the load: hotplug_seq, __SCX_ enums, parameters, map sizes, watchdog */
static int set_up(struct bpf_object *obj, struct bpf_map *ops, const struct btf *kbtf, const struct opts *o)
{
	char seq[32];
	read_line(SCX_SYSFS "/hotplug_seq", seq, sizeof(seq));
	if (seq[0])
		set_ops_u32(ops, "hotplug_seq", strtoull(seq, NULL, 10));
	fill_scx_enums(obj, kbtf);
	mark("enums");

	R.stage = "params";
	struct param_ctx pc = { bpf_object__btf(obj), 0 };
	if (nparams) {
		for_each_var(obj, ".rodata", set_param_var, &pc);
		if (pc.err)
			return 2;
		for (int i = 0; i < nparams; i++) {
			if (!params[i].done) {
				fail("params", "unknown parameter %s: no const volatile variable of that name in .rodata",
				     params[i].name);
				return 2;
			}
		}
	}
	for (int i = 0; i < o->nsizes; i++) {
		struct bpf_map *m = bpf_object__find_map_by_name(obj, o->sizes[i].map);
		if (!m || bpf_map__set_max_entries(m, (__u32)o->sizes[i].n)) {
			fail("params", "cannot size map %s to %ld (no such map)", o->sizes[i].map, o->sizes[i].n);
			return 2;
		}
	}
	if (o->timeout_ms > 0 && !set_ops_u32(ops, "timeout_ms", (__u64)o->timeout_ms)) {
		fail("params", "cannot set sched_ext_ops.timeout_ms");
		return 2;
	}
	/* partial mode: only tasks whose policy is SCHED_EXT run on this scheduler, every other task
	 * stays on the fair class (a scoped deployment moves exactly its tasks there) */
	if (o->partial) {
		unsigned long long bit = 0;
		if (!kernel_enum_value(kbtf, "SCX_OPS_SWITCH_PARTIAL", &bit) || !bit) {
			fail("params", "this kernel's BTF has no SCX_OPS_SWITCH_PARTIAL: partial mode is not supported");
			return 2;
		}
		size_t sz = 0;
		void *p = ops_member(ops, "flags", &sz);
		if (!p || sz != 8) {
			fail("params", "cannot set SCX_OPS_SWITCH_PARTIAL: no 64-bit sched_ext_ops.flags");
			return 2;
		}
		__u64 flags;
		memcpy(&flags, p, 8);
		flags |= bit;
		memcpy(p, &flags, 8);
	}
	/* no pinning: a map marked LIBBPF_PIN_BY_NAME would outlive us in /sys/fs/bpf (a verify must
	 * leave nothing behind) or be reused from someone else's pin; this loader is the scheduler's
	 * only userspace, so its maps stay private to this load */
	struct bpf_map *map;
	bpf_object__for_each_map(map, obj)
		bpf_map__set_pin_path(map, NULL);
	return 0;
}

/* wait (up to ~2 s) for the kernel to finish disabling: only then has the scheduler's exit
 * callback recorded its UEI, so reading it earlier loses the scheduler's own reason */
static void wait_disabled(char *state, size_t len)
{
	for (int i = 0; i < 2000000 / POLL_US; i++) {
		read_line(SCX_SYSFS "/state", state, len);
		if (!strcmp(state, "disabled"))
			return;
		usleep(POLL_US);
	}
}

/* --verify's moment of real scheduling: this thread runs on every CPU it may use, twice (each move
 * and each short sleep is a select_cpu, enqueue, dispatch, running and stopping of the scheduler on
 * that CPU), and then sleeps out VERIFY_SETTLE_MS (a few ticks), so an error a scheduler raises on
 * its first events (a map its loader should have sized, a userspace half that is missing) shows
 * here, not after a deploy. A 200 ms sleep did this before: longer, and without reaching each CPU. */
static void settle(struct uei_loc *uei)
{
	double t0 = now_s();
	cpu_set_t all, one;
	bool pinned = !sched_getaffinity(0, sizeof(all), &all);
	for (int round = 0; pinned && round < 2 && !uei_kind_now(uei); round++) {
		for (int c = 0; c < CPU_SETSIZE && !uei_kind_now(uei); c++) {
			if (!CPU_ISSET(c, &all))
				continue;
			CPU_ZERO(&one);
			CPU_SET(c, &one);
			if (!sched_setaffinity(0, sizeof(one), &one))
				usleep(1000);
		}
	}
	if (pinned)
		sched_setaffinity(0, sizeof(all), &all);
	while (now_s() - t0 < VERIFY_SETTLE_MS / 1000.0 && !uei_kind_now(uei))
		usleep(POLL_US);
	mark("settle");
}

/* stays attached until a signal, the duration, or the scheduler's/kernel's exit; true = it exited */
static bool run_attached(struct uei_loc *uei, double duration)
{
	double t0 = now_s();
	bool exited = false;
	R.stage = "run";
	for (;;) {
		char st[32];
		if (stop_signal) {
			R.stop_reason = "signal";
			break;
		}
		if (duration > 0 && now_s() - t0 >= duration) {
			R.stop_reason = "duration";
			break;
		}
		if (uei_kind_now(uei)) {
			R.stop_reason = "scheduler_exited";
			exited = true;
			break;
		}
		read_line(SCX_SYSFS "/state", st, sizeof(st));
		if (strcmp(st, "enabled")) {
			R.stop_reason = "kernel_disabled";
			exited = true;
			break;
		}
		usleep(100000);
	}
	R.run_s = now_s() - t0;
	mark("run");
	return exited;
}

int main(int argc, char **argv)
{
	struct opts o = { .timeout_ms = -1 };
	struct bpf_object *obj = NULL;
	struct btf *kbtf = NULL;
	struct bpf_link *link = NULL;
	struct bpf_map *ops = NULL, *map;
	struct uei_loc uei = { 0 };
	if (argc == 4 && !strcmp(argv[1], "--dump-enums"))
		return dump_enums(argv[2], argv[3]); /* the image build's ENUMS_PATH */
	int rc = parse_args(argc, argv, &o);

	if (rc) {
		usage();
		goto out;
	}
	t_mark = now_s();
	libbpf_set_print(libbpf_print);
	struct sigaction sa = { .sa_handler = on_signal };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	rc = 1;
	if (access(SCX_SYSFS "/state", R_OK)) {
		fail("kernel", "this kernel has no sched_ext (%s/state missing)", SCX_SYSFS);
		goto out;
	}
	R.stage = "open";
	obj = g_obj = bpf_object__open_file(o.path, NULL);
	if (!obj) {
		fail("open", "cannot open %s as a BPF object: %s", o.path, strerror(errno));
		goto out;
	}
	mark("open");
	R.enums_from = "table";
	if (!load_enum_table()) {
		R.enums_from = "btf";
		kbtf = btf__load_vmlinux_btf();
	}
	mark("kernel_btf");
	if (!kbtf && !nkenums) {
		fail("open", "cannot read the kernel's BTF: %s", strerror(errno));
		goto out;
	}
	bpf_object__for_each_map(map, obj)
		if (bpf_map__type(map) == BPF_MAP_TYPE_STRUCT_OPS)
			ops = map;
	if (!ops) {
		fail("open", "no struct_ops map: not a sched_ext scheduler (needs SEC(\".struct_ops.link\") struct sched_ext_ops)");
		goto out;
	}
	size_t nsz = 0;
	char *n = ops_member(ops, "name", &nsz);
	if (n)
		snprintf(R.ops_name, sizeof(R.ops_name), "%.*s", (int)nsz, n);

	if ((rc = set_up(obj, ops, kbtf, &o)))
		goto out;
	rc = 1;
	uei.btf = bpf_object__btf(obj);
	for_each_var(obj, ".data", find_uei_var, &uei);
	size_uei_dump(obj, ops, &uei);

	R.stage = "load";
	mark("params");
	int err = bpf_object__load(obj);
	mark("load");
	report_programs(obj);
	if (err) {
		fail("load", "the kernel rejected the object: %s", strerror(-err));
		goto out;
	}
	if (o.load_only) {
		/* every program passed the verifier; closing the object unloads them, unattached */
		read_line(SCX_SYSFS "/state", R.state_final, sizeof(R.state_final));
		goto done;
	}
	/* after load, the data sections are mmaped onto the live maps: re-locate the uei */
	uei.found = false;
	for_each_var(obj, ".data", find_uei_var, &uei);

	R.stage = "attach";
	link = bpf_map__attach_struct_ops(ops);
	if (!link) {
		int e = errno;
		wait_disabled(R.state_final, sizeof(R.state_final));
		read_uei(&uei, obj, kbtf);
		fail("attach", "attaching the sched_ext ops failed: %s%s%s", strerror(e),
		     R.uei_reason[0] ? " — " : "", R.uei_reason[0] ? R.uei_reason : "");
		goto out;
	}
	mark("attach");
	R.stage = "enabled";
	for (int i = 0; i < 1000000 / POLL_US; i++) {
		read_line(SCX_SYSFS "/state", R.state_attached, sizeof(R.state_attached));
		if (strcmp(R.state_attached, "enabling"))
			break;
		usleep(POLL_US);
	}
	read_line(SCX_SYSFS "/root/ops", R.root_ops, sizeof(R.root_ops));
	if (strcmp(R.state_attached, "enabled")) {
		bpf_link__destroy(link);
		link = NULL;
		wait_disabled(R.state_final, sizeof(R.state_final));
		read_uei(&uei, obj, kbtf);
		fail("enabled", "sched_ext state is '%s' after attach, not 'enabled'%s%s", R.state_attached,
		     R.uei_reason[0] ? ": " : "", R.uei_reason[0] ? R.uei_reason : "");
		goto out;
	}
	fprintf(stderr, "loader: %s enabled (root/ops=%s)\n", R.ops_name, R.root_ops);
	if (o.verify)
		settle(&uei);

	bool exited = o.run && run_attached(&uei, o.duration);
	R.stage = "detach";
	bpf_link__destroy(link);
	link = NULL;
	wait_disabled(R.state_final, sizeof(R.state_final));
	mark("detach");
	read_uei(&uei, obj, kbtf);
	if (exited) {
		fail("run", "the scheduler was disabled while running: %s%s%s",
		     R.uei_reason[0] ? R.uei_reason : R.stop_reason, R.uei_msg[0] ? " — " : "", R.uei_msg);
		goto out;
	}
	if (R.uei_kind >= SCX_EXIT_ERROR) {
		fail("enabled", "the scheduler exited with an error right after it was enabled: %s%s%s",
		     R.uei_reason, R.uei_msg[0] ? " — " : "", R.uei_msg);
		goto out;
	}
done:
	R.stage = "done";
	R.ok = true;
	rc = 0;
out:
	emit_result();
	if (link)
		bpf_link__destroy(link);
	if (obj)
		bpf_object__close(obj);
	btf__free(kbtf);
	free(R.uei_dump);
	free(kenums);
	return rc;
}
