"""What explains a validation's figures: the run-queue wait tracer's maps (runqwait.bpf.c) read into
per-phase evidence, one side at a time, comparable between the default scheduler and the candidate.

Where it is recorded, in the same boot as the A/B:

    starvation   the starvation phase (validate.starvation), each side with the tracer freshly attached
    <workload>   round 1 of the A/B: every workload's reps on each side with the tracer attached (both
                 sides traced, so what it costs falls on both; `TRACE_ROUNDS`)

What one side's evidence holds (all from the core scheduler's tracepoints, which a sched_ext policy
cannot hide a wait from):

    waits        per-task run-queue waits: how many, p50/p99 (log2 histogram, upper bounds), longest,
                 the worst waiters (validate.starvation.WaitSummary)
    behind whom  per task, the waits that ended when it was switched out: the CPU hogs others queued
                 behind; and waits that ended behind the CPU's idle task (queued on a CPU that sat
                 idle: nobody kicked it)
    idle         per CPU: idle time, and idle time while a task waited on another CPU (summed over
                 the waits)
    wake graph   waker -> wakee pairs: wakeups, how many crossed CPUs, the wakee's wait after them;
                 a pair that wakes each other both ways is a ping-pong
    switches     context switches, involuntary ones (switched out still runnable: preempted or the
                 slice ran out), migrations

`summary_lines(base, cand)` puts the two sides of one phase side by side in a few lines; plan.diagnose
reads the same figures (`features`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, Field

from ..errors import BadInput
from . import starvation
from .starvation import WaitSummary, _block, _value

#: rounds after whose measured runs each workload runs once more, traced (both sides). None by
#: default: those runs cost a validation about one round of its budget (lean_preempt's stability
#: runs got 3-5 rounds instead of 4-9 and left pipe undecided), and only a loss needs explaining.
#: `schedcp optimize` traces round 1 (SCHEDCP_TRACE_ROUNDS=1 in the server it starts), where the
#: re-plan reads the evidence; the starvation phase is always traced.
TRACE_ROUNDS: tuple[int, ...] = ()
#: measuring the tracer itself (docs/ab-method.md): SCHEDCP_TRACE_ROUNDS=all|none|1 and
#: SCHEDCP_TRACE_SIDE=both|<side> (e.g. `again`: an A/A whose A' side alone is traced shows its cost)
ROUNDS_ENV, SIDE_ENV = "SCHEDCP_TRACE_ROUNDS", "SCHEDCP_TRACE_SIDE"
#: the pairs, blockers and waiters a side's evidence names
TOP = 6
#: a task needs this many waits before it can be called a CPU hog (`hog`)
HOG_WAITS = 5
#: set to a directory to keep every traced phase's raw guest output there (fixtures for the rules)
RECORD_ENV = "SCHEDCP_EVIDENCE_RECORD"

DUMPS = starvation.DUMPS


class Blocker(BaseModel):
    """A task others waited behind: their waits ended when it was switched out."""

    comm: str
    pid: int
    blocked_ms: float = Field(description="the waits that ended when it was switched out, summed")
    waits: int
    involuntary: int = Field(0, description="times it was switched out still runnable (preempted, slice out)")


class WakeEdge(BaseModel):
    """Wakeups from one task to another."""

    waker: str
    waker_pid: int
    wakee: str
    wakee_pid: int
    wakeups: int
    cross_cpu: int = Field(description="wakeups that queued the wakee on another CPU than the waker's")
    wait_ms: float = Field(description="the wakee's run-queue waits after these wakeups, summed")

    @property
    def mean_wait_ms(self) -> float:
        return self.wait_ms / self.wakeups if self.wakeups else 0.0


class CpuEvidence(BaseModel):
    cpu: int
    idle_ms: float
    idle_while_waiting_ms: float = Field(description="idle while a task waited on another CPU, summed over waits")
    behind_idle: int = Field(description="waits that ended behind this CPU's idle task (queued on an idle CPU)")
    behind_idle_ms: float
    switches: int
    involuntary: int


class Evidence(BaseModel):
    """One side of one traced phase."""

    phase: str = Field(description="'starvation' or the workload whose round-1 runs were traced")
    side: str = Field(description="baseline (the default scheduler) or candidate")
    seconds: float | None = Field(None, description="how long the tracer's window was open")
    waits: WaitSummary
    wait_ms: float = Field(0.0, description="all run-queue waits, summed")
    p50_ms: float | None = None
    wakeups: int = 0
    cross_cpu: int = Field(0, description="wakeups onto another CPU than the waker's")
    migrations: int = 0
    switches: int = 0
    involuntary: int = Field(0, description="switches out of a task still runnable (preempted, slice out)")
    behind_hogs_ms: float = Field(0.0, description="waits that ended behind a CPU hog (a task switched out still "
                                  "runnable at least half the times it waited: preempted or sliced, not sleeping)")
    idle_ms: float = 0.0
    idle_while_waiting_ms: float = 0.0
    behind_idle: int = 0
    behind_idle_ms: float = 0.0
    cpus: list[CpuEvidence] = []
    blockers: list[Blocker] = Field([], description="who the waits ended behind, most waited-behind first")
    edges: list[WakeEdge] = Field([], description="waker -> wakee pairs with the most waiting after them")
    pingpong: list[WakeEdge] = Field([], description="pairs that wake each other both ways (the busier direction)")
    error: str | None = None

    def share(self, part_ms: float) -> float:
        return part_ms / self.wait_ms if self.wait_ms else 0.0

    def rate(self, n: float) -> float | None:
        return n / self.seconds if self.seconds else None

    def features(self) -> dict[str, float]:
        """The figures the diagnosis rules read (plan.diagnose), all comparable between sides."""
        top = self.blockers[0] if self.blockers else None
        pp = self.pingpong[0] if self.pingpong else None
        return {
            "waits": float(self.waits.waits),
            "wait_ms": self.wait_ms,
            "p50_ms": self.p50_ms or 0.0,
            "p99_ms": self.waits.p99_ms or 0.0,
            "max_ms": self.waits.max_ms,
            "mean_wait_ms": self.wait_ms / self.waits.waits if self.waits.waits else 0.0,
            "starved": float(len(self.waits.starved)),
            "top_blocker_share": self.share(top.blocked_ms) if top else 0.0,
            "behind_hogs_share": self.share(self.behind_hogs_ms),
            "idle_beside_share": self.share(self.idle_while_waiting_ms),
            "behind_idle_share": self.share(self.behind_idle_ms),
            "cross_cpu_share": self.cross_cpu / self.wakeups if self.wakeups else 0.0,
            "involuntary_share": self.involuntary / self.switches if self.switches else 0.0,
            "switches": float(self.switches),
            "migrations": float(self.migrations),
            "pingpong_same_cpu_share": (1 - pp.cross_cpu / pp.wakeups) if pp and pp.wakeups else 0.0,
            "pingpong_wait_ms": pp.mean_wait_ms if pp else 0.0,
        }

    def line(self) -> str:
        """One side in one line: how much waiting, where, behind whom."""
        if self.error:
            return f"{self.side}: no evidence ({self.error})"
        w = self.waits
        parts = [f"{w.waits} waits ({w.tasks} tasks), {self.wait_ms:.0f} ms in all, "
                 f"p50 <= {self.p50_ms or 0:.2g} ms, p99 <= {w.p99_ms or 0:.3g} ms, longest {w.max_ms:.0f} ms"]
        if self.blockers:
            b = self.blockers[0]
            parts.append(f"behind CPU hogs {self.share(self.behind_hogs_ms):.0%}, the most behind {b.comm}[{b.pid}] "
                         f"{self.share(b.blocked_ms):.0%}")
        parts.append(f"queued on an idle CPU {self.share(self.behind_idle_ms):.0%} ({self.behind_idle} waits)")
        parts.append(f"another CPU idle {self.share(self.idle_while_waiting_ms):.0%}")
        if self.wakeups:
            parts.append(f"cross-CPU wakeups {self.cross_cpu}/{self.wakeups}")
        parts.append(f"{self.involuntary}/{self.switches} switches involuntary, {self.migrations} migrations")
        if self.pingpong:
            p = self.pingpong[0]
            parts.append(f"ping-pong {p.waker}<->{p.wakee} {p.wakeups - p.cross_cpu}/{p.wakeups} on one CPU, "
                         f"{p.mean_wait_ms:.2f} ms wait per wakeup")
        if w.starved:
            parts.append(f"{len(w.starved)} starved")
        return f"{self.side}: " + "; ".join(parts)


def _ms(ns) -> float:
    return (ns or 0) / 1e6


def parse(phase: str, side: str, text: str, seconds: float | None = None) -> Evidence:
    """One side's Evidence from the guest's output of a traced phase (the `DUMPS` blocks)."""
    _record(phase, side, text)
    waits = starvation.parse_phase(side, text)
    ev = Evidence(phase=phase, side=side, seconds=seconds, waits=waits, error=waits.error)
    if waits.error:
        return ev
    rows = [(k, v) for k, v in map(_value, _block(text, "RQW") or []) if isinstance(v, dict)]
    ev.wait_ms = sum(_ms(v.get("total_ns")) for _, v in rows)
    ev.migrations = sum(int(v.get("migrations", 0)) for _, v in rows)
    blockers = [Blocker(comm=str(v.get("comm", "?")), pid=int(k), blocked_ms=_ms(v.get("blocked_ns")),
                        waits=int(v.get("blocked", 0)), involuntary=int(v.get("involuntary", 0)))
                for k, v in rows if v.get("blocked")]
    ev.blockers = sorted(blockers, key=lambda b: -b.blocked_ms)[:TOP]
    ev.behind_hogs_ms = sum(_ms(v.get("blocked_ns")) for _, v in rows if hog(v))
    hist = {int(k): int(v) for k, v in map(_value, _block(text, "RQH") or []) if isinstance(v, int)}
    total, seen = sum(hist.values()), 0
    for slot in sorted(hist):
        seen += hist[slot]
        if total and seen >= 0.5 * total:
            ev.p50_ms = 2 ** (slot + 1) / 1e6
            break
    for k, v in map(_value, _block(text, "RQC") or []):
        if not isinstance(v, dict) or not (v.get("switches") or v.get("idle_ns")):
            continue
        c = CpuEvidence(cpu=int(k), idle_ms=_ms(v.get("idle_ns")), idle_while_waiting_ms=_ms(v.get("idle_wait_ns")),
                        behind_idle=int(v.get("idle_behind", 0)), behind_idle_ms=_ms(v.get("idle_behind_ns")),
                        switches=int(v.get("switches", 0)), involuntary=int(v.get("involuntary", 0)))
        ev.cpus.append(c)
    ev.idle_ms = sum(c.idle_ms for c in ev.cpus)
    ev.idle_while_waiting_ms = sum(c.idle_while_waiting_ms for c in ev.cpus)
    ev.behind_idle = sum(c.behind_idle for c in ev.cpus)
    ev.behind_idle_ms = sum(c.behind_idle_ms for c in ev.cpus)
    ev.switches = sum(c.switches for c in ev.cpus)
    ev.involuntary = sum(c.involuntary for c in ev.cpus)
    edges = []
    for k, v in map(_value, _block(text, "RQE") or []):
        if not isinstance(k, dict) or not isinstance(v, dict) or not v.get("count"):
            continue
        edges.append(WakeEdge(waker=str(v.get("waker_comm", "?")), waker_pid=int(k.get("waker", 0)),
                              wakee=str(v.get("wakee_comm", "?")), wakee_pid=int(k.get("wakee", 0)),
                              wakeups=int(v["count"]), cross_cpu=int(v.get("xcpu", 0)), wait_ms=_ms(v.get("wait_ns"))))
    ev.wakeups = sum(e.wakeups for e in edges)
    ev.cross_cpu = sum(e.cross_cpu for e in edges)
    ev.edges = sorted(edges, key=lambda e: -e.wait_ms)[:TOP]
    ev.pingpong = pingpongs(edges)[:TOP]
    return ev


def hog(v: dict) -> bool:
    """A CPU hog, by what the tracer saw of it: it waited at least HOG_WAITS times, and at least half
    of those waits began with it switched out still runnable (preempted or its slice out), not asleep."""
    n = int(v.get("count", 0))
    return n >= HOG_WAITS and 2 * int(v.get("involuntary", 0)) >= n


def pingpongs(edges: list[WakeEdge], min_wakeups: int = 20) -> list[WakeEdge]:
    """Pairs that wake each other both ways, at least `min_wakeups` each way (the busier direction,
    its counts the pair's sum), most wakeups first. Wakeups from the idle task (interrupts) are not
    a pair."""
    by = {(e.waker_pid, e.wakee_pid): e for e in edges if e.waker_pid and e.wakee_pid}
    out, seen = [], set()
    for (a, b), e in by.items():
        back = by.get((b, a))
        if not back or (b, a) in seen or a == b or min(e.wakeups, back.wakeups) < min_wakeups:
            continue
        seen.add((a, b))
        first = e if e.wakeups >= back.wakeups else back
        out.append(first.model_copy(update={"wakeups": e.wakeups + back.wakeups,
                                            "cross_cpu": e.cross_cpu + back.cross_cpu,
                                            "wait_ms": e.wait_ms + back.wait_ms}))
    return sorted(out, key=lambda e: -e.wakeups)


def traced(rnd: int, side: str) -> bool:
    """Whether round `rnd`'s `side` runs with the tracer attached (TRACE_ROUNDS, or the env knobs)."""
    if side == "warmup":
        return False
    rounds = os.environ.get(ROUNDS_ENV, "").strip().lower()
    sides = os.environ.get(SIDE_ENV, "both").strip().lower()
    if sides not in ("both", "", side):
        return False
    if rounds == "all":
        return True
    if rounds == "none":
        return False
    if rounds:
        try:
            return rnd in {int(x) for x in rounds.split(",")}
        except ValueError:
            raise BadInput(f"{ROUNDS_ENV}={rounds!r} is not all, none or round numbers",
                           "e.g. SCHEDCP_TRACE_ROUNDS=all or 1,2") from None
    return rnd in TRACE_ROUNDS


def summary_lines(base: Evidence | None, cand: Evidence | None, counters: dict[str, int] | None = None) -> list[str]:
    """One phase's two sides in a few lines, and the policy's own counters when it keeps any."""
    phase = (cand or base).phase if (cand or base) else "?"
    out = [f"{phase}:"]
    for ev in (base, cand):
        if ev is not None:
            out.append("  " + ev.line())
    if counters:
        out.append("  policy counters: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    return out


def wrap(tag: str, body: str, tracer: str) -> str:
    """A guest script that runs `body` with the tracer attached and its window open, then prints the
    maps between `@@EVB tag` and `@@EVE tag` (with the window's guest seconds)."""
    return (starvation.attach(tracer) +
            f"echo '@@EVB {tag}'\n"
            f"read t0 _ </proc/uptime; {starvation.ON.format(1)}\n"
            f"{body}"
            f"{starvation.ON.format(0)}; read t1 _ </proc/uptime; echo \"@@EVT $t0 $t1\"\n"
            f"{DUMPS}echo '@@EVE {tag}'\nrm -rf {starvation.PIN_DIR} {starvation.MAP_DIR}\n")


def parse_wrapped(text: str, side: str) -> list[Evidence]:
    """Every `wrap`ped block of a step's output, as Evidence of `side`."""
    out = []
    for m in re.finditer(r"^@@EVB (\S+)\n(.*?)^@@EVE \1$", text, re.M | re.S):
        block = m.group(2)
        t = re.search(r"^@@EVT (\S+) (\S+)$", block, re.M)
        secs = float(t.group(2)) - float(t.group(1)) if t else None
        err = re.search(r"^@@RQWERR .*$", text[:m.start()].rsplit("@@EVE", 1)[-1], re.M)
        out.append(parse(m.group(1), side, (err.group(0) + "\n" if err else "") + block, secs))
    return out


def _record(phase: str, side: str, text: str) -> None:
    d = os.environ.get(RECORD_ENV)
    if not d:
        return
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    n = len(list(p.glob(f"{phase}-{side}-*.txt")))
    (p / f"{phase}-{side}-{n}.txt").write_text(text)
