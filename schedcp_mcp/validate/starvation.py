"""Layer 2's starvation phase: a load built to make a scheduler starve somebody, and a per-task
run-queue wait measured by a BPF tracer in the guest (runqwait.bpf.c) while it runs.

Why a phase of its own: the kernel's watchdog only sees a task left runnable for timeout_ms (3 s
here); a scheduler that makes a few tasks wait ~0.5 s every time they wake passes it and every
throughput figure (a mean over all wakeups does not see a starved few), and one whose starvation
needs a particular interleaving (lean_preempt at 1431b7b: a CPU's own queue refilled by steady
wakeups ahead of the global FIFO) trips it only when host timing happens to line up. The phase
builds each pattern on purpose, at once, on both vCPUs:

    hogs        CPU-bound tasks, unpinned and pinned to each CPU: the CPUs are never idle, so a
                queue served "only when nothing else runs" is never served
    ping-pong   a strict pipe ping-pong pair (schedcp-probe pingpong: write one byte, read one)
                pinned to each CPU: every switch on that CPU is a short wakeup, the refill that
                keeps one queue always ahead of another (lean_preempt at 1431b7b starved the CPU's
                pinned hog behind it)
    sleepers    periodic sleepers (many pids, threads and processes, pinned and not), at nice 0, at
                nice 5 and as SCHED_BATCH: the minorities a scheduler may leave behind (by pid,
                weight, policy, affinity)
    churn       fork/exit: new tasks (sched_wakeup_new), never seen before by the scheduler
    kthreads    the guest's own per-CPU kthreads (kworker, rcu, ksoftirqd) wake throughout

The same phase runs under the default scheduler first, then under the candidate, each with the tracer
freshly attached. The tracer records waits that begin or end in a window (WINDOW_S, from WARM_S after
the load started): the start-up burst of a dozen processes exec'ing at once made even the default
scheduler keep tasks waiting 2 s under TCG. After the load ends the system idles for SETTLE_S before
the tracer is read, so a starved task gets to run — and its wait is counted — once the competition
is gone.

The rule (`starved`, judged by gates.starvation_gate): a task is starved when it waited STARVE_MS or
more at least REPEAT times in the window, and those long waits are either a large share of all its
waits (SHARE: "a large fraction of a second each time it wakes") or longer than RELATIVE times the
longest wait of any task under the default scheduler in the same phase. Why repeats and a share, not
the longest single wait: under this 2-vCPU TCG guest the default scheduler itself leaves a task
waiting 250-700 ms now and then, on a busy host again and again — against itself in one boot (load
4, 2026-12-07) it kept a CPU hog waiting 250 ms or more 2 of 218 times and 3 of 68 times, and reached
465 ms on its first side — but a task that waits long on a small share of its wakeups is a hog
preempted many times, not a task left behind; the schedulers that starve a minority do it to the
same tasks every time (the starve_timer fixture: 19 of 19 waits, 2 of 2, 6 of 9). The relative arm
keeps a starved CPU hog (many short waits, a few very long ones) from hiding behind its share. The
candidate fails when it starves more tasks than the default scheduler did in the same phase; the
reason names them (comm, pid, how many long waits of how many, the longest). Tasks that asked to
wait (nice >= BACKGROUND_NICE, SCHED_IDLE) are named among the worst but never counted as starved:
the default scheduler itself left nice-19 khugepaged waiting 600 ms twice in one A/A phase. A stall
past the watchdog's timeout is the no_stall gate's.

Time the guest lost to its host is not charged (runqwait.bpf.c: a busy CPU with no tick or switch for
over 20 ms did not run; a wait is charged minus what every CPU lost during it). On the busy host of
the A/A above that was 11-23 ms a side: TCG under load runs the guest slowly rather than not at all,
so the share rule, not this, is what keeps such a host from failing the default scheduler.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, Field


TRACER_SRC = Path(__file__).parent / "runqwait.bpf.c"
PIN_DIR = "/sys/fs/bpf/schedcp-rqw"
#: the tracer's maps, pinned: the switch and the dumps name this instance's maps by path, never by
#: name (a map of the tracer attached just before, still being freed, has the same name)
MAP_DIR = "/sys/fs/bpf/schedcp-rqw-maps"
#: a task that waited this long on a run queue at least REPEAT times in the window is starved
STARVE_MS = 250.0
REPEAT = 2
#: ...and those long waits are at least this share of all its waits
SHARE = 0.25
#: ...or its longest wait is more than this many times the default scheduler's longest in the phase
RELATIVE = 2.0
#: tasks at this nice or above (or SCHED_IDLE) are background by their own request: counted, named in
#: the summary, never "starved" (the default scheduler left nice-19 khugepaged waiting 600 ms twice
#: in one A/A phase)
BACKGROUND_NICE = 10
SCHED_IDLE = 5
#: seconds of load per side; the tracer's window within it; idle afterwards before the tracer is read
DURATION_S = 6
WARM_S = 1.0
WINDOW_S = 4.0
SETTLE_S = 1.0
#: the tasks a summary names
TOP = 8

#: the phase's load (busy box sh; $PROBE is schedcp-probe, $D the duration in seconds). Every
#: process is bounded by `timeout` as well as its own duration.
LOAD = r"""
ms=$((D * 1000))
run() { timeout -s KILL $((D + 5)) "$@" >/dev/null 2>&1 & }
run stress-ng --cpu 2 --cpu-method int64 -t $D
run taskset -c 0 stress-ng --cpu 1 --cpu-method int64 -t $D
run taskset -c 1 stress-ng --cpu 1 --cpu-method int64 -t $D
run $PROBE pingpong -c 0 -d $ms
run $PROBE pingpong -c 1 -d $ms
run stress-ng --affinity 1 --sleep 1 --sleep-max 16 -t $D
run $PROBE wakeup -t 6 -H 0 -p 4000 -d $ms
run $PROBE wakeup -t 4 -H 0 -p 9000 -d $ms -P
run nice -n 5 $PROBE wakeup -t 3 -H 0 -p 6000 -d $ms
run chrt -b 0 $PROBE wakeup -t 2 -H 0 -p 7000 -d $ms
run stress-ng --fork 1 -t $D
"""
#: the tracer's on/off switch (rqw_on[0], a u64)
ON = f"bpftool map update pinned {MAP_DIR}/rqw_on key 0 0 0 0 value {{}} 0 0 0 0 0 0 0"
#: the tracer's maps as the guest prints them: per task, the wait histogram, the wake graph, per CPU
DUMPS = (f"echo '@@RQW'; bpftool map dump pinned {MAP_DIR}/rqw_tasks 2>/dev/null; echo '@@RQWEND'\n"
         f"echo '@@RQH'; bpftool map dump pinned {MAP_DIR}/rqw_hist 2>/dev/null; echo '@@RQHEND'\n"
         f"echo '@@RQE'; bpftool map dump pinned {MAP_DIR}/rqw_wakes 2>/dev/null; echo '@@RQEEND'\n"
         f"echo '@@RQC'; bpftool map dump pinned {MAP_DIR}/rqw_cpus 2>/dev/null; echo '@@RQCEND'\n")


class TaskWait(BaseModel):
    """One task's run-queue waits during a phase."""

    pid: int
    tgid: int
    comm: str
    max_ms: float = Field(description="its longest single wait, ms")
    mean_ms: float
    waits: int
    over_50ms: int = Field(description="waits of 50 ms or more")
    long_waits: int = Field(0, description=f"waits of {STARVE_MS:.0f} ms or more")
    cpu: int = Field(description="the CPU its longest wait ended on")
    excused_ms: float = Field(0.0, description="wait time not charged: every CPU was stopped by the host")
    nice: int
    policy: int = Field(description="0 normal, 3 batch, 5 idle, 7 ext, 1/2 RT")
    kthread: bool


