// SPDX-License-Identifier: GPL-2.0-only
/*
 * runqwait: how long each task waits on a run queue, whichever scheduler is in charge.
 *
 * A task becomes runnable when it is woken (sched_wakeup, sched_wakeup_new) or when it is switched
 * out while still runnable (sched_switch with prev_state == TASK_RUNNING: preempted, slice expired,
 * yielded). Its wait ends when it is switched in. Per task (pid) the map rqw_tasks keeps the longest
 * single wait, the sum and count of waits, how many reached OVER_NS and STARVE_NS, and the task's comm, tgid and
 * the CPU it waited for; rqw_hist is the log2 histogram (ns) of every wait.
 *
 * What explains the waits (the evidence a diagnosis reads, validate/evidence.py), in the same window:
 *   per task   migrations (sched_migrate_task), involuntary switches (switched out still runnable:
 *              preempted or slice expired), wakeups it received from another CPU, and the wait it
 *              caused: waits that ended when it was switched out ("behind whom": blocked_ns)
 *   rqw_wakes  the waker -> wakee graph: per (waker pid, wakee pid) how many wakeups, how many
 *              landed on another CPU than the waker's, and the wakee's wait after them
 *   rqw_cpus   per CPU: idle time, idle time while a task waited on another CPU (summed over the
 *              waits: two tasks waiting 1 ms beside an idle CPU count 2 ms), waits that ended
 *              behind the idle task (the CPU sat idle with the task queued on it: a missing kick),
 *              switches and involuntary switches
 * "Behind whom" is the task that ran just before the waiter on the CPU its wait ended on, not
 * everyone that ran during the wait: on a 2-CPU guest that is nearly always the one.
 *
 * Loaded with `bpftool prog loadall ... autoattach` (links pinned; removing the pin directory detaches
 * it) and read with `bpftool -j map dump name rqw_tasks`: no userspace half, nothing beyond bpftool
 * in the guest. The scheduler under test cannot hide a wait from it: the tracepoints belong to the
 * core scheduler, not to the sched_ext class.
 *
 * Time the guest lost to its host is not the scheduler's: under qemu TCG a vCPU stops whenever the host
 * does not run its thread (a busy host: seconds), and every task waiting then waits that long. A busy
 * CPU takes a timer interrupt every tick and switches tasks, so a gap of more than GAP_NS between two
 * such events on a CPU that was not idle is time that CPU did not run at all (rqw_cpu.lost_ns). A
 * wait is charged to the scheduler minus the time *every* CPU lost during it (the least of their
 * lost time: a CPU that ran, or idled, could have served the task); the waits' counts, maxima and the
 * histogram use that charged wait, the part excused is summed per task (excused_ns). Nothing a BPF
 * scheduler does makes a busy CPU skip its ticks, so it cannot excuse itself.
 *
 * Only waits that begin or end while rqw_on[0] is 1 are recorded (the phase switches it on once its
 * load is running and off before the load ends, with `bpftool map update`): the start-up burst of a
 * dozen processes exec'ing at once is not what a scheduler is judged by (a task's first wait may
 * reach into the window, once). A wait that began in the window is counted whenever it ends; one
 * that has not ended when the map is read is not, so the phase lets the system settle before
 * reading (a starved task runs once the competition is gone).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char _license[] SEC("license") = "GPL";

#define OVER_NS (50ULL * 1000 * 1000)	/* a wait this long is counted by name */
#define STARVE_NS (250ULL * 1000 * 1000)	/* and this long, apart (validate/starvation.py STARVE_MS) */
#define HIST_SLOTS 40
#define IN_WINDOW (1ULL << 63)	/* rqw_start: the wait began in the window */
#define GAP_NS (20ULL * 1000 * 1000)	/* no tick or switch on a busy CPU for this long: it was stopped */

