/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lean_preempt: one global FIFO with short slices, and guarded wakeup
 * preemption decided from what the kernel already tracks, in a single
 * callback.
 *
 * Every task goes to the global FIFO (SCX_DSQ_GLOBAL) with a slice_ns slice;
 * the kernel's built-in CPU selection dispatches a waking task straight to an
 * idle CPU. Only ops.enqueue runs policy code: a waking task takes the CPU it
 * woke on (SCX_DSQ_LOCAL_ON | cpu with SCX_ENQ_PREEMPT) when the task
 * running there is a CPU hog next to it:
 *
 *   burst(t) = t->se.sum_exec_runtime / (1 + t->nvcsw)
 *
 * is a task's CPU time per voluntary sleep over its life. The running task is
 * preempted when its burst is at least hog_burst_ns and more than
 * burst_ratio times the waking task's. A busy loop never sleeps, so its burst
 * is its whole runtime; a task that wakes on a timer or on I/O runs briefly
 * per wakeup; peers passing messages (hackbench) have bursts of the same
 * order and do not preempt each other.
 *
 * SCX_OPS_ALLOW_QUEUED_WAKEUP: a wakeup of a task on another CPU is queued
 * to that CPU (an IPI; it enqueues the task itself), as the default
 * scheduler does, instead of the waker locking the remote run queue. In the
 * sandbox a scheduler with no callbacks at all ran pipe ping-pong in
 * 0.65-0.88 s with it and 0.85-2.4 s without it (README).
 *
 * Why so little code: in the sandbox (qemu TCG) every sched_ext callback is
 * paid on every context switch; in one unpaired run on a loaded host the
 * kernel's scx_simple (five callbacks) took 2.8-3.1 s on hackbench where a
 * scheduler with none took 1.4-1.8 s (README). The preemption test reads only
 * task_struct fields, so it needs no per-task storage and no running/stopping
 * bookkeeping.
 *
 * Counters (map schedcp_stats, read by layer 2): wakeup preemptions, wakeups
 * queued on the FIFO, tasks placed on an idle CPU from enqueue.
 *
 * Works well: message passing (hackbench), fork/exec churn (builds), on few
 * CPUs; CPU-bound throughput is unchanged.
 *
 * Fails: the tail of short sleepers' run-queue wait beside CPU hogs (p99 up
 * to 5x the default scheduler's in the sandbox): a waking task that may not
 * preempt waits in the FIFO until a tick ends the running slice. FIFO has no fairness between CPU-bound tasks beyond round-robin
 * slices, and no nice/weight support; the burst is a lifetime average, so a
 * task that changes from interactive to CPU-bound (or back) is judged by its
 * past for a while; one global queue, so no cache or NUMA locality (not for
 * big machines); a pipe ping-pong pays sched_ext's own per-switch cost in
 * the sandbox (README) and can still be slower than under the default
 * scheduler.
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 5000000ULL;	/* 5 ms */
const volatile u64 hog_burst_ns = 4000000ULL;	/* 4 ms per sleep */
const volatile u64 burst_ratio = 8;
const volatile bool preempt = true;
const volatile bool wake_local = true;
const volatile u64 local_max = 2;
const volatile bool sync_apart = true;

UEI_DEFINE(uei);

/* What the policy did, for layer 2's report (one entry, named fields via BTF). */
struct schedcp_stats {
	u64 wakeup_preempts;
	u64 local_wakeups;
	u64 fifo_wakeups;
	u64 idle_placements;
	u64 sync_wakeups;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct schedcp_stats);
} schedcp_stats SEC(".maps");

static struct schedcp_stats *stats(void)
{
	u32 zero = 0;

	return bpf_map_lookup_elem(&schedcp_stats, &zero);
}

/* CPU time per voluntary sleep over the task's life. */
static u64 burst(struct task_struct *t)
{
	return t->se.sum_exec_runtime / (1 + t->nvcsw);
}

/*
 * The built-in CPU selection, except that a synchronous wakeup (a pipe or socket hand-off: the
 * waker is about to sleep) is not pulled onto the waker's CPU while another CPU idles. Pulled
 * together, a ping-pong pair took 0.62 s for perf bench sched pipe where the default scheduler takes
 * 0.27 s (sandbox, 4 paired rounds); kept apart (an idle CPU each) it runs at the default's speed.
 * An idle CPU found is dispatched to at once.
 */
s32 BPF_STRUCT_OPS(lean_preempt_select_cpu, struct task_struct *p, s32 prev_cpu, u64 wake_flags)
{
	struct schedcp_stats *st;
	bool is_idle = false;
	s32 cpu;

	if (sync_apart && (wake_flags & SCX_WAKE_SYNC)) {
		wake_flags &= ~SCX_WAKE_SYNC;
		st = stats();
		if (st)
			__sync_fetch_and_add(&st->sync_wakeups, 1);
	}
	cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
	if (is_idle)
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	return cpu;
}

void BPF_STRUCT_OPS(lean_preempt_enqueue, struct task_struct *p, u64 enq_flags)
{
	struct schedcp_stats *st = stats();
	s32 cpu = scx_bpf_task_cpu(p);
	struct task_struct *curr;
	u64 cb;

	if (!preempt || !(enq_flags & SCX_ENQ_WAKEUP))
		goto fifo;
	curr = __COMPAT_scx_bpf_cpu_curr(cpu);
	if (!curr)
		goto fifo;
	if (curr->flags & PF_IDLE) {
		/* the CPU it woke on idles (the built-in selection did not place it) */
		if (st)
			__sync_fetch_and_add(&st->idle_placements, 1);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | cpu, slice_ns, enq_flags);
		return;
	}
	cb = burst(curr);
	if (curr != p && !(curr->flags & PF_KTHREAD) && cb >= hog_burst_ns &&
	    cb > burst_ratio * burst(p)) {
		if (st)
			__sync_fetch_and_add(&st->wakeup_preempts, 1);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | cpu, slice_ns, enq_flags | SCX_ENQ_PREEMPT);
		return;
	}
	/*
	 * May not preempt (the running task is short too): a short waking task still goes ahead of
	 * the FIFO, on its CPU's own queue, which the CPU runs before it pulls from the FIFO. In the
	 * FIFO it could land behind the hog it had just preempted a moment earlier and wait that hog's
	 * whole slice. Bounded by local_max, since no other CPU takes from this queue.
	 */
	if (wake_local && burst(p) < hog_burst_ns &&
	    scx_bpf_dsq_nr_queued(SCX_DSQ_LOCAL_ON | cpu) < local_max) {
		if (st)
			__sync_fetch_and_add(&st->local_wakeups, 1);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | cpu, slice_ns, enq_flags);
		return;
	}
	if (st)
		__sync_fetch_and_add(&st->fifo_wakeups, 1);
fifo:
	scx_bpf_dsq_insert(p, SCX_DSQ_GLOBAL, slice_ns, enq_flags);
}

void BPF_STRUCT_OPS(lean_preempt_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(lean_preempt_ops,
	       .select_cpu		= (void *)lean_preempt_select_cpu,
	       .enqueue			= (void *)lean_preempt_enqueue,
	       .exit			= (void *)lean_preempt_exit,
	       .flags			= SCX_OPS_ALLOW_QUEUED_WAKEUP,
	       .name			= "lean_preempt");
