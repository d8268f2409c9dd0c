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


class MetricResult(BaseModel):
    metric: str
    direction: Direction
    baseline: float
    candidate: float
    ratio: float = Field(description="candidate / baseline")
    target_ratio: float | None = None
    met: bool | None = None


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
    policy: str | None
    params: dict[str, str]
    ops_name: str | None
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

    @property
    def running_s(self) -> float:
        return (self.ended_at or time.time()) - self.created_at


class IssuedToken(BaseModel):
    token: str
    report_id: str
    artifact_sha256: str
    target: str
    expires_at: float
