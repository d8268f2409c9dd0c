"""The types that cross layers: what one layer produces and another reads.

A type lives here when more than one package uses it (observe's goals are judged by validate and
deploy; a MetricResult is made by validate and scored by learn; a loader's exit is read by verify,
validate and deploy; a Deployment is written by deploy and read by learn). Types that stay inside
one package live in that package. This module imports nothing from schedcp, so every layer may use it.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

Direction = Literal["lower", "higher"]


class Goal(BaseModel):
    metric: str = Field(description="e.g. wall_time_s, p99_wakeup_latency_us, throughput")
    direction: Direction
    target_ratio: float | None = Field(
        None, description="candidate/baseline bound, e.g. 0.9 = at least 10% better for 'lower'")
    why: str = ""


# --- one convention for every figure against the default scheduler ------------------------------
#
# Stored figures keep what was measured (`ratio` = candidate / baseline). Everything shown to a
# person or an agent uses ONE direction: "vs default", how many times better the candidate is,
# > 1 better and < 1 worse whatever the metric's direction (a time: baseline/candidate; a rate:
# candidate/baseline), and says it in words: "better by 1.40x", "worse by 3.20x".

def vs_default(ratio: float | None, direction: str) -> float | None:
    """candidate/baseline -> how many times better than the default scheduler (> 1 = better)."""
    if ratio is None or ratio != ratio:
        return None
    if direction == "lower":
        return float("inf") if ratio <= 0 else 1.0 / ratio
    return ratio


def times(x: float) -> str:
    """A factor for reading: 1.40x, 13.2x, 1010x; tiny ones with their significant digits."""
    if x == float("inf"):
        return "inf"
    if x >= 100:
        return f"{x:.0f}x"
    return f"{x:.2f}x" if 0.01 <= x < 10 else f"{x:.1f}x" if x >= 10 else f"{x:.2g}x"


def in_words(speedup: float | None, same_within: float = 0.005) -> str:
    """`better by 1.40x` / `worse by 3.20x` / `same (1.00x)` for a vs-default factor."""
    if speedup is None or speedup != speedup or speedup < 0:
        return "n/a"
    if speedup == 0:
        return "worse by inf"
    if abs(speedup - 1) <= same_within:
        return "same (1.00x)"
    return f"better by {times(speedup)}" if speedup > 1 else f"worse by {times(1 / speedup)}"


class MetricResult(BaseModel):
    metric: str
    direction: Direction
    baseline: float
    candidate: float
    ratio: float = Field(description="candidate / baseline")
    target_ratio: float | None = Field(None, description="the bound on `ratio` (candidate / baseline)")
    met: bool | None = None

    @property
    def speedup(self) -> float | None:
        """vs default: > 1 = better than the default scheduler, whatever the direction."""
        return vs_default(self.ratio, self.direction)

    @property
    def words(self) -> str:
        return in_words(self.speedup)


# --- a scheduler in a kernel ---------------------------------------------------------------------

class Uei(BaseModel):
    """The scheduler's exit info (`struct scx_exit_info` as the BPF side's UEI recorded it)."""

    kind: int = Field(0, description="enum scx_exit_kind: 0 none, 1..1023 clean, >= 1024 an error")
    kind_name: str = Field("", description="e.g. SCX_EXIT_ERROR_STALL, SCX_EXIT_UNREG")
    exit_code: int = 0
    reason: str = Field("", description="the kernel's reason, e.g. 'runnable task stall'")
    message: str = Field("", description="the scheduler's own message (scx_bpf_error / scx_bpf_exit)")
    dump: str = Field("", description="the kernel's dump of the scheduler's state at exit")


class LoaderExit(BaseModel):
    """What schedcp-loader reported when it ended (its final JSON line), without the libbpf log."""

    ok: bool = False
    stage: str = Field("", description="where it got to: params, load, attach, enabled, run, ...")
    error: str | None = None
    ops_name: str = ""
    root_ops: str = Field("", description="/sys/kernel/sched_ext/root/ops after attaching")
    state_attached: str = Field("", description="sched_ext state right after attaching")
    uei: Uei | None = None
    run_s: float = 0.0
    stop_reason: str | None = Field(None, description="signal, duration, scheduler_exited, "
                                    "kernel_disabled")


class SchedulerExit(BaseModel):
    """Why a scheduler stopped, in every party's words: the kernel's exit kind, the scheduler's
    own message, and the kernel log's `disabled (...)` line."""

    kind: Literal["clean", "error", "stall", "unknown"] = Field(
        description="clean: unloaded on request; error: the scheduler or kernel ended it with an "
                    "error; stall: the kernel's watchdog; unknown: no exit info was readable")
    kind_name: str = Field("", description="the kernel's enum scx_exit_kind name")
    reason: str = Field("", description="the kernel's reason (UEI reason)")
    message: str = Field("", description="the scheduler's own message (UEI msg)")
    kernel_line: str = Field("", description="the kernel log's 'sched_ext: BPF scheduler ... "
                             "disabled (...)' line")
    kernel_message: str = Field("", description="the kernel's lines after that one: for "
                                "scx_bpf_error() the scheduler's message and the backtrace (read from "
                                "the kernel log: also there when the scheduler recorded no exit info)")

    @property
    def is_error(self) -> bool:
        return self.kind in ("error", "stall")

    def describe(self) -> str:
        parts = [f"exit kind {self.kind_name or self.kind}"]
        if self.reason:
            parts.append(f"reason: {self.reason}")
        if self.message:
            parts.append(f"message: {self.message}")
        if self.kernel_line:
            parts.append(f"kernel: {self.kernel_line}")
        if self.kernel_message:
            parts.append("kernel message: " + " | ".join(self.kernel_message.splitlines()))
        return ", ".join(parts)


