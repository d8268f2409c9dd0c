"""Performance history: outcomes stored against (policy, parameters, source hash, workload profile),
and the similarity that lets an outcome on one workload inform the ranking for a similar one.

Similarity of two profiles = 1 - (weighted Euclidean distance of their normalized feature vectors /
sqrt(sum of weights)), in [0, 1] (weights in FEATURE_WEIGHTS); features are the 0..1 values in `WorkloadProfile.characteristics.features`
(cpu_utilization, wakeup_intensity, preemption, fork_intensity, io; rates on a log scale).
History score of a policy for a profile = sum(sim_i * reward_i) / (sum(sim_i) + 1) over its outcomes
on profiles with sim_i >= 0.6 — the +1 shrinks the score toward 0 when evidence is thin.

History knows its goal: given the metrics a plan will be judged on (`scorer_for(..., metrics=…)`), an
outcome that measured only some of them is narrow — a win on hackbench alone says nothing about the
wakeup probe — so its reward counts only when it is a loss (min(reward, 0)): a narrow win never
ranks a policy first for a broader goal, a narrow failure still warns.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import BaseModel, Field

from .. import store
from ..models import MetricResult
from ..names import check_policy_name
from ..observe.profile import WorkloadProfile, get_profile
from ..repository.policies import Policy
from ..repository.provenance import Provenance

KIND = "outcome"
MIN_SIMILARITY = 0.6
HISTORY_WEIGHT = 4.0  # one unit of reward is worth this much text relevance


class Outcome(BaseModel):
    id: str
    created_at: float
    source: Literal["sandbox", "deployment", "external"]
    policy: str = Field(description="policy name, or 'custom' for an unnamed source")
    params: dict[str, int] = {}
    source_sha256: str | None = None
    profile_id: str | None = None
    report_id: str | None = None
    deployment_id: str | None = None
    candidate_id: str | None = Field(None, description="the synthesized candidate (cand-…), if any")
    provenance: Provenance | None = Field(None, description="how that candidate was made")
    metrics: list[MetricResult] = []
    reward: float
    goals_met: bool
    rolled_back: bool = False
    note: str = ""


def reward(metrics: list[MetricResult]) -> float:
    """Mean log-improvement over the metrics, clipped to [-1, 1]:
    for 'lower' metrics ln(baseline/candidate), for 'higher' ln(candidate/baseline).
    0 = same as the default scheduler; +0.1 ≈ 10% better on average; a failed run gets -1."""
    if not metrics:
        return 0.0
    total = 0.0
    for m in metrics:
        b, c = max(m.baseline, 1e-12), max(m.candidate, 1e-12)
        total += math.log(b / c) if m.direction == "lower" else math.log(c / b)
    return max(-1.0, min(1.0, total / len(metrics)))


def record(outcome: Outcome) -> Outcome:
    store.put(KIND, outcome, ref=outcome.policy)
    return outcome


def new_outcome(**kw) -> Outcome:
    if kw.get("policy") != "custom":
        check_policy_name(kw.get("policy"))  # it becomes the outcome's key
    metrics = kw.get("metrics") or []
    if "reward" not in kw:
        kw["reward"] = reward(metrics)
    if "goals_met" not in kw:
        kw["goals_met"] = all(m.met is not False for m in metrics)
    return Outcome(id=kw.pop("id", None) or store.new_id("out"), created_at=time.time(), **kw)


def outcomes_for_policy(name: str, limit: int = 50) -> list[Outcome]:
    return store.list_records(KIND, Outcome, ref=name, limit=limit)


def all_outcomes(limit: int = 5000) -> list[Outcome]:
    return store.list_records(KIND, Outcome, limit=limit)


def similarity(a: WorkloadProfile, b: WorkloadProfile) -> float:
    return _feature_similarity(a.characteristics.features, b.characteristics.features)


def similarity_to_features(a: WorkloadProfile, features: dict[str, float]) -> float:
    """Similarity on the features both sides have (live samples lack some profile features)."""
    fa = {k: v for k, v in a.characteristics.features.items() if k in features}
    return _feature_similarity(fa, features)


#: behaviour-shape features weigh more than utilization, which contention on the machine shifts
FEATURE_WEIGHTS = {"wakeup_intensity": 2.0, "fork_intensity": 2.0, "io": 1.0, "cpu_utilization": 1.0,
                   "preemption": 0.5}


def _feature_similarity(fa: dict[str, float], fb: dict[str, float]) -> float:
    keys = sorted(set(fa) | set(fb))
    if not keys:
        return 0.0
    w = {k: FEATURE_WEIGHTS.get(k, 1.0) for k in keys}
    d = math.sqrt(sum(w[k] * (fa.get(k, 0.0) - fb.get(k, 0.0)) ** 2 for k in keys))
    return max(0.0, 1.0 - d / math.sqrt(sum(w.values())))


def narrow(o: Outcome, metrics: set[str] | None) -> bool:
    """Whether `o` measured fewer of `metrics` than all of them (None: every outcome is broad enough)."""
    return bool(metrics) and not metrics <= {m.metric for m in o.metrics}


def counted_reward(o: Outcome, metrics: set[str] | None) -> float:
    """The reward an outcome contributes for a goal on `metrics`: a narrow outcome's losses only."""
    return min(o.reward, 0.0) if narrow(o, metrics) else o.reward


def scorer_for(profile_id: str, metrics: set[str] | None = None):
    """A history scorer for `search_policies`: (policy) -> (score, reason). `metrics`: what the plan
    will be judged on; outcomes that measured fewer count only their losses (`counted_reward`)."""
    target = get_profile(profile_id)
    by_policy: dict[str, list[tuple[float, Outcome]]] = {}
    profiles: dict[str, WorkloadProfile | None] = {}
    for o in all_outcomes():
        if not o.profile_id:
            continue
        if o.profile_id not in profiles:
            profiles[o.profile_id] = store.get("profile", o.profile_id, WorkloadProfile)
        p = profiles[o.profile_id]
        if p is None:
            continue
        sim = similarity(target, p)
        if sim >= MIN_SIMILARITY:
            by_policy.setdefault(o.policy, []).append((sim, o))

    def score(policy: Policy) -> tuple[float, str]:
        rows = by_policy.get(policy.name)
        if not rows:
            return 0.0, ""
        wsum = sum(s for s, _ in rows)
        mean = sum(s * counted_reward(o, metrics) for s, o in rows) / (wsum + 1.0)
        best = max(rows, key=lambda r: r[0])
        few = sum(1 for _, o in rows if narrow(o, metrics) and o.reward > 0)
        return HISTORY_WEIGHT * mean, (
            f"history: {len(rows)} outcome(s) on similar workloads (best similarity {best[0]:.2f}), "
            f"weighted reward {mean:+.3f}" + (f"; {few} win(s) measured on fewer workloads than this goal's, "
                                               "not counted" if few else ""))

    return score
