"""What layer 2 (the sandbox run: stress, correctness, same-boot A/B performance) says about a scheduler."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..models import Direction, LoaderExit, MetricResult
from ..sandbox.neighbours import HostShare
from ..workloads import Workload  # noqa: F401 — its home is the workloads room; imported from here too
from .evidence import Evidence
from .starvation import WaitSummary


class Spread(BaseModel):
    median: float
    min: float
    max: float
    rel_spread: float = Field(description="(max - min) / median")


class WorkloadResult(BaseModel):
    name: str
    metric: str
    unit: str
    direction: Direction
    baseline: list[float] = Field(description="samples under the default scheduler, in run order")
    candidate: list[float] = Field(description="samples under the candidate, in run order")
    baseline_stats: Spread | None = None
    candidate_stats: Spread | None = None
    pairs: int = Field(0, description="paired rounds the interval is from")
    ratio: float | None = Field(None, description="candidate/baseline: geometric mean of the per-round ratios")
    ratio_low: float | None = Field(None, description="low end of the ratio's confidence interval")
    ratio_high: float | None = Field(None, description="high end of the ratio's confidence interval")
    speedup: float | None = Field(None, description="> 1 = candidate better, whatever the direction")
    speedup_low: float | None = None
    speedup_high: float | None = None
    improvement: float | None = Field(
        None, description="speedup - 1: > 0 better than baseline (fraction), < 0 worse, whatever the direction")
    noise: float | None = Field(None, description="the interval's relative half-width: sqrt(high/low) - 1")
    verdict: Literal["better", "same", "worse", "undecided", "failed", "skipped"] = "same"
    secondary: list[MetricResult] = Field([], description="other metrics the workload reported (medians)")
    errors: list[str] = Field([], description="the workload's own errors (non-zero exit, unparsable output)")


class Gate(BaseModel):
    name: str
    passed: bool
    reason: str = Field(description="why it passed or, when it failed, what happened and what to do")
    kind: Literal["correctness", "performance"] = "correctness"
    threshold: float | None = Field(None, description="performance: the speedup the interval is held to")
    decided: bool = Field(True, description="performance: False when the interval straddles the threshold")
    workload: str | None = Field(None, description="performance: the workload whose interval this gate reads")


class StateSample(BaseModel):
    t: float = Field(description="guest uptime, seconds")
    phase: str = Field(description="what was going on, e.g. baseline-1, load-2, stress, unload")
    state: str = Field(description="/sys/kernel/sched_ext/state")
    ops: str = Field("", description="/sys/kernel/sched_ext/root/ops")
    nr_rejected: int | None = None


class StressSummary(BaseModel):
    duration_s: float
    stressors: dict[str, float] = Field({}, description="stressor -> bogo ops (stress-ng --metrics-brief)")
    samples: int = Field(0, description="sampling periods checked")
    workers: int = Field(0, description="stress-ng worker processes followed (times switched in, all threads)")
    stalled_workers: list[str] = Field([], description="workers that made no progress for a whole period")
    events: dict[str, int] = Field({}, description="sched_ext events counters changed during the stress")
    rc: int | None = None


class Layer2Result(BaseModel):
    passed: bool
    failure_reason: str | None = Field(None, description="the first failed gate's reason")
    ops_name: str
    params: dict[str, str] = {}
    correctness: list[Gate] = []
    performance: list[Gate] = []
    workloads: list[WorkloadResult] = []
    timeline: list[StateSample] = []
    kernel_log: list[str] = Field([], description="sched_ext lines of the guest's kernel log")
    stress: StressSummary | None = None
    starvation: list[WaitSummary] = Field([], description="per-task run-queue waits in the starvation phase: "
                                          "the default scheduler's side, then the candidate's")
    evidence: list[Evidence] = Field([], description="what explains the figures (validate.evidence): per traced "
                                     "phase (round 1's workloads, the starvation phase) and side, the run-queue "
                                     "waits, who they were behind, idle CPUs, the wake graph, switches")
    loader_exits: list[LoaderExit] = Field([], description="how the loader ended, per load (uei, stop_reason)")
    rounds: int = 0
    budget_s: float | None = Field(None, description="time budget the adaptive rounds kept to")
    counters: dict[str, int] = Field({}, description="the policy's own counters (its `schedcp_stats` map), "
                                     "summed over the candidate's measured runs")
    durations: dict[str, float] = Field({}, description="seconds per phase, and total")
    kernel_version: str | None = None
    retried_after: list[str] = Field([], description="guest kernel crashes after which the whole run was "
                                     "repeated in a fresh VM (TCG emulation faults; see runner)")
    host: HostShare | None = Field(None, description="what else used the host's CPUs while this measured")
    warnings: list[str] = Field([], description="what makes this verdict weak evidence (e.g. workloads "
                                "too noisy to show a regression)")
    note: str = ("timings are from a qemu VM (TCG when KVM is unavailable): only the ratios within this "
                 "one boot are meaningful, not the absolute figures")

    def metric_results(self) -> list[MetricResult]:
        """Per-workload primary metrics as learn.history MetricResults (for outcomes/rewards)."""
        out = []
        for w in self.workloads:
            if w.ratio is None or w.baseline_stats is None or w.candidate_stats is None:
                continue
            out.append(MetricResult(metric=w.metric, direction=w.direction, baseline=w.baseline_stats.median,
                                    candidate=w.candidate_stats.median, ratio=w.ratio))
        return out


class LoadAttempt(BaseModel):
    """One load of the candidate: the sched_ext state after it, and why it failed (None = it ran)."""

    state: str | None = None
    ops: str | None = None
    error: str | None = None


class Observations(BaseModel):
    """Raw facts the runner collected in the guest; `gates.correctness_gates` judges them. Kept apart
    from the verdict so the gate logic can be tested on recorded facts without a VM."""

    ops_name: str
    loads: list[LoadAttempt] = []
    loader_exits: list[LoaderExit] = Field([], description="how the loader ended, per load")
    kernel_log: list[str] = []
    timeline: list[StateSample] = []
    stress: StressSummary | None = None
    starvation: list[WaitSummary] = Field([], description="starvation phase, per side (baseline, candidate)")
    evidence: list[Evidence] = Field([], description="traced phases, per side (validate.evidence)")
    workload_errors: dict[str, list[str]] = {}
    hang: str | None = Field(None, description="what timed out, when the VM or a step did not answer")
    final_state: str | None = Field(None, description="sched_ext state after the final unload")
    final_ops: str | None = None
