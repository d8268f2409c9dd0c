/* SPDX-License-Identifier: GPL-2.0 */
/*
 * latency_boost: earliest-deadline-first, with earlier deadlines for tasks
 * that wake often and run briefly.
 *
 * Each task's deadline is its weighted virtual time (as in vtime_fair) plus
 * the CPU burst it is expected to need, divided by a latency factor:
 *
 *   deadline = vtime + burst * 100 / weight / (1 + log2(1 + wakeups/s))
 *
 * burst is the CPU time the task is expected to use before it sleeps again:
 * the moving average of its past bursts, or the current one if that is
 * already longer (a CPU hog never sleeps). wakeups/s is a moving average of
 * how often it wakes. An interactive task
 * (input handler, audio thread, RPC server thread) runs ~100 us per wakeup
 * and wakes hundreds of times a second, so its deadline is only a few
 * microseconds after its vtime; a CPU hog never sleeps and gets a whole
 * slice added. A sleeping task keeps up to @lag_ns of credit. When a task
 * wakes and no CPU is idle, the CPU it last ran on is preempted if that CPU
 * runs a task with a later deadline (@preempt).
 *
 * Works well: desktops, games, audio, and servers where tail latency of
 * short requests matters while batch work runs in the background; tasks that
 * wait on I/O or on each other.
 *
 * Fails: throughput of CPU-bound work drops from extra preemptions and the
 * short @slice_ns. A task can game it by sleeping briefly and often. One
 * global queue, so not for machines with many LLCs. The statistics take a
 * few wakeups to adapt when a task changes behaviour.
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 5000000ULL;	/* 5 ms */
const volatile u64 lag_ns = 40000000ULL;	/* 40 ms of sleeper credit */

#define MAX_LEAD_SLICES 4
const volatile bool preempt = true;
const volatile u64 preempt_min_ns = 1000000ULL;	/* 1 ms */

UEI_DEFINE(uei);

#define EDF_DSQ		1
#define MAX_CPUS	1024
#define NSEC_PER_SEC	1000000000ULL

static u64 vtime_now;

struct task_ctx {
	u64 started_at;		/* last time it started running */
	u64 burst;		/* CPU time used since it last woke */
	u64 avg_burst;		/* moving average of burst at sleep */
	u64 last_woke;		/* last wakeup time */
	u64 wake_freq;		/* moving average of wakeups per second */
	u64 deadline;		/* deadline at the last enqueue */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ctx);
} task_ctxs SEC(".maps");