class WaitSummary(BaseModel):
    """Per-task run-queue waits under one scheduler during the starvation phase."""

    side: str = Field(description="baseline (the default scheduler) or candidate")
    tasks: int = Field(0, description="tasks that waited at least once")
    waits: int = 0
    max_ms: float = 0.0
    p99_ms: float | None = Field(None, description="99th percentile of all waits (log2 histogram: upper bound)")
    over_50ms: int = 0
    worst: list[TaskWait] = Field([], description=f"the {TOP} tasks with the longest single wait")
    starved: list[TaskWait] = Field([], description=f"tasks that waited {STARVE_MS:.0f} ms or more at least "
                                    f"{REPEAT} times")
    host_stall_ms: float = Field(0.0, description="time the guest's CPUs did not run while traced (the host "
                                 "did not run them), the most any CPU lost; waits are charged without it")
    error: str | None = Field(None, description="why the tracer gave no figures")

    def line(self) -> str:
        if self.error:
            return f"{self.side}: no figures ({self.error})"
        names = ", ".join(f"{t.comm}[{t.pid}] {t.max_ms:.0f} ms" for t in self.worst[:3])
        stall = f", host stalled it {self.host_stall_ms:.0f} ms (not charged)" if self.host_stall_ms >= 1 else ""
        return (f"{self.side}: {self.tasks} tasks, {self.waits} waits, longest {self.max_ms:.0f} ms, "
                f"{self.over_50ms} over 50 ms, {len(self.starved)} starved{stall}; worst: {names or '-'}")


def ensure_tracer() -> Path:
    """The compiled tracer object, built by the sandbox toolchain and cached by its source's hash."""
    from ..sandbox import toolchain
    from .workloads import built_in_toolchain

    return built_in_toolchain(TRACER_SRC, "runqwait.bpf.o",
                              ["clang", *toolchain.bpf_cflags(), "-c", "runqwait.bpf.c", "-o", "runqwait.bpf.o"],
                              timeout_s=180)


