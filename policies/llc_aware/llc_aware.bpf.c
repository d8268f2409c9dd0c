/* SPDX-License-Identifier: GPL-2.0 */
/*
 * llc_aware: one weighted-vtime queue per last-level-cache domain.
 *
 * CPUs that share an LLC share a queue; a task is queued in the domain of
 * the CPU it last ran on, so it keeps finding its data in that cache. A
 * waking task takes an idle CPU of its own domain first (previous CPU, its
 * SMT sibling, then the rest of the LLC); it moves to an idle CPU of another
 * domain only when @xllc_min or more tasks already wait in its own queue.
 * A CPU serves its own domain's queue first and steals from another domain
 * only when that domain holds @xllc_min or more waiting tasks. Within a
 * domain the queue is ordered by weighted virtual time (nice matters).
 *
 * The domains come from the kernel's own topology (the per-CPU sd_llc_id)
 * unless @cpus_per_llc is set, which groups CPUs 0..N-1, N..2N-1, ... (for
 * a loader that knows better, or to emulate domains on a flat machine).
 *
 * Works well: machines with several LLCs (AMD CCXs, multi-socket, chiplets)
 * running cache-sensitive parallel work: databases, JVMs, builds with warm
 * headers, data pipelines whose threads share memory.
 *
 * Fails: on a single-LLC machine it is a plain global vtime scheduler with
 * extra bookkeeping. Keeping tasks home trades some balance for locality:
 * with a high @xllc_min one domain can be overloaded while another idles.
 * An idle CPU's steal scan is O(nr_cpus). The topology is read once at load:
 * CPU hotplug is not followed.
 */
#include <scx/common.bpf.h>

char _license[] SEC("license") = "GPL";

const volatile u64 slice_ns = 10000000ULL;	/* 10 ms */

/* Cross-LLC moves need at least this many tasks waiting in the source. */
const volatile u32 xllc_min = 2;

/* 0: LLC domains from the kernel topology; N: CPUs grouped N at a time. */
const volatile u32 cpus_per_llc = 0;

UEI_DEFINE(uei);

#define MAX_CPUS	1024
#define LLC_DSQ(llc)	(2000 + (u64)(llc))

/* The kernel's id of each CPU's LLC domain (the domain's first CPU). */
extern const int sd_llc_id __ksym __weak;

static u32 nr_cpus = 1;
static u64 vtime_now;

struct cpu_info {
	u32 llc;	/* LLC id of this CPU (< MAX_CPUS) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct cpu_info);
} cpu_infos SEC(".maps");

/* CPUs of each LLC domain, indexed by LLC id. */
struct llc_mask {
	struct bpf_cpumask __kptr *mask;
	bool created;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct llc_mask);
} llc_masks SEC(".maps");

static inline bool vtime_before(u64 a, u64 b)
{
	return (s64)(a - b) < 0;
}

static u32 cpu_llc(s32 cpu)
{
	u32 key = cpu;
	struct cpu_info *ci = bpf_map_lookup_elem(&cpu_infos, &key);

	return ci ? ci->llc : 0;
}

s32 BPF_STRUCT_OPS(llc_aware_select_cpu, struct task_struct *p, s32 prev_cpu,
		   u64 wake_flags)
{
	u32 llc = cpu_llc(prev_cpu);
	struct llc_mask *lm;
	s32 cpu = -EBUSY;

	/* An idle CPU in the home domain: prev, its sibling, then the LLC. */
	lm = bpf_map_lookup_elem(&llc_masks, &llc);
	if (lm && lm->mask)
		cpu = scx_bpf_select_cpu_and(p, prev_cpu, wake_flags,
					     cast_mask(lm->mask), 0);

	/* Leave home only when home is congested. */
	if (cpu < 0 && scx_bpf_dsq_nr_queued(LLC_DSQ(llc)) >= (s32)xllc_min)
		cpu = scx_bpf_select_cpu_and(p, prev_cpu, wake_flags,
					     p->cpus_ptr, 0);

	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		return cpu;
	}
	return prev_cpu;
}

