/* SPDX-License-Identifier: GPL-2.0 */
/*
 * batch: throughput first - long slices, no wakeup preemption, cache-warm
 * picks.
 *
 * Tasks run for @slice_ns (100 ms by default, ~5-20x a desktop scheduler's
 * slice) and are never preempted by a waking task, so CPU-bound work is
 * interrupted rarely and keeps its caches and TLB warm. Waiting tasks sit in
 * one shared FIFO. A CPU that needs work looks at the first @scan_depth
 * queued tasks for one that last ran on this CPU and takes it (its cache is
 * still warm here); only if there is none does it take the head of the
 * queue. A task that is alone on its CPU simply keeps running with a fresh
 * slice instead of going through the queue.
 *
 * Works well: compute-bound batch jobs, scientific/HPC kernels, compression,
 * rendering, kernel builds on a dedicated box, CI runners - anything judged
 * by total completion time with more runnable threads than CPUs.
 *
 * Fails: latency: a waking interactive task waits up to a full slice per
 * task ahead of it, so desktops feel sluggish and request tail latency
 * grows. No weights (nice is ignored). The affinity scan can let a task
 * overtake the queue head by up to @scan_depth positions (the head still
 * runs at its own CPU's next pick, i.e. within one slice).
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 100000000ULL;	/* 100 ms */

/* How many queued tasks a CPU inspects for one that last ran on it. */
const volatile u32 scan_depth = 8;

UEI_DEFINE(uei);

#define BATCH_DSQ 1

/* [0] idle direct dispatch, [1] queued, [2] cache-warm pick, [3] head pick */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u64));
	__uint(max_entries, 4);
} stats SEC(".maps");

static void stat_inc(u32 idx)
{
	u64 *cnt = bpf_map_lookup_elem(&stats, &idx);

	if (cnt)
		(*cnt)++;
}

s32 BPF_STRUCT_OPS(batch_select_cpu, struct task_struct *p, s32 prev_cpu,
		   u64 wake_flags)
{
	bool is_idle = false;
	s32 cpu;

	/* Default idle selection prefers prev_cpu, then its LLC. */
	cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
	if (is_idle) {
		stat_inc(0);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	}
	return cpu;
}

void BPF_STRUCT_OPS(batch_enqueue, struct task_struct *p, u64 enq_flags)
{
	/* No SCX_ENQ_PREEMPT and no kick: a waking task waits its turn. */
	stat_inc(1);
	scx_bpf_dsq_insert(p, BATCH_DSQ, slice_ns, enq_flags);
}

void BPF_STRUCT_OPS(batch_dispatch, s32 cpu, struct task_struct *prev)
{
	struct task_struct *p;
	u32 scanned = 0;

	bpf_for_each(scx_dsq, p, BATCH_DSQ, 0) {
		if (++scanned > scan_depth)
			break;
		if (scx_bpf_task_cpu(p) != cpu)
			continue;
		if (scx_bpf_dsq_move(BPF_FOR_EACH_ITER, p, SCX_DSQ_LOCAL, 0)) {
			stat_inc(2);
			return;
		}
	}

	if (scx_bpf_dsq_move_to_local(BATCH_DSQ, 0)) {
		stat_inc(3);
		return;
	}

	/* Nothing queued: let the previous task go on without a round trip. */
	if (prev && (prev->scx.flags & SCX_TASK_QUEUED))
		scx_bpf_task_set_slice(prev, slice_ns);
}

s32 BPF_STRUCT_OPS_SLEEPABLE(batch_init)
{
	return scx_bpf_create_dsq(BATCH_DSQ, -1);
}

void BPF_STRUCT_OPS(batch_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(batch_ops,
	       .select_cpu		= (void *)batch_select_cpu,
	       .enqueue			= (void *)batch_enqueue,
	       .dispatch		= (void *)batch_dispatch,
	       .init			= (void *)batch_init,
	       .exit			= (void *)batch_exit,
	       .name			= "batch");