def phase_script(side: str, tracer: str, probe: str, duration_s: int = DURATION_S) -> str:
    """The guest script of one side: attach the tracer, run the load, settle, print the maps."""
    return (f"{attach(tracer)}"
            f"snap starve-{side}\n"
            f"(D={duration_s}; PROBE={probe}\n{LOAD}\n"
            f"sleep {WARM_S}; {ON.format(1)}; sleep {WINDOW_S}; {ON.format(0)}\n"
            "wait)\n"
            f"sleep {SETTLE_S}\n"
            f"snap starve-{side}\n"
            f"{DUMPS}rm -rf {PIN_DIR} {MAP_DIR}\n")


def attach(tracer: str) -> str:
    """Guest script: attach the tracer afresh (links and maps pinned), or print `@@RQWERR why`."""
    return (f"rm -rf {PIN_DIR} {MAP_DIR}; mkdir -p {PIN_DIR}\n"
            f"bpftool prog loadall {tracer} {PIN_DIR} pinmaps {MAP_DIR} autoattach >$L/rqw.err 2>&1 || "
            f"echo \"@@RQWERR $(tail -c 300 $L/rqw.err | tr '\\n' ' ')\"\n")


def _block(text: str, tag: str):
    m = re.search(rf"^@@{tag}$(.*?)^@@{tag}END$", text, re.M | re.S)
    if not m or not m.group(1).strip():
        return None
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return None


def _value(row) -> tuple[object, object]:
    row = row.get("formatted", row) if isinstance(row, dict) else {}
    return row.get("key"), row.get("value")


def parse_phase(side: str, text: str) -> WaitSummary:
    """A side's WaitSummary from the guest's output of `phase_script`."""
    err = re.search(r"^@@RQWERR (.*)$", text, re.M)
    rows = _block(text, "RQW")
    if err or rows is None:
        return WaitSummary(side=side, error=(err.group(1).strip() if err else "the tracer's map was not readable"))
    tasks = []
    for row in rows:
        pid, v = _value(row)
        if not isinstance(v, dict) or not v.get("count"):
            continue
        tasks.append(TaskWait(pid=int(pid), tgid=int(v["tgid"]), comm=str(v["comm"]), max_ms=v["max_ns"] / 1e6,
                              mean_ms=v["total_ns"] / v["count"] / 1e6, waits=int(v["count"]),
                              over_50ms=int(v["over"]), long_waits=int(v.get("starved", 0)),
                              cpu=int(v["cpu"]), nice=int(v["prio"]) - 120,
                              excused_ms=int(v.get("excused_ns", 0)) / 1e6,
                              policy=int(v["policy"]), kthread=bool(v["kthread"])))
    tasks.sort(key=lambda t: -t.max_ms)
    s = WaitSummary(side=side, tasks=len(tasks), waits=sum(t.waits for t in tasks),
                    max_ms=tasks[0].max_ms if tasks else 0.0, over_50ms=sum(t.over_50ms for t in tasks),
                    worst=tasks[:TOP], starved=[t for t in tasks if starved(t)][:TOP])
    lost = [int(v.get("lost_window_ns", 0)) for _, v in map(_value, _block(text, "RQC") or [])
            if isinstance(v, dict)]
    s.host_stall_ms = max(lost, default=0) / 1e6
    hist = {int(k): int(v) for k, v in map(_value, _block(text, "RQH") or []) if isinstance(v, int)}
    total = sum(hist.values())
    if total:
        seen = 0
        for slot in sorted(hist):
            seen += hist[slot]
            if seen >= 0.99 * total:
                s.p99_ms = 2 ** (slot + 1) / 1e6  # the slot's upper bound
                break
    return s


def starved(t: TaskWait, default_max_ms: float | None = None) -> bool:
    """REPEAT long waits or more, a SHARE of its waits or (given the default scheduler's longest wait in
    the same phase) more than RELATIVE times that; never a task that asked to wait."""
    if t.long_waits < REPEAT or background(t):
        return False
    return (t.long_waits >= SHARE * t.waits
            or (default_max_ms is not None and t.max_ms > RELATIVE * default_max_ms))


def foreground_max_ms(s: WaitSummary) -> float:
    """The longest wait of a task that did not ask to wait (the worst list holds the longest)."""
    return max((t.max_ms for t in s.worst if not background(t)), default=0.0)


def background(t: TaskWait) -> bool:
    """A task that asked to wait: nice BACKGROUND_NICE or more, or SCHED_IDLE."""
    return t.nice >= BACKGROUND_NICE or t.policy == SCHED_IDLE


def describe(t: TaskWait) -> str:
    return (f"{t.comm}[{t.pid}]{' (kthread)' if t.kthread else ''} waited {STARVE_MS:.0f} ms or more "
            f"{t.long_waits} times of {t.waits} (longest {t.max_ms:.0f} ms)")
