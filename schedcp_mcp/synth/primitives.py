"""The catalog of algorithm primitives a generated scheduler is built from.

A scheduler spec picks one primitive per axis (queue, ordering, cpu_select, slice, preempt) and any
number of task classes. Each primitive says what it does, when to use it, where it fails, and the
`const volatile` knobs it brings (the same `Parameter` model as policy.json, so types and ranges are
checked by one piece of code). The templates in `templates/` implement exactly these names.

The mechanisms come from the kernel's tools/sched_ext examples, sched-ext/scx's bpfland, flash,
cosmos, lavd and beerland (see DESIGN.md "Beating the default scheduler"), and this repository's
policies; the code is our own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..repository.policies import Parameter

Axis = Literal["queue", "ordering", "cpu_select", "slice", "preempt", "task_class"]
AXES: tuple[Axis, ...] = ("queue", "ordering", "cpu_select", "slice", "preempt", "task_class")
MS = 1_000_000
US = 1_000


class Primitive(BaseModel):
    axis: Axis
    name: str
    what: str = Field(description="what it does")
    when: str = Field(description="when to choose it")
    fails: str = Field(description="where it fails")
    params: list[Parameter] = Field([], description="const volatile knobs it adds (name, type, default, range)")
    requires: str = Field("", description="constraints on the other axes, in words (checked by spec.py)")


def _p(name: str, type_: str, default, lo=None, hi=None, desc: str = "") -> Parameter:
    return Parameter(name=name, type=type_, default=default, min=lo, max=hi, description=desc)


# the knobs every generated scheduler has
COMMON_PARAMS = [
    _p("slice_ns", "u64", 5 * MS, 100 * US, 100 * MS,
       "Base time slice: how long a task runs before the CPU picks the next one."),
]

PRIMITIVES: list[Primitive] = [
    # ---------------------------------------------------------------- queues
    Primitive(
        axis="queue", name="global",
        what="One shared dispatch queue (DSQ) that every CPU serves.",
        when="Few CPUs, one LLC; work-conserving by construction; the best start on small machines "
             "and message-passing workloads.",
        fails="A contention point on many CPUs; tasks migrate freely and lose cache locality."),
    Primitive(
        axis="queue", name="builtin_global",
        what="The kernel's own global FIFO (SCX_DSQ_GLOBAL): no dispatch callback and no queue to "
             "create — the cheapest queue (lean_preempt, this repository's winner on hackbench and "
             "builds: under TCG every sched_ext callback is paid on every context switch).",
        when="Few CPUs, message passing and fork/exec churn, where per-switch overhead dominates.",
        fails="FIFO only (no vtime, no weights); the kernel's queue cannot be counted from BPF, so no "
              "scaled slices; no locality.",
        requires="ordering fifo; slice not scaled"),
    Primitive(
        axis="queue", name="per_cpu",
        what="One DSQ per CPU; a task queues on the CPU it last ran on; an idle CPU steals from "
             "another CPU's queue that holds at least steal_min tasks.",
        when="Cache-warm threads (thread-per-connection servers, pipelines), pinned work, many CPUs.",
        fails="Balance only by stealing: a CPU can hold a queue while another runs one long task; "
              "with steal off imbalance lasts until tasks sleep.",
        params=[_p("steal", "bool", True, desc="Idle CPUs take work from other CPUs' queues."),
                _p("steal_min", "u32", 1, 1, 1024,
                   "Only steal from a queue that holds at least this many tasks.")]),
    Primitive(
        axis="queue", name="per_llc",
        what="One DSQ per last-level-cache domain (the kernel's sd_llc_id, or cpus_per_domain); "
             "a CPU serves its domain first and steals from a domain holding xdom_min or more tasks.",
        when="Several LLCs (AMD CCXs, chiplets, multi-socket) with cache-sensitive parallel work.",
        fails="On a single-LLC machine it is a global queue with extra bookkeeping; a high xdom_min "
              "leaves one domain overloaded while another idles.",
        params=[_p("xdom_min", "u32", 2, 1, 1024,
                   "Steal from another domain only when it holds at least this many waiting tasks."),
                _p("cpus_per_domain", "u32", 0, 0, 1024,
                   "0: domains from the kernel topology; N: CPUs grouped N at a time (emulation).")]),
    Primitive(
        axis="queue", name="per_numa",
        what="One DSQ per NUMA node (scx_bpf_cpu_node, or cpus_per_domain); a CPU serves its node "
             "first and steals from a node holding xdom_min or more tasks.",
        when="Multi-socket / multi-node machines where remote memory is expensive.",
        fails="One node on most desktops and VMs: then a global queue with extra bookkeeping.",
        params=[_p("xdom_min", "u32", 2, 1, 1024,
                   "Steal from another domain only when it holds at least this many waiting tasks."),
                _p("cpus_per_domain", "u32", 0, 0, 1024,
                   "0: domains from the kernel topology; N: CPUs grouped N at a time (emulation).")]),
    # ---------------------------------------------------------------- ordering
    Primitive(
        axis="ordering", name="fifo",
        what="First in, first out: tasks run in the order they became runnable; nice is ignored.",
        when="Throughput of similar tasks (builds, message passing); the cheapest ordering.",
        fails="No weights and no sleeper credit: CPU hogs drown out interactive tasks.",
        requires="no wakeup preemption and no background class (nothing to compare)"),
    Primitive(
        axis="ordering", name="vtime",
        what="Weighted virtual time: a task's vtime advances by the CPU time it used over its weight "
             "(at most one slice per run); the queue runs the smallest vtime first. A sleeper keeps "
             "at most lag_ns of credit; no key is more than 4 slices ahead of the queue's now, so a "
             "low-weight task (nice 19 is charged 100x) waits behind a busy queue, not for seconds.",
        when="Mixed workloads where nice should matter; fairness between many competing tasks.",
        fails="Fairness is not latency: a woken interactive task with a large share waits its turn.",
        params=[_p("lag_ns", "u64", 20 * MS, 0, 1000 * MS,
                   "Sleep credit bound: a waking task's vtime is at least vtime_now - lag_ns.")]),
    Primitive(
        axis="ordering", name="deadline",
        what="Earliest deadline first over virtual time: deadline = vtime (sleep credit clamped to "
             "lag_ns) + the task's expected burst (capped at runtime_cap_ns, over its weight), "
             "divided by 1 + log2(1 + wakeups/s) when wake_freq_boost is on; never more than 4 "
             "slices ahead of the queue's now.",
        when="Latency under background load: short, frequent sleepers (input, audio, RPC threads) "
             "get early deadlines; the base of wakeup preemption.",
        fails="Per-task statistics take a few wakeups to adapt; a task can game the boost by "
              "sleeping briefly and often; slightly more overhead per switch.",
        params=[_p("lag_ns", "u64", 20 * MS, 0, 1000 * MS,
                   "Sleep credit bound: a waking task's vtime is at least vtime_now - lag_ns."),
                _p("runtime_cap_ns", "u64", 20 * MS, 100 * US, 1000 * MS,
                   "Cap on the burst term of the deadline (cosmos caps it at 20 ms)."),
                _p("wake_freq_boost", "bool", True,
                   desc="Divide the burst term by 1 + log2(1 + wakeups/s): frequent wakers go first.")]),
    # ---------------------------------------------------------------- CPU selection
    Primitive(
        axis="cpu_select", name="default",
        what="The kernel's idle-CPU selection (scx_bpf_select_cpu_dfl: prev CPU if idle, an idle SMT "
             "core, the LLC, then any); a task that finds an idle CPU is dispatched to it directly.",
        when="Almost always a good start: topology-aware and well tested.",
        fails="Ignores sync wakeups' cache affinity to the waker; no policy of its own."),
    Primitive(
        axis="cpu_select", name="builtin",
        what="No select_cpu callback at all: the kernel's built-in idle selection places a waking "
             "task and dispatches it to an idle CPU itself (with the kernel's default 20 ms slice).",
        when="With builtin_global and hog preemption: the fewest callbacks (lean_preempt).",
        fails="Tasks placed on idle CPUs get a 20 ms slice whatever slice_ns says; no policy of its "
              "own."),
    Primitive(
        axis="cpu_select", name="prev_sticky",
        what="The previous CPU if it is idle; otherwise any idle CPU when migrate_on_wakeup is set; "
             "otherwise the task waits on its previous CPU.",
        when="Cache-warm threads, with per-CPU queues.",
        fails="With migrate_on_wakeup off a busy CPU keeps its wakees while others idle.",
        params=[_p("migrate_on_wakeup", "bool", True,
                   desc="Leave a busy previous CPU for an idle one on wakeup.")]),
    Primitive(
        axis="cpu_select", name="llc_first",
        what="An idle CPU of the previous CPU's LLC domain first (prev, its sibling, the LLC), then "
             "an idle CPU anywhere.",
        when="Multi-LLC machines: keep a waking task near its cache.",
        fails="On one LLC it is the default selection with extra bookkeeping."),
    Primitive(
        axis="cpu_select", name="idle_core",
        what="SMT-aware: the previous CPU if its whole core is idle, then any fully idle core, then the "
             "previous CPU, then any idle CPU.",
        when="SMT machines running compute-heavy threads that slow each other on sibling threads.",
        fails="Without SMT it is prev-then-any; packs less tightly, so more cores wake (power)."),
    Primitive(
        axis="cpu_select", name="sync_waker",
        what="On a synchronous wakeup (SCX_WAKE_SYNC: the waker is about to sleep) the wakee goes to "
             "the waker's CPU when that CPU's local queue is empty (lavd); otherwise the default "
             "selection.",
        when="Pipe/socket ping-pong and producer-consumer pairs: the wakee finds the data in cache.",
        fails="A waker that does not sleep after a sync wakeup makes its wakee wait up to a slice."),
    # ---------------------------------------------------------------- slices
    Primitive(
        axis="slice", name="fixed",
        what="Every task gets slice_ns.",
        when="Simple and predictable; long slices for throughput, short ones for latency.",
        fails="One size fits none: long slices delay wakers, short ones cost throughput."),
    Primitive(
        axis="slice", name="scaled",
        what="slice_ns divided by the number of tasks waiting in the task's queue (bpfland), at least "
             "slice_min_ns.",
        when="Latency under load without hurting throughput when the machine is quiet.",
        fails="Many waiting tasks mean many switches: throughput of CPU-bound work drops.",
        params=[_p("slice_min_ns", "u64", 500 * US, 50 * US, 100 * MS,
                   "Lower bound of the scaled slice (must not exceed slice_ns).")],
        requires="slice_min_ns <= slice_ns"),
    Primitive(
        axis="slice", name="interactive",
        what="A task whose average burst (CPU time between wakeup and sleep) is below "
             "interactive_burst_ns gets interactive_slice_pct percent of slice_ns; others get "
             "slice_ns.",
        when="Let interactive tasks finish their short burst without being cut, keep hogs short "
             "(set slice_ns short and the percentage high).",
        fails="Needs a few wakeups to classify a task; a hog that sleeps briefly looks interactive.",
        params=[_p("interactive_burst_ns", "u64", 1 * MS, 10 * US, 100 * MS,
                   "Average burst below which a task counts as interactive."),
                _p("interactive_slice_pct", "u32", 200, 10, 1000,
                   "Slice of an interactive task, in percent of slice_ns.")]),
    # ---------------------------------------------------------------- preemption
    Primitive(
        axis="preempt", name="none",
        what="Never preempt: a woken task waits for a CPU to finish its slice (or go idle).",
        when="Throughput; when slices are short anyway.",
        fails="Sleepers wait behind CPU hogs for up to a slice (DESIGN: 4-45x EEVDF's p99 wakeup)."),
    Primitive(
        axis="preempt", name="kick_idle",
        what="After queuing a task, wake one idle CPU (SCX_KICK_IDLE) so it pulls the work at once "
             "(bpfland, flash, cosmos).",
        when="Shared or stealable queues where an idle CPU would otherwise sleep through queued work.",
        fails="Does nothing for a busy machine; more IPIs (costly under TCG).",
        requires="a queue an idle CPU can take from: not per_cpu with steal off"),
    Primitive(
        axis="preempt", name="wakeup",
        what="Guarded wakeup preemption (beerland, EEVDF): a woken task takes its CPU at once when its "
             "deadline/vtime is earlier than the running task's and that task has run at least "
             "preempt_min_ns. With preempt_direct it is inserted into that CPU's local queue with "
             "SCX_ENQ_PREEMPT; otherwise it is queued and the CPU kicked with SCX_KICK_PREEMPT. "
             "Per-CPU kthreads never preempt.",
        when="Wakeup latency under CPU hogs on a busy machine (the gap to the default scheduler).",
        fails="Peers that all wake often preempt each other: message passing slows if "
              "preempt_min_ns is too small.",
        params=[_p("preempt_min_ns", "u64", 500 * US, 0, 100 * MS,
                   "The running task is preempted only after it ran this long (must be < slice_ns)."),
                _p("preempt_direct", "bool", True,
                   desc="Insert the wakee into the CPU's local queue with SCX_ENQ_PREEMPT "
                        "(else queue it and kick the CPU).")],
        requires="ordering vtime or deadline; preempt_min_ns < slice_ns"),
    Primitive(
        axis="preempt", name="hog",
        what="Guarded wakeup preemption from what the kernel already tracks (lean_preempt): a waking "
             "task takes the CPU it woke on (SCX_DSQ_LOCAL_ON with SCX_ENQ_PREEMPT) when the task "
             "running there is a CPU hog next to it — its lifetime CPU time per voluntary sleep "
             "(sum_exec_runtime / (1 + nvcsw)) is at least hog_burst_ns and burst_ratio times the "
             "waker's — and an idle CPU it woke on is used at once. No per-task state; kthreads are "
             "never preempted.",
        when="Short sleepers woken beside CPU hogs, with any ordering (fifo included); message "
             "passing peers have similar bursts and do not preempt each other.",
        fails="The burst is a lifetime average: a task that turns from interactive to CPU-bound is "
              "judged by its past for a while.",
        params=[_p("hog_burst_ns", "u64", 4 * MS, 0, 1000 * MS,
                   "The running task is preempted only if its CPU time per voluntary sleep is at "
                   "least this."),
                _p("burst_ratio", "u64", 8, 1, 1000,
                   "...and more than this many times the waking task's.")]),
    # ---------------------------------------------------------------- task classes
    Primitive(
        axis="task_class", name="kthread",
        what="Kernel threads (PF_KTHREAD). treat=local dispatches per-CPU kthreads (ksoftirqd, "
             "kworkers) straight to their CPU's local queue; boost/background as for other classes.",
        when="Keep kernel work that a CPU depends on from queuing behind user tasks (bpfland).",
        fails="A busy kthread runs ahead of everyone for a slice."),
    Primitive(
        axis="task_class", name="short_lived",
        what="Tasks younger than young_ns (since they entered the scheduler): fork/exec churn such "
             "as build jobs and shell pipelines.",
        when="Builds and scripts: new processes start at once instead of queuing behind old ones.",
        fails="A long-running task is treated as short-lived for its first young_ns.",
        params=[_p("young_ns", "u64", 100 * MS, 1 * MS, 10_000 * MS,
                   "A task counts as short-lived for this long after it starts.")]),
    Primitive(
        axis="task_class", name="comm",
        what="Tasks whose command name (task->comm, 15 chars) matches a pattern: exact, or a prefix "
             "when the pattern ends with '*' (e.g. 'cc1*', 'postgres*', 'game*').",
        when="A known program deserves its own treatment: a build, a game, a database.",
        fails="Names can be changed (prctl) or shared; threads inherit the name of their process."),
    Primitive(
        axis="task_class", name="cgroup",
        what="Tasks whose cgroup (the leaf name in the cgroup v2 hierarchy) matches a pattern: exact, "
             "or a prefix when it ends with '*' (e.g. 'build*', 'db.service').",
        when="Services and containers managed by systemd or a container runtime.",
        fails="Only the leaf name is compared, not the path; tasks in the root cgroup match '/'."),
]

#: treatments a task class can get, and what they mean
CLASS_TREATMENTS = {
    "boost": "runs first: full sleep credit (vtime/deadline: key = vtime_now - lag_ns) or the head "
             "of the queue (fifo)",
    "background": "runs behind others: its key is bg_penalty_ns later, at most 4 slices ahead of the "
                  "queue's now so it still runs (vtime/deadline only)",
    "local": "per-CPU kthreads only: dispatched straight to their CPU's local queue",
}
CLASS_PARAMS = [
    _p("bg_penalty_ns", "u64", 20 * MS, 0, 1000 * MS,
       "How much later a background task's key is (added by every background class)."),
]
MAX_CLASSES = 4


def primitives(axis: str | None = None) -> list[Primitive]:
    return [p for p in PRIMITIVES if axis is None or p.axis == axis]


def get(axis: str, name: str) -> Primitive | None:
    return next((p for p in PRIMITIVES if p.axis == axis and p.name == name), None)


def names(axis: str) -> list[str]:
    return [p.name for p in PRIMITIVES if p.axis == axis]