void BPF_STRUCT_OPS(llc_aware_enqueue, struct task_struct *p, u64 enq_flags)
{
	u64 vtime = p->scx.dsq_vtime;

	if (vtime_before(vtime, vtime_now - slice_ns))
		vtime = vtime_now - slice_ns;

	scx_bpf_dsq_insert_vtime(p, LLC_DSQ(cpu_llc(scx_bpf_task_cpu(p))),
				 slice_ns, vtime, enq_flags);
}

void BPF_STRUCT_OPS(llc_aware_dispatch, s32 cpu, struct task_struct *prev)
{
	u32 home = cpu_llc(cpu), i, llc;

	if (scx_bpf_dsq_move_to_local(LLC_DSQ(home), 0))
		return;

	/* Steal from a congested domain; a domain's id is its first CPU's. */
	bpf_for(i, 1, nr_cpus) {
		llc = cpu_llc(((u32)cpu + i) % nr_cpus);
		if (llc == home ||
		    scx_bpf_dsq_nr_queued(LLC_DSQ(llc)) < (s32)xllc_min)
			continue;
		if (scx_bpf_dsq_move_to_local(LLC_DSQ(llc), 0))
			return;
	}
}

void BPF_STRUCT_OPS(llc_aware_running, struct task_struct *p)
{
	if (vtime_before(vtime_now, p->scx.dsq_vtime))
		vtime_now = p->scx.dsq_vtime;
}

void BPF_STRUCT_OPS(llc_aware_stopping, struct task_struct *p, bool runnable)
{
	u64 used = p->scx.slice < slice_ns ? slice_ns - p->scx.slice : 0;

	/* Charge the used part of the slice, scaled by the inverse weight. */
	scx_bpf_task_set_dsq_vtime(p, p->scx.dsq_vtime +
					scale_by_task_weight_inverse(p, used));
}

void BPF_STRUCT_OPS(llc_aware_enable, struct task_struct *p)
{
	scx_bpf_task_set_dsq_vtime(p, vtime_now);
}

/* Build the CPU -> LLC table, one DSQ and one cpumask per LLC. */
s32 BPF_STRUCT_OPS_SLEEPABLE(llc_aware_init)
{
	struct bpf_cpumask *mask, *old;
	struct cpu_info *ci;
	struct llc_mask *lm;
	u32 cpu, other, llc;
	const int *id;
	s32 ret;

	nr_cpus = scx_bpf_nr_cpu_ids();
	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;

	bpf_for(cpu, 0, nr_cpus) {
		llc = 0;
		if (cpus_per_llc) {
			llc = cpu / cpus_per_llc;
		} else if (bpf_ksym_exists(&sd_llc_id)) {
			id = bpf_per_cpu_ptr(&sd_llc_id, cpu);
			if (id && *id >= 0 && *id < MAX_CPUS)
				llc = *id;
		}
		ci = bpf_map_lookup_elem(&cpu_infos, &cpu);
		if (!ci)
			return -ENOENT;
		ci->llc = llc;
	}

	/* Each LLC is created when its lowest-numbered CPU is met. */
	bpf_for(cpu, 0, nr_cpus) {
		llc = cpu_llc(cpu);
		lm = bpf_map_lookup_elem(&llc_masks, &llc);
		if (!lm)
			return -ENOENT;
		if (lm->created)
			continue;
		lm->created = true;

		ret = scx_bpf_create_dsq(LLC_DSQ(llc), -1);
		if (ret)
			return ret;

		mask = bpf_cpumask_create();
		if (!mask)
			return -ENOMEM;
		bpf_for(other, 0, nr_cpus)
			if (cpu_llc(other) == llc)
				bpf_cpumask_set_cpu(other, mask);
		old = bpf_kptr_xchg(&lm->mask, mask);
		if (old)
			bpf_cpumask_release(old);
	}
	return 0;
}

void BPF_STRUCT_OPS(llc_aware_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(llc_aware_ops,
	       .select_cpu		= (void *)llc_aware_select_cpu,
	       .enqueue			= (void *)llc_aware_enqueue,
	       .dispatch		= (void *)llc_aware_dispatch,
	       .running			= (void *)llc_aware_running,
	       .stopping		= (void *)llc_aware_stopping,
	       .enable			= (void *)llc_aware_enable,
	       .init			= (void *)llc_aware_init,
	       .exit			= (void *)llc_aware_exit,
	       .name			= "llc_aware");
