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
 * Loaded with `bpftool prog loadall ... autoattach` (links pinned; removing the pin directory detaches
 * it) and read with `bpftool -j map dump name rqw_tasks`: no userspace half, nothing beyond bpftool
 * in the guest. The scheduler under test cannot hide a wait from it: the tracepoints belong to the
 * core scheduler, not to the sched_ext class.
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
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, u64);
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

static void queued(struct task_struct *p)
{
	u32 pid = p->pid;
	u64 ts = bpf_ktime_get_ns();

	if (window_open())
		ts |= IN_WINDOW;
	if (pid)
		bpf_map_update_elem(&rqw_start, &pid, &ts, BPF_ANY);
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

SEC("tp_btf/sched_wakeup")
int BPF_PROG(rqw_wakeup, struct task_struct *p)
{
	queued(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(rqw_wakeup_new, struct task_struct *p)
{
	queued(p);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(rqw_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	struct rqw_task *t, fresh = {};
	u32 pid = next->pid, slot;
	u64 *start, wait, *bucket;

	if (prev_state == 0)	/* TASK_RUNNING: switched out but still runnable */
		queued(prev);
	if (!pid)
		return 0;
	start = bpf_map_lookup_elem(&rqw_start, &pid);
	if (!start)
		return 0;
	if (!(*start & IN_WINDOW) && !window_open()) {
		bpf_map_delete_elem(&rqw_start, &pid);
		return 0;
	}
	wait = bpf_ktime_get_ns() - (*start & ~IN_WINDOW);
	bpf_map_delete_elem(&rqw_start, &pid);

	slot = log2_slot(wait);
	bucket = bpf_map_lookup_elem(&rqw_hist, &slot);
	if (bucket)
		__sync_fetch_and_add(bucket, 1);

	t = bpf_map_lookup_elem(&rqw_tasks, &pid);
	if (!t) {
		bpf_map_update_elem(&rqw_tasks, &pid, &fresh, BPF_NOEXIST);
		t = bpf_map_lookup_elem(&rqw_tasks, &pid);
		if (!t)
			return 0;
	}
	t->count++;
	t->total_ns += wait;
	if (wait >= OVER_NS)
		t->over++;
	if (wait >= STARVE_NS)
		t->starved++;
	if (wait > t->max_ns) {
		t->max_ns = wait;
		t->cpu = bpf_get_smp_processor_id();
	}
	t->tgid = next->tgid;
	t->prio = next->static_prio;
	t->policy = next->policy;
	t->kthread = !!(next->flags & 0x00200000);	/* PF_KTHREAD */
	bpf_probe_read_kernel_str(t->comm, sizeof(t->comm), next->comm);
	return 0;
}