struct rqw_task {
	u64 max_ns;
	u64 total_ns;
	u64 count;
	u64 over;
	u64 starved;	/* waits of STARVE_NS or more */
	u32 tgid;
	s32 cpu;	/* the CPU its longest wait ended on */
	s32 prio;	/* static priority: 120 = nice 0 */
	u32 policy;
	u32 kthread;
	char comm[16];
	u64 migrations;	/* sched_migrate_task */
	u64 involuntary;	/* switched out while still runnable */
	u64 woken_xcpu;	/* wakeups that put it on another CPU than its waker's */
	u64 blocked_ns;	/* waits that ended when this task was switched out */
	u64 blocked;
	u64 excused_ns;	/* wait time when every CPU was stopped by the host (not counted above) */
};

struct rqw_edge_key {
	u32 waker;
	u32 wakee;
};

struct rqw_edge {
	u64 count;
	u64 xcpu;	/* the wakee was queued on another CPU than the waker ran on */
	u64 wait_ns;	/* the wakee's waits that followed these wakeups */
	char waker_comm[16];
	char wakee_comm[16];
};

#define MAX_CPUS 64
#define SCAN_CPUS 8	/* CPUs looked at for idle time beside a wait (the sandbox has 2) */

struct rqw_cpu {
	u64 idle_ns;
	u64 idle_wait_ns;	/* idle while a task waited on another CPU (summed over waits) */
	u64 idle_behind_ns;	/* waits that ended behind the idle task on this CPU */
	u64 idle_behind;
	u64 switches;
	u64 involuntary;
	u64 idle_since;	/* 0: busy */
	u64 last_idle_start;
	u64 last_idle_end;
	u64 last_event;	/* last tick or switch seen on this CPU */
	u64 lost_ns;	/* busy, yet no tick or switch for more than GAP_NS: time the CPU did not run */
	u64 lost_window_ns;	/* the same, while the window was open */
};

/* rqw_start's value: when the wait began, and every CPU's lost time then */
struct rqw_begin {
	u64 ts;
	u64 lost[SCAN_CPUS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct rqw_edge_key);
	__type(value, struct rqw_edge);
} rqw_wakes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, u32);
} rqw_waker SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct rqw_cpu);
} rqw_cpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, struct rqw_begin);
} rqw_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} rqw_on SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, struct rqw_task);
} rqw_tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HIST_SLOTS);
	__type(key, u32);
	__type(value, u64);
} rqw_hist SEC(".maps");

static bool window_open(void)
{
	u32 zero = 0;
	u64 *on = bpf_map_lookup_elem(&rqw_on, &zero);

	return on && *on;
}

/* A tick or a switch on `c` at `now`: a gap since the last one while the CPU was busy is lost time. */
static void progress(struct rqw_cpu *c, u64 now, bool was_idle)
{
	if (c->last_event && !was_idle && now - c->last_event > GAP_NS) {
		c->lost_ns += now - c->last_event - GAP_NS;
		if (window_open())
			c->lost_window_ns += now - c->last_event - GAP_NS;
	}
	c->last_event = now;
}

static void queued(struct task_struct *p)
{
	struct rqw_begin b = {};
	u32 pid = p->pid;

	if (!pid)
		return;
	b.ts = bpf_ktime_get_ns();
	if (window_open())
		b.ts |= IN_WINDOW;
#pragma clang loop unroll(full)	/* constant offsets into the stack copy: the verifier wants them */
	for (u32 i = 0; i < SCAN_CPUS; i++) {
		u32 key = i;	/* i's address is never taken: it stays a constant */
		struct rqw_cpu *c = bpf_map_lookup_elem(&rqw_cpus, &key);

		if (c)
			b.lost[i] = c->lost_ns;
	}
	bpf_map_update_elem(&rqw_start, &pid, &b, BPF_ANY);
}

