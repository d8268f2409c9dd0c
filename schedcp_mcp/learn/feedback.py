"""Feedback: what a validation or a deployment achieved, as numbers and words an agent can reason from.

Reward (see history.reward): the mean, over the goal metrics (or all measured metrics when no goal
maps onto them), of the log-ratio improvement versus the default scheduler — ln(baseline/candidate)
for lower-is-better, ln(candidate/baseline) for higher-is-better — clipped to [-1, 1]. A run that
failed a correctness gate, or a deployment the kernel disabled, gets -1.
"""

from __future__ import annotations

import math
import statistics
from typing import Literal

from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput
from ..models import Deployment, Goal, MetricResult, SchedulerExit
from ..records import get_deployment
from ..reports import get_report
from ..workloads import list_workloads
from .history import Outcome, new_outcome, record, reward


class Feedback(BaseModel):
    subject_id: str
    source: Literal["sandbox", "deployment"]
    policy: str | None = None  # None: a source, not a repository policy (answers drop None fields)
    params: dict[str, str] = {}
    metrics: list[MetricResult]
    reward: float
    goals_met: bool
    duration_s: float | None = None
    rolled_back: bool = False
    rollback_reason: str | None = None
    exit: SchedulerExit | None = Field(None, description="why the scheduler stopped (the kernel's exit "
                                       "kind, the scheduler's own message, the kernel log line)")
    status: str
    summary: str
    outcome_id: str | None = None


def _goal_metrics_of(workload_name: str) -> list[str]:
    for w in list_workloads():
        if w.name == workload_name:
            return w.goal_metrics
    return []


#: without a goal, a metric is "met" when it is no worse than the default scheduler beyond the
#: A/B equivalence margin (validate.gates.MARGIN: 10 %)
NO_HARM = 1.10


def no_harm_bound(direction: str) -> float:
    """The candidate/baseline ratio a metric may reach and still do no harm."""
    return NO_HARM if direction == "lower" else 1 / NO_HARM


def apply_goals(metrics: list[MetricResult], goals: list[Goal],
                goal_map: dict[str, list[str]] | None = None) -> list[MetricResult]:
    """Mark each metric with the goal it serves (target ratio, met). A goal names a metric
    directly or through a workload's `goal_metrics`. Without any goal, every metric is held to 'no
    worse than the default scheduler' (beyond the 10 % margin); with goals, a metric no goal names
    is not judged (met None)."""
    goal_map = goal_map or {}
    out = []
    for m in metrics:
        g = next((g for g in goals if g.metric == m.metric or g.metric in goal_map.get(m.metric, [])),
                 None)
        target = g.target_ratio if g and g.target_ratio is not None else None
        if target is None and not goals:
            target = round(no_harm_bound(m.direction), 4)
        if target is None:
            ok = None
        elif m.direction == "lower":
            ok = m.ratio <= target
        else:
            ok = m.ratio >= target
        out.append(m.model_copy(update={"target_ratio": target, "met": ok}))
    return out


def report_feedback(report_id: str) -> Feedback:
    r = get_report(report_id)
    l2 = r.layer2
    if l2 is None:
        raise BadInput(f"report {r.id} has no sandbox results yet ({r.status})",
                       "validate it first: `schedcp validate --report ID` / validate_scheduler")
    goal_map = {w.metric: _goal_metrics_of(w.name) for w in l2.workloads}
    metrics = apply_goals(l2.metric_results(), r.goals, goal_map)
    correctness_ok = all(g.passed for g in l2.correctness)
    rew = reward([m for m in metrics if m.met is not None] or metrics) if correctness_ok else -1.0
    met = correctness_ok and all(m.met is not False for m in metrics) and l2.passed
    best = max(metrics, key=lambda m: abs(math.log(m.ratio)) if m.ratio > 0 else math.inf, default=None)
    summary = (f"Sandbox validation of {r.policy or 'a custom source'} {'passed' if l2.passed else 'failed'}"
               + (f" ({l2.failure_reason})" if l2.failure_reason else "")
               + f": reward {rew:+.3f}; "
               + ", ".join(f"{m.metric} {m.words}" for m in metrics)
               + (f". Largest change: {best.metric} ({best.words})." if best else ".")
               + " (vs the default scheduler)")
    return Feedback(subject_id=r.id, source="sandbox", policy=r.policy, params=r.params,
                    metrics=metrics, reward=round(rew, 4), goals_met=met,
                    duration_s=l2.durations.get("total"), status=r.status, summary=summary)


