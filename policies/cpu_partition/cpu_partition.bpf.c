/* SPDX-License-Identifier: GPL-2.0 */
/*
 * cpu_partition: confine background tasks to a set of CPUs, keep the other
 * CPUs for foreground work.
 *
 * A task is "background" when its nice value is at least @bg_min_nice (or
 * when it may only run on background CPUs anyway). Background tasks run only
 * on the CPUs in the bitmask @bg_cpus (CPU 0 by default); foreground tasks
 * run on the other CPUs and, when the background queue is empty, also on the
 * background CPUs. Each class has its own FIFO queue; background CPUs serve
 * the background queue first, foreground CPUs never take background tasks.
 * Tasks pinned to one CPU (per-CPU kthreads) go straight to that CPU.
 *
 * Works well: isolating noisy batch work (nice'd builds, backups, indexing,
 * analytics) from a latency-sensitive service on the same machine; giving a
 * service dedicated CPUs without cgroup cpusets; making results of a
 * benchmark repeatable while housekeeping runs.
 *
 * Fails: background work gets at most |bg_cpus| CPUs even when the others
 * idle, so batch throughput drops. Foreground tasks can wait behind
 * background ones on background CPUs. No weights within a class. @bg_cpus is
 * a 64-bit mask: CPUs above 63 are always foreground CPUs. Tasks are
 * classified by nice value only (not by cgroup or command name).
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 20000000ULL;	/* 20 ms */
const volatile u64 bg_cpus = 0x1;		/* bitmask of background CPUs */
const volatile s32 bg_min_nice = 10;		/* nice >= this: background */

UEI_DEFINE(uei);

#define FG_DSQ		1
#define BG_DSQ		2
#define MASK_CPUS	64

private(PART) struct bpf_cpumask __kptr *bg_mask;
private(PART) struct bpf_cpumask __kptr *fg_mask;

static u32 nr_cpus = 1;

static bool is_bg_cpu(s32 cpu)
{
	return cpu >= 0 && cpu < MASK_CPUS && (bg_cpus & (1ULL << cpu));
}

/* nice = static_prio - 120; tasks that can only run on bg CPUs are bg too. */
static bool is_bg_task(struct task_struct *p)
{
	bool any_bg = false, any_fg = false;
	u32 cpu;

	bpf_for(cpu, 0, nr_cpus) {
		if (!bpf_cpumask_test_cpu(cpu, p->cpus_ptr))
			continue;
		if (is_bg_cpu(cpu))
			any_bg = true;
		else
			any_fg = true;
	}
	if (!any_bg)
		return false;	/* never strand a task with no bg CPU */
	return !any_fg || p->static_prio - 120 >= bg_min_nice;
}

s32 BPF_STRUCT_OPS(cpu_partition_select_cpu, struct task_struct *p,
		   s32 prev_cpu, u64 wake_flags)
{
	struct bpf_cpumask *mask = is_bg_task(p) ? bg_mask : fg_mask;
	s32 cpu = -EBUSY;

	if (mask)
		cpu = scx_bpf_select_cpu_and(p, prev_cpu, wake_flags,
					     cast_mask(mask), 0);
	/* A foreground task may borrow an idle background CPU. */
	if (cpu < 0 && mask == fg_mask)
		cpu = scx_bpf_select_cpu_and(p, prev_cpu, wake_flags,
					     p->cpus_ptr, 0);
	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		return cpu;
	}
	return prev_cpu;
}

void BPF_STRUCT_OPS(cpu_partition_enqueue, struct task_struct *p, u64 enq_flags)
{
	struct bpf_cpumask *mask;
	bool bg;
	s32 cpu;

	if (p->nr_cpus_allowed == 1) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | scx_bpf_task_cpu(p),
				   slice_ns, enq_flags);
		return;
	}

	bg = is_bg_task(p);
	scx_bpf_dsq_insert(p, bg ? BG_DSQ : FG_DSQ, slice_ns, enq_flags);

	/* Wake an idle CPU of the right class to pick it up. */
	mask = bg ? bg_mask : fg_mask;
	if (!mask)
		return;
	cpu = scx_bpf_pick_idle_cpu(cast_mask(mask), 0);
	if (cpu >= 0)
		scx_bpf_kick_cpu(cpu, SCX_KICK_IDLE);
}

void BPF_STRUCT_OPS(cpu_partition_dispatch, s32 cpu, struct task_struct *prev)
{
	if (is_bg_cpu(cpu) && scx_bpf_dsq_move_to_local(BG_DSQ, 0))
		return;
	scx_bpf_dsq_move_to_local(FG_DSQ, 0);
}

s32 BPF_STRUCT_OPS_SLEEPABLE(cpu_partition_init)
{
	struct bpf_cpumask *bg, *fg;
	s32 ret;
	u32 cpu;

	nr_cpus = scx_bpf_nr_cpu_ids();
	if (nr_cpus > 1024)
		nr_cpus = 1024;

	ret = scx_bpf_create_dsq(FG_DSQ, -1);
	if (ret)
		return ret;
	ret = scx_bpf_create_dsq(BG_DSQ, -1);
	if (ret)
		return ret;

	bg = bpf_cpumask_create();
	if (!bg)
		return -ENOMEM;
	fg = bpf_cpumask_create();
	if (!fg) {
		bpf_cpumask_release(bg);
		return -ENOMEM;
	}
	bpf_for(cpu, 0, nr_cpus) {
		if (is_bg_cpu(cpu))
			bpf_cpumask_set_cpu(cpu, bg);
		else
			bpf_cpumask_set_cpu(cpu, fg);
	}
	bg = bpf_kptr_xchg(&bg_mask, bg);
	if (bg)
		bpf_cpumask_release(bg);
	fg = bpf_kptr_xchg(&fg_mask, fg);
	if (fg)
		bpf_cpumask_release(fg);
	return 0;
}

void BPF_STRUCT_OPS(cpu_partition_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(cpu_partition_ops,
	       .select_cpu		= (void *)cpu_partition_select_cpu,
	       .enqueue			= (void *)cpu_partition_enqueue,
	       .dispatch		= (void *)cpu_partition_dispatch,
	       .init			= (void *)cpu_partition_init,
	       .exit			= (void *)cpu_partition_exit,
	       .name			= "cpu_partition");
