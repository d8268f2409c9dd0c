/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vtime_fair: weighted fair sharing by virtual time, one global queue.
 *
 * Every task carries a virtual time that advances by the CPU time it used,
 * scaled by the inverse of its weight (sched_ext's p->scx.weight: nice 0 =
 * 100, nice -20 = 8668, nice 19 = 1). The shared queue is ordered by virtual time, so the task
 * that has received the least weighted CPU runs next and, over time, each
 * task gets CPU in proportion to its weight, as under CFS.
 *
 * The runtime is measured with timestamps taken when a task starts and stops
 * running, not derived from the unused slice, so a task that yields early is
 * charged only for what it used (and never more than one slice per run). A
 * task that slept keeps at most @max_credit_ns of weighted credit, so a long
 * sleeper cannot come back and monopolise the CPUs, but still runs soon after
 * it wakes. Two bounds keep every task running: no task queues more than
 * four slices ahead of the queue's "now" (a nice-19 task, charged 100x its
 * runtime, otherwise waited seconds: the watchdog's stall), and "now" also
 * advances with the CPU time handed out, so a stream of short sleepers that
 * keep their credit cannot freeze it while the CPU hogs behind them wait.
 *
 * Works well: mixed workloads where nice values should mean something
 * (background jobs at nice 19 beside foreground work), many tasks competing
 * for few CPUs, general desktop and server use on a single-LLC machine.
 *
 * Fails: one global queue, so on many-CPU or multi-LLC machines it is a
 * contention point and tasks lose cache locality when they migrate. Fairness
 * is not latency: a latency-critical task with a big CPU share waits its turn
 * like everyone else, and there is no preemption on wakeup. The credit bound
 * is one knob for all tasks.
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

/* Time a task may run before the next task in vtime order gets the CPU. */
const volatile u64 slice_ns = 20000000ULL;		/* 20 ms */

/* How much weighted credit a sleeping task may bank (the lag bound). */
const volatile u64 max_credit_ns = 20000000ULL;		/* 20 ms */

UEI_DEFINE(uei);

#define VTIME_DSQ 1

/* The vtime of the most recently started task: the queue's "now". */
static u64 vtime_now;

/*
 * No task queues more than MAX_LEAD_SLICES slices ahead of vtime_now. Nice 19
 * has weight 1: one slice run costs it 100 slices of vtime, and behind a busy
 * queue it waited seconds (khugepaged, 4.4 s: the watchdog's "runnable task
 * stall"). A nice-0 task is never more than about a slice ahead, so the bound
 * only shortens low-weight tasks' waits.
 */
#define MAX_LEAD_SLICES 4

struct task_ctx {
	u64 started_at;	/* when the task last started running, 0 if not */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ctx);
} task_ctxs SEC(".maps");

static inline bool vtime_before(u64 a, u64 b)
{
	return (s64)(a - b) < 0;
}

s32 BPF_STRUCT_OPS(vtime_fair_select_cpu, struct task_struct *p,
		   s32 prev_cpu, u64 wake_flags)
{
	bool is_idle = false;
	s32 cpu;

	/* An idle CPU means nobody is waiting: fairness has nothing to order. */
	cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
	if (is_idle)
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	return cpu;
}

void BPF_STRUCT_OPS(vtime_fair_enqueue, struct task_struct *p, u64 enq_flags)
{
	u64 vtime = p->scx.dsq_vtime;

	/* Bound the credit a task that slept (or is new) can claim. */
	if (vtime_before(vtime, vtime_now - max_credit_ns))
		vtime = vtime_now - max_credit_ns;
	/* ... and the debt a low-weight task can owe. */
	if (vtime_before(vtime_now + MAX_LEAD_SLICES * slice_ns, vtime))
		vtime = vtime_now + MAX_LEAD_SLICES * slice_ns;

	scx_bpf_dsq_insert_vtime(p, VTIME_DSQ, slice_ns, vtime, enq_flags);
}

void BPF_STRUCT_OPS(vtime_fair_dispatch, s32 cpu, struct task_struct *prev)
{
	scx_bpf_dsq_move_to_local(VTIME_DSQ, 0);
}

void BPF_STRUCT_OPS(vtime_fair_running, struct task_struct *p)
{
	struct task_ctx *tctx;

	/*
	 * Racy across CPUs, as in the kernel's scx_simple: a lost update only
	 * makes vtime_now lag a little, and the next task to run fixes it.
	 */
	if (vtime_before(vtime_now, p->scx.dsq_vtime))
		vtime_now = p->scx.dsq_vtime;

	tctx = bpf_task_storage_get(&task_ctxs, p, 0,
				    BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (tctx)
		tctx->started_at = scx_bpf_now();
}

void BPF_STRUCT_OPS(vtime_fair_stopping, struct task_struct *p, bool runnable)
{
	struct task_ctx *tctx;
	u64 now = scx_bpf_now(), used;

	tctx = bpf_task_storage_get(&task_ctxs, p, 0, 0);
	if (!tctx || !tctx->started_at)
		return;

	used = time_delta(now, tctx->started_at);
	tctx->started_at = 0;
	/*
	 * At most one slice: a task that ran on while nothing else waited (the
	 * kernel refills its slice without a stopping/running pair) took nothing
	 * from anyone. Charged in full, it would queue behind every task that
	 * arrived since, for seconds: the watchdog's "runnable task stall".
	 */
	if (used > slice_ns)
		used = slice_ns;
	/* Weighted charge: heavier tasks advance more slowly. */
	scx_bpf_task_set_dsq_vtime(p, p->scx.dsq_vtime +
					scale_by_task_weight_inverse(p, used));
	/*
	 * The queue's "now" also advances at a fair share's pace: the time used,
	 * over the tasks waiting and the CPUs serving them. Moved only by the
	 * largest started vtime, a stream of short sleepers (each placed at
	 * vtime_now - max_credit_ns, never running past it) froze it, and CPU
	 * hogs queued behind them waited as long as the stream lasted.
	 */
	vtime_now += used / (scx_bpf_dsq_nr_queued(VTIME_DSQ) + scx_bpf_nr_cpu_ids());
}

void BPF_STRUCT_OPS(vtime_fair_enable, struct task_struct *p)
{
	scx_bpf_task_set_dsq_vtime(p, vtime_now);
}

s32 BPF_STRUCT_OPS_SLEEPABLE(vtime_fair_init)
{
	return scx_bpf_create_dsq(VTIME_DSQ, -1);
}

void BPF_STRUCT_OPS(vtime_fair_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(vtime_fair_ops,
	       .select_cpu		= (void *)vtime_fair_select_cpu,
	       .enqueue			= (void *)vtime_fair_enqueue,
	       .dispatch		= (void *)vtime_fair_dispatch,
	       .running			= (void *)vtime_fair_running,
	       .stopping		= (void *)vtime_fair_stopping,
	       .enable			= (void *)vtime_fair_enable,
	       .init			= (void *)vtime_fair_init,
	       .exit			= (void *)vtime_fair_exit,
	       .name			= "vtime_fair");