/* What each CPU runs, for wakeup preemption. */
struct cpu_run {
	u64 deadline;		/* deadline of the running task */
	u64 started_at;		/* when it started running */
	u64 burst;		/* its burst before it started */
	u64 exp_burst;		/* its expected burst (task_burst()) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct cpu_run);
} cpu_runs SEC(".maps");

static inline bool vtime_before(u64 a, u64 b)
{
	return (s64)(a - b) < 0;
}

/* New samples weigh 1/4: adapts within a few wakeups, smooths outliers. */
static inline u64 ewma(u64 old, u64 sample)
{
	return (old * 3 + sample) / 4;
}

static struct task_ctx *lookup_tctx(struct task_struct *p)
{
	return bpf_task_storage_get(&task_ctxs, p, 0,
				    BPF_LOCAL_STORAGE_GET_F_CREATE);
}

/*
 * The burst a task is expected to need: its average, or what it has already
 * used since it woke if that is more. The second term matters for CPU hogs,
 * which never sleep and so never update their average.
 */
static u64 task_burst(struct task_ctx *tctx)
{
	return tctx->burst > tctx->avg_burst ? tctx->burst : tctx->avg_burst;
}

static u64 task_deadline(struct task_struct *p, struct task_ctx *tctx)
{
	u64 vtime = p->scx.dsq_vtime, burst = task_burst(tctx), deadline;

	if (vtime_before(vtime, vtime_now - lag_ns))
		vtime = vtime_now - lag_ns;

	if (burst > slice_ns)
		burst = slice_ns;
	burst = scale_by_task_weight_inverse(p, burst);
	deadline = vtime + burst / (1 + log2_u64(tctx->wake_freq + 1));
	/*
	 * Never more than MAX_LEAD_SLICES slices ahead of vtime_now: nice 19 has
	 * weight 1 (charged 100x), and behind a busy queue it would wait seconds
	 * until the watchdog disables the scheduler. Nice-0 tasks never get here.
	 */
	if (vtime_before(vtime_now + MAX_LEAD_SLICES * slice_ns, deadline))
		deadline = vtime_now + MAX_LEAD_SLICES * slice_ns;
	return deadline;
}

s32 BPF_STRUCT_OPS(latency_boost_select_cpu, struct task_struct *p,
		   s32 prev_cpu, u64 wake_flags)
{
	bool is_idle = false;
	s32 cpu;

	cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
	if (is_idle)
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	return cpu;
}

void BPF_STRUCT_OPS(latency_boost_enqueue, struct task_struct *p, u64 enq_flags)
{
	struct task_ctx *tctx = lookup_tctx(p);
	u32 cpu = scx_bpf_task_cpu(p);
	struct cpu_run *cr;
	u64 ran;

	if (!tctx) {
		scx_bpf_dsq_insert(p, EDF_DSQ, slice_ns, enq_flags);
		return;
	}

	tctx->deadline = task_deadline(p, tctx);
	scx_bpf_dsq_insert_vtime(p, EDF_DSQ, slice_ns, tctx->deadline,
				 enq_flags);

	/*
	 * A waking task takes its old CPU if it has the earlier deadline, the
	 * running task is a longer runner (twice the waker's usual burst) and
	 * has run for @preempt_min_ns. Without the last two tests, peers that
	 * all wake often (a message-passing pipeline) preempt each other on
	 * every wakeup and throughput collapses.
	 */
	if (!preempt || !(enq_flags & SCX_ENQ_WAKEUP))
		return;
	cr = bpf_map_lookup_elem(&cpu_runs, &cpu);
	if (!cr || !cr->started_at || !vtime_before(tctx->deadline, cr->deadline))
		return;
	ran = cr->burst + time_delta(scx_bpf_now(), cr->started_at);
	if (ran >= preempt_min_ns && ran > 2 * tctx->avg_burst &&
	    cr->exp_burst > 2 * tctx->avg_burst)
		scx_bpf_kick_cpu(cpu, SCX_KICK_PREEMPT);
}

void BPF_STRUCT_OPS(latency_boost_dispatch, s32 cpu, struct task_struct *prev)
{
	scx_bpf_dsq_move_to_local(EDF_DSQ, 0);
}

void BPF_STRUCT_OPS(latency_boost_runnable, struct task_struct *p, u64 enq_flags)
{
	struct task_ctx *tctx;
	u64 now, delta;

	if (!(enq_flags & SCX_ENQ_WAKEUP) || !(tctx = lookup_tctx(p)))
		return;

	now = scx_bpf_now();
	delta = time_delta(now, tctx->last_woke);
	if (delta)
		tctx->wake_freq = ewma(tctx->wake_freq, NSEC_PER_SEC / delta);
	tctx->last_woke = now;
	tctx->burst = 0;
}

void BPF_STRUCT_OPS(latency_boost_running, struct task_struct *p)
{
	struct task_ctx *tctx = lookup_tctx(p);
	u32 cpu = scx_bpf_task_cpu(p);
	struct cpu_run *cr;

	if (vtime_before(vtime_now, p->scx.dsq_vtime))
		vtime_now = p->scx.dsq_vtime;
	if (!tctx)
		return;

	tctx->started_at = scx_bpf_now();
	cr = bpf_map_lookup_elem(&cpu_runs, &cpu);
	if (cr) {
		cr->deadline = tctx->deadline ?: p->scx.dsq_vtime;
		cr->started_at = tctx->started_at;
		cr->burst = tctx->burst;
		cr->exp_burst = task_burst(tctx);
	}
}

void BPF_STRUCT_OPS(latency_boost_stopping, struct task_struct *p, bool runnable)
{
	struct task_ctx *tctx = bpf_task_storage_get(&task_ctxs, p, 0, 0);
	u32 cpu = scx_bpf_task_cpu(p);
	struct cpu_run *cr;
	u64 used;

	cr = bpf_map_lookup_elem(&cpu_runs, &cpu);
	if (cr)
		cr->started_at = 0;	/* nothing of ours runs here now */
	if (!tctx || !tctx->started_at)
		return;

	used = time_delta(scx_bpf_now(), tctx->started_at);
	tctx->started_at = 0;
	tctx->burst += used;
	/* the vtime charge is at most one slice: time run while nothing else
	 * waited (slice refilled, no stopping) took nothing from anyone */
	if (used > slice_ns)
		used = slice_ns;
	scx_bpf_task_set_dsq_vtime(p, p->scx.dsq_vtime +
					scale_by_task_weight_inverse(p, used));
}

void BPF_STRUCT_OPS(latency_boost_quiescent, struct task_struct *p, u64 deq_flags)
{
	struct task_ctx *tctx = bpf_task_storage_get(&task_ctxs, p, 0, 0);

	/* Going to sleep: the burst that just ended is a sample. */
	if (tctx && (deq_flags & SCX_DEQ_SLEEP))
		tctx->avg_burst = ewma(tctx->avg_burst, tctx->burst);
}

void BPF_STRUCT_OPS(latency_boost_enable, struct task_struct *p)
{
	scx_bpf_task_set_dsq_vtime(p, vtime_now);
}

s32 BPF_STRUCT_OPS_SLEEPABLE(latency_boost_init)
{
	return scx_bpf_create_dsq(EDF_DSQ, -1);
}

void BPF_STRUCT_OPS(latency_boost_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(latency_boost_ops,
	       .select_cpu		= (void *)latency_boost_select_cpu,
	       .enqueue			= (void *)latency_boost_enqueue,
	       .dispatch		= (void *)latency_boost_dispatch,
	       .runnable		= (void *)latency_boost_runnable,
	       .running			= (void *)latency_boost_running,
	       .stopping		= (void *)latency_boost_stopping,
	       .quiescent		= (void *)latency_boost_quiescent,
	       .enable			= (void *)latency_boost_enable,
	       .init			= (void *)latency_boost_init,
	       .exit			= (void *)latency_boost_exit,
	       .name			= "latency_boost");
