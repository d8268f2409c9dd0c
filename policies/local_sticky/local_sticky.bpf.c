/* SPDX-License-Identifier: GPL-2.0 */
/*
 * local_sticky: per-CPU queues, tasks stay on the CPU they last ran on.
 *
 * Each CPU has its own FIFO queue. A waking task goes back to its previous
 * CPU when that CPU is idle; otherwise, if @migrate_on_wakeup is set, to any
 * idle CPU it may use; otherwise it queues behind the previous CPU's current
 * task. A CPU serves its own queue first and, only when that is empty and
 * @steal is set, takes a task from another CPU's queue that holds at least
 * @steal_min tasks. When a task is queued on a busy CPU, one idle CPU is
 * woken so that it can steal, so that no CPU idles while work waits.
 *
 * Works well: workloads whose threads reuse a warm cache (servers with a
 * thread per connection, pipelines of communicating threads, pinned or
 * partitioned jobs), and machines with several caches where migrations are
 * expensive. Per-CPU queues have no global contention point.
 *
 * Fails: no weights, so nice is ignored. Balance is only by idle stealing,
 * so a CPU can hold several queued tasks while another CPU runs one long
 * task: queued tasks wait up to a slice per task ahead of them. With
 * @steal off, imbalance is permanent until tasks sleep and wake elsewhere.
 * An idle CPU's steal scan is O(nr_cpus).
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 10000000ULL;	/* 10 ms */

/* On wakeup, leave a busy previous CPU for an idle one. */
const volatile bool migrate_on_wakeup = true;

/* Idle CPUs take work from other CPUs' queues. */
const volatile bool steal = true;

/* Only steal from a queue that holds at least this many tasks. */
const volatile u32 steal_min = 1;

UEI_DEFINE(uei);

#define MAX_CPUS	1024
#define CPU_DSQ(cpu)	(1000 + (u64)(cpu))

static u32 nr_cpus = 1;	/* set from the kernel in init */

/* [0] local on wakeup, [1] queued per-CPU, [2] stolen */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u64));
	__uint(max_entries, 3);
} stats SEC(".maps");

static void stat_inc(u32 idx)
{
	u64 *cnt = bpf_map_lookup_elem(&stats, &idx);

	if (cnt)
		(*cnt)++;
}

s32 BPF_STRUCT_OPS(local_sticky_select_cpu, struct task_struct *p,
		   s32 prev_cpu, u64 wake_flags)
{
	s32 cpu;

	/* Stickiness first: the previous CPU, if it is idle and allowed. */
	if (bpf_cpumask_test_cpu(prev_cpu, p->cpus_ptr) &&
	    scx_bpf_test_and_clear_cpu_idle(prev_cpu)) {
		stat_inc(0);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		return prev_cpu;
	}

	if (migrate_on_wakeup && p->nr_cpus_allowed > 1) {
		cpu = scx_bpf_pick_idle_cpu(p->cpus_ptr, 0);
		if (cpu >= 0) {
			stat_inc(0);
			scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
			return cpu;
		}
	}

	/* Everyone is busy: wait on the previous CPU, where the cache is. */
	return prev_cpu;
}

void BPF_STRUCT_OPS(local_sticky_enqueue, struct task_struct *p, u64 enq_flags)
{
	s32 cpu = scx_bpf_task_cpu(p), idle;

	stat_inc(1);
	scx_bpf_dsq_insert(p, CPU_DSQ(cpu), slice_ns, enq_flags);

	/* The home CPU may be idle (e.g. a new task): wake it. */
	if (scx_bpf_test_and_clear_cpu_idle(cpu)) {
		scx_bpf_kick_cpu(cpu, SCX_KICK_IDLE);
		return;
	}

	/* Home is busy: wake one idle CPU so it can steal the task. */
	if (steal && p->nr_cpus_allowed > 1) {
		idle = scx_bpf_pick_idle_cpu(p->cpus_ptr, 0);
		if (idle >= 0)
			scx_bpf_kick_cpu(idle, SCX_KICK_IDLE);
	}
}

void BPF_STRUCT_OPS(local_sticky_dispatch, s32 cpu, struct task_struct *prev)
{
	u32 i, victim;

	if (scx_bpf_dsq_move_to_local(CPU_DSQ(cpu), 0))
		return;
	if (!steal)
		return;

	/* Scan the other CPUs starting at our neighbour, to spread steals. */
	bpf_for(i, 1, nr_cpus) {
		victim = ((u32)cpu + i) % nr_cpus;
		if (scx_bpf_dsq_nr_queued(CPU_DSQ(victim)) < (s32)steal_min)
			continue;
		if (scx_bpf_dsq_move_to_local(CPU_DSQ(victim), 0)) {
			stat_inc(2);
			return;
		}
	}
}

s32 BPF_STRUCT_OPS_SLEEPABLE(local_sticky_init)
{
	u32 i;
	s32 ret;

	nr_cpus = scx_bpf_nr_cpu_ids();
	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;

	bpf_for(i, 0, nr_cpus) {
		ret = scx_bpf_create_dsq(CPU_DSQ(i), -1);
		if (ret)
			return ret;
	}
	return 0;
}

void BPF_STRUCT_OPS(local_sticky_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(local_sticky_ops,
	       .select_cpu		= (void *)local_sticky_select_cpu,
	       .enqueue			= (void *)local_sticky_enqueue,
	       .dispatch		= (void *)local_sticky_dispatch,
	       .init			= (void *)local_sticky_init,
	       .exit			= (void *)local_sticky_exit,
	       .name			= "local_sticky");