class ScxState(BaseModel):
    state: str = "unknown"
    ops: str | None = None
    enable_seq: int | None = None
    psi_some_avg10: float | None = None
    ctxt: int | None = None
    uptime_s: float | None = None

    @property
    def enabled(self) -> bool:
        return self.state == "enabled"


# --- deployment records (written by deploy/, read by learn/) ---------------------------------------

DeploymentStatus = Literal["active", "rolled_back", "failed", "superseded", "stopped"]


class Reading(BaseModel):
    at: float
    state: str
    ops: str | None = None
    psi_some_avg10: float | None = None
    ctx_switches_per_s: float | None = None
    metric: float | None = None
    ratio: float | None = Field(None, description="metric / baseline")
    degraded: bool = False
    note: str = ""


class MonitorPolicy(BaseModel):
    metric_cmd: str | None = Field(None, description="prints a number; run in the target")
    metric_direction: Direction = "lower"
    max_degradation_ratio: float | None = Field(
        None, description="rollback when the metric is worse than baseline by this ratio "
                          "(lower-is-better: metric/baseline > r; higher: baseline/metric > r); "
                          "default: derived from the report's goals (threshold_from_goals)")
    consecutive: int = Field(3, ge=1, description="... for this many consecutive samples")
    interval_s: float = Field(5.0, ge=0.5)
    workload_cmd: str | None = Field(None, description="background workload kept running in the target")


class Deployment(BaseModel):
    id: str
    created_at: float
    report_id: str
    artifact_sha256: str
    policy: str | None = None
    params: dict[str, str]
    ops_name: str | None = None
    target: str
    actor: str
    token_jti: str
    status: DeploymentStatus = "active"
    previous: ScxState
    baseline: float | None = None
    monitor: MonitorPolicy
    monitor_pid: int | None = None
    readings: list[Reading] = []
    consecutive_bad: int = 0
    ended_at: float | None = None
    end_reason: str | None = None
    exit: SchedulerExit | None = Field(None, description="why the scheduler stopped, when the "
                                       "kernel or the scheduler ended it")
    exit_info: str | None = Field(None, description="the raw exit info (loader JSON, kernel log)")
    scope: str | None = Field(None, description="None: system-wide; else the tasks moved to SCHED_EXT under "
                              "a partial-mode scheduler: pid:N, cgroup:PATH or command: CMD")
    scope_pid: int | None = Field(None, description="the scoped command's pid (a command scope)")

    @property
    def running_s(self) -> float:
        return (self.ended_at or time.time()) - self.created_at


class IssuedToken(BaseModel):
    token: str
    report_id: str
    artifact_sha256: str
    target: str
    expires_at: float