def deployment_feedback(d: Deployment) -> Feedback:
    values = [x.metric for x in d.readings if x.metric is not None]
    metrics = []
    if values and d.baseline:
        cand = statistics.median(values)
        metrics.append(MetricResult(metric=d.monitor.metric_cmd or "metric",
                                    direction=d.monitor.metric_direction, baseline=d.baseline,
                                    candidate=cand, ratio=round(cand / d.baseline, 4),
                                    target_ratio=(d.monitor.max_degradation_ratio or 1.10)
                                    if d.monitor.metric_direction == "lower"
                                    else 1 / (d.monitor.max_degradation_ratio or 1.10)))
        m = metrics[0]
        m.met = m.ratio <= m.target_ratio if m.direction == "lower" else m.ratio >= m.target_ratio
    killed = bool(d.exit and d.exit.is_error) or bool(d.end_reason and "kernel disabled" in d.end_reason)
    rew = -1.0 if killed else reward(metrics)
    rolled = d.status == "rolled_back"
    summary = (f"Deployment {d.id} of {d.policy or 'a custom source'} on {d.target}: {d.status}"
               + (f" ({d.end_reason})" if d.end_reason else "")
               + f", ran {d.running_s:.0f}s, {len(d.readings)} monitor samples"
               + (f"; metric median {metrics[0].candidate:.3g} vs baseline {d.baseline:.3g} "
                  f"({metrics[0].words} than before the deploy)" if metrics else "; no metric samples yet")
               + f"; reward {rew:+.3f}.")
    return Feedback(subject_id=d.id, source="deployment", policy=d.policy, params=d.params,
                    metrics=metrics, reward=round(rew, 4),
                    goals_met=not rolled and all(m.met is not False for m in metrics),
                    duration_s=round(d.running_s, 1), rolled_back=rolled, rollback_reason=d.end_reason
                    if rolled else None, exit=d.exit, status=d.status, summary=summary)


def get_feedback(subject_id: str) -> Feedback:
    if subject_id.startswith("dep-"):
        fb = deployment_feedback(get_deployment(subject_id))
    elif subject_id.startswith("rep-"):
        fb = report_feedback(subject_id)
    else:
        raise BadInput(f"{subject_id!r} is neither a deployment (dep-…) nor a report (rep-…) id",
                       "see `schedcp status` and `schedcp reports` (MCP: get_status, get_report)")
    existing = [o for o in store.list_records("outcome", Outcome, limit=2000)
                if subject_id in (o.report_id, o.deployment_id)]
    if existing:
        fb.outcome_id = existing[0].id
    return fb


def _policy_key(policy: str | None) -> str:
    return policy or "custom"


def record_validation_outcome(report_id: str, outcome_id: str | None = None) -> Outcome:
    """`outcome_id`: a fixed id, so that a validation job run again records one outcome, not two."""
    r = get_report(report_id)
    fb = report_feedback(report_id)
    return record(new_outcome(id=outcome_id, source="sandbox", policy=_policy_key(r.policy),
                              params={k: int(v) for k, v in r.params.items() if v.lstrip("-").isdigit()},
                              source_sha256=r.source_sha256, profile_id=r.profile_id, report_id=r.id,
                              candidate_id=r.candidate_id, provenance=r.provenance,
                              metrics=fb.metrics, reward=fb.reward, goals_met=fb.goals_met,
                              note=fb.summary))


def record_deployment_outcome(d: Deployment) -> Outcome:
    fb = deployment_feedback(d)
    try:
        r = get_report(d.report_id)
        profile_id, sha, cid, prov = r.profile_id, r.source_sha256, r.candidate_id, r.provenance
    except Exception:  # noqa: BLE001 - the report may have been removed; the outcome still counts
        profile_id, sha, cid, prov = None, None, None, None
    return record(new_outcome(source="deployment", policy=_policy_key(d.policy),
                              params={k: int(v) for k, v in d.params.items() if v.lstrip("-").isdigit()},
                              source_sha256=sha, profile_id=profile_id, report_id=d.report_id,
                              deployment_id=d.id, candidate_id=cid, provenance=prov,
                              metrics=fb.metrics, reward=fb.reward,
                              goals_met=fb.goals_met, rolled_back=fb.rolled_back, note=fb.summary))
