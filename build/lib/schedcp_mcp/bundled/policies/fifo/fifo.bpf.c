/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fifo: one global first-in-first-out queue shared by every CPU.
 *
 * A waking task that finds an idle CPU (the kernel's default idle selection:
 * previous CPU, then its LLC, then anywhere) is handed straight to that CPU.
 * Everything else is appended to a single shared queue and any CPU that runs
 * out of work takes the task at its head. Each task runs for at most
 * @slice_ns before it goes back to the tail.
 *
 * Works well: throughput workloads of many similar, short-lived tasks
 * (builds, message passing such as hackbench) on a machine with one LLC,
 * where the cost of scheduling decisions matters more than their quality.
 * The queue is work-conserving: no CPU idles while something is queued.
 *
 * Fails: no notion of weight or priority (nice is ignored), so saturating
 * CPU hogs drown out interactive tasks, which wait behind every queued hog
 * for up to nr_queued * slice_ns. The single queue is a contention point on
 * machines with many CPUs, and tasks migrate freely, which costs cache
 * locality on machines with several LLCs.
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

/* How long a task may run before it is sent back to the tail. */
const volatile u64 slice_ns = 20000000ULL;	/* 20 ms */

/* Dispatch a waking task straight to the idle CPU found for it. */
const volatile bool direct_dispatch = true;

UEI_DEFINE(uei);

/*
 * A user DSQ rather than SCX_DSQ_GLOBAL so that dispatch() decides when CPUs
 * pull from it, and so that the queue is visible by id in debugging dumps.
 */
#define FIFO_DSQ 1

/* [0] dispatched directly to an idle CPU, [1] queued to the shared FIFO */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u64));
	__uint(max_entries, 2);
} stats SEC(".maps");

static void stat_inc(u32 idx)
{
	u64 *cnt = bpf_map_lookup_elem(&stats, &idx);

	if (cnt)
		(*cnt)++;
}

s32 BPF_STRUCT_OPS(fifo_select_cpu, struct task_struct *p, s32 prev_cpu,
		   u64 wake_flags)
{
	bool is_idle = false;
	s32 cpu;

	cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
	if (is_idle && direct_dispatch) {
		stat_inc(0);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	}
	return cpu;
}

void BPF_STRUCT_OPS(fifo_enqueue, struct task_struct *p, u64 enq_flags)
{
	stat_inc(1);
	scx_bpf_dsq_insert(p, FIFO_DSQ, slice_ns, enq_flags);
}

void BPF_STRUCT_OPS(fifo_dispatch, s32 cpu, struct task_struct *prev)
{
	scx_bpf_dsq_move_to_local(FIFO_DSQ, 0);
}

s32 BPF_STRUCT_OPS_SLEEPABLE(fifo_init)
{
	return scx_bpf_create_dsq(FIFO_DSQ, -1);
}

void BPF_STRUCT_OPS(fifo_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(fifo_ops,
	       .select_cpu		= (void *)fifo_select_cpu,
	       .enqueue			= (void *)fifo_enqueue,
	       .dispatch		= (void *)fifo_dispatch,
	       .init			= (void *)fifo_init,
	       .exit			= (void *)fifo_exit,
	       .name			= "fifo");