/* What every CPU lost since `b`: the least lost time among the CPUs that have run (ns). */
static u64 all_lost_since(struct rqw_begin *b)
{
	u64 least = ~0ULL;

#pragma clang loop unroll(full)
	for (u32 i = 0; i < SCAN_CPUS; i++) {
		u32 key = i;
		struct rqw_cpu *c = bpf_map_lookup_elem(&rqw_cpus, &key);
		u64 d;

		if (!c || !c->last_event)
			continue;
		d = c->lost_ns - b->lost[i];
		if (d < least)
			least = d;
	}
	return least == ~0ULL ? 0 : least;
}

/* the tick (and every other hrtimer) on this CPU */
SEC("tp_btf/hrtimer_expire_entry")
int BPF_PROG(rqw_timer)
{
	u32 cpu = bpf_get_smp_processor_id();
	struct rqw_cpu *c = bpf_map_lookup_elem(&rqw_cpus, &cpu);

	if (c)
		progress(c, bpf_ktime_get_ns(), c->idle_since != 0);
	return 0;
}

static u32 log2_slot(u64 v)
{
	u32 slot = 0;

	for (int i = 0; i < HIST_SLOTS - 1 && v > 1; i++) {
		v >>= 1;
		slot++;
	}
	return slot;
}

static struct rqw_task *task_entry(u32 pid)
{
	struct rqw_task fresh = {}, *t = bpf_map_lookup_elem(&rqw_tasks, &pid);

	if (t)
		return t;
	bpf_map_update_elem(&rqw_tasks, &pid, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&rqw_tasks, &pid);
}

/* a wakeup: who woke whom, and whether across CPUs (the current task is the waker; in an interrupt
 * it is whatever the interrupt landed on, pid 0 when the CPU was idle) */
static void woken(struct task_struct *p)
{
	struct task_struct *waker = bpf_get_current_task_btf();
	struct rqw_edge_key key = {};
	struct rqw_edge fresh = {}, *e;
	struct rqw_task *t;
	bool xcpu;

	queued(p);
	if (!window_open() || !p->pid)
		return;
	key.waker = waker->pid;
	key.wakee = p->pid;
	bpf_map_update_elem(&rqw_waker, &key.wakee, &key.waker, BPF_ANY);
	xcpu = p->thread_info.cpu != bpf_get_smp_processor_id();
	e = bpf_map_lookup_elem(&rqw_wakes, &key);
	if (!e) {
		bpf_probe_read_kernel_str(fresh.waker_comm, sizeof(fresh.waker_comm), waker->comm);
		bpf_probe_read_kernel_str(fresh.wakee_comm, sizeof(fresh.wakee_comm), p->comm);
		bpf_map_update_elem(&rqw_wakes, &key, &fresh, BPF_NOEXIST);
		e = bpf_map_lookup_elem(&rqw_wakes, &key);
		if (!e)
			return;
	}
	__sync_fetch_and_add(&e->count, 1);
	if (xcpu) {
		__sync_fetch_and_add(&e->xcpu, 1);
		t = task_entry(key.wakee);
		if (t)
			t->woken_xcpu++;
	}
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(rqw_wakeup, struct task_struct *p)
{
	woken(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(rqw_wakeup_new, struct task_struct *p)
{
	woken(p);
	return 0;
}

SEC("tp_btf/sched_migrate_task")
int BPF_PROG(rqw_migrate, struct task_struct *p, int dest_cpu)
{
	struct rqw_task *t;

	if (!window_open() || !p->pid)
		return 0;
	t = task_entry(p->pid);
	if (t)
		t->migrations++;
	return 0;
}

/* idle time of the other CPUs that overlapped a wait [start, now): their current idle period and
 * their last finished one */
static void idle_beside(u32 self, u64 start, u64 now)
{
	for (u32 i = 0; i < SCAN_CPUS; i++) {
		struct rqw_cpu *c;
		u64 from, to, over = 0;

		if (i == self)
			continue;
		c = bpf_map_lookup_elem(&rqw_cpus, &i);
		if (!c)
			break;
		if (c->idle_since && c->idle_since < now)
			over += now - (c->idle_since > start ? c->idle_since : start);
		from = c->last_idle_start > start ? c->last_idle_start : start;
		to = c->last_idle_end;
		if (to > from && to <= now)
			over += to - from;
		if (over)
			__sync_fetch_and_add(&c->idle_wait_ns, over);
	}
}

SEC("tp_btf/sched_switch")
int BPF_PROG(rqw_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	struct rqw_task *t;
	struct rqw_edge_key key = {};
	struct rqw_edge *e;
	struct rqw_cpu *c;
	u32 pid = next->pid, cpu = bpf_get_smp_processor_id(), slot, *waker;
	u64 wait, *bucket, now = bpf_ktime_get_ns(), began, excused;
	struct rqw_begin *start;
	bool on = window_open();

	c = bpf_map_lookup_elem(&rqw_cpus, &cpu);
	if (c) {
		progress(c, now, prev->pid == 0);
		if (on) {
			c->switches++;
			if (prev_state == 0 && prev->pid)
				c->involuntary++;
		}
		if (prev->pid == 0 && c->idle_since) {	/* the CPU leaves idle */
			if (on)
				c->idle_ns += now - c->idle_since;
			c->last_idle_start = c->idle_since;
			c->last_idle_end = now;
			c->idle_since = 0;
		}
		if (pid == 0)
			c->idle_since = now;
	}
	if (prev_state == 0) {	/* TASK_RUNNING: switched out but still runnable */
		queued(prev);
		if (on && prev->pid) {
			t = task_entry(prev->pid);
			if (t)
				t->involuntary++;
		}
	}
	if (!pid)
		return 0;
	start = bpf_map_lookup_elem(&rqw_start, &pid);
	if (!start)
		return 0;
	if (!(start->ts & IN_WINDOW) && !on) {
		bpf_map_delete_elem(&rqw_start, &pid);
		bpf_map_delete_elem(&rqw_waker, &pid);
		return 0;
	}
	began = start->ts & ~IN_WINDOW;
	wait = now - began;
	excused = all_lost_since(start);
	if (excused > wait)
		excused = wait;
	wait -= excused;
	bpf_map_delete_elem(&rqw_start, &pid);

	slot = log2_slot(wait);
	bucket = bpf_map_lookup_elem(&rqw_hist, &slot);
	if (bucket)
		__sync_fetch_and_add(bucket, 1);

	idle_beside(cpu, began, now);
	if (prev->pid == 0) {	/* it waited on this CPU while the CPU ran its idle task */
		if (c) {
			c->idle_behind_ns += wait;
			c->idle_behind++;
		}
	} else {
		t = task_entry(prev->pid);
		if (t) {
			t->blocked_ns += wait;
			t->blocked++;
			if (!t->comm[0])
				bpf_probe_read_kernel_str(t->comm, sizeof(t->comm), prev->comm);
		}
	}
	waker = bpf_map_lookup_elem(&rqw_waker, &pid);
	if (waker) {
		key.waker = *waker;
		key.wakee = pid;
		bpf_map_delete_elem(&rqw_waker, &pid);
		e = bpf_map_lookup_elem(&rqw_wakes, &key);
		if (e)
			__sync_fetch_and_add(&e->wait_ns, wait);
	}

	t = task_entry(pid);
	if (!t)
		return 0;
	t->count++;
	t->total_ns += wait;
	t->excused_ns += excused;
	if (wait >= OVER_NS)
		t->over++;
	if (wait >= STARVE_NS)
		t->starved++;
	if (wait > t->max_ns) {
		t->max_ns = wait;
		t->cpu = cpu;
	}
	t->tgid = next->tgid;
	t->prio = next->static_prio;
	t->policy = next->policy;
	t->kthread = !!(next->flags & 0x00200000);	/* PF_KTHREAD */
	bpf_probe_read_kernel_str(t->comm, sizeof(t->comm), next->comm);
	return 0;
}
