"""OptimizationPlan: the planning agent's stored decision, handed to the execution agent by id.

A plan says which workload profile it serves, which sandbox workloads will judge the candidates,
the goals, the strategy (reconfigure an existing policy, revise one, or generate a new one) with the
reason for it, and the candidates in the order to try them. Records are stored like every other
(kind "plan" in the records table), so no migration is needed.

Plans are edited by version: a re-plan (after a round whose candidates all failed, from their
diagnoses) is a new plan that `replaces` the one before it, with the lessons it was made from
(`lessons`: candidate -> why it lost -> change); the earlier versions stay as they were
(`plan_versions` walks the chain).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from . import store
from .candidates import check_goals_measurable, measurable_goals
from .errors import BadInput
from .models import Goal
from .observe.profile import get_profile
from .reports import get_report
from .repository.policies import get_policy
from .workloads import get_workloads

KIND = "plan"
Strategy = Literal["reconfigure", "revise", "generate"]
#: the order planning prefers: cheapest and best-known first (see agents/planning.md)
STRATEGY_ORDER: tuple[Strategy, ...] = ("reconfigure", "revise", "generate")


class PlannedCandidate(BaseModel):
    policy: str | None = Field(None, description="a repository policy, run with `params`")
    params: dict[str, str] = Field({}, description="parameters by name (policy) or const volatile "
                                                   "(report/source)")
    report_id: str | None = Field(None, description="or: a report from submit_scheduler (e.g. a "
                                                    "revised or generated source already through layer 1)")
    source: str | None = Field(None, description="or: BPF C source written for this plan")
    strategy: Strategy = Field(description="how this candidate came about")
    why: str = Field(description="why it is worth trying for this profile")

    @model_validator(mode="after")
    def _one_artifact(self) -> "PlannedCandidate":
        if sum(x is not None for x in (self.policy, self.report_id, self.source)) != 1:
            raise ValueError("a candidate names exactly one of policy, report_id or source")
        return self

    @property
    def label(self) -> str:
        if self.policy:
            ps = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
            return self.policy + (f"[{ps}]" if ps else "")
        return self.report_id or "source"


class Lesson(BaseModel):
    """Why a candidate of the replaced plan lost, and what this plan changes for it (diagnose.py)."""

    candidate: str = Field(description="the candidate that lost (its label)")
    report_id: str | None = None
    rule: str = Field(description="the diagnosis rule that fired")
    evidence: str = Field(description="the figures behind it")
    change: str = Field(description="the change, in words (the tool and what it sets)")
    next_candidate: str | None = Field(None, description="the candidate of this plan that carries the change")


class OptimizationPlan(BaseModel):
    id: str
    created_at: float = Field(default_factory=time.time)
    profile_id: str
    workloads: list[str] = Field(description="sandbox workloads that judge the candidates")
    goals: list[Goal]
    strategy: Strategy
    rationale: str = Field(description="why this strategy and these candidates")
    candidates: list[PlannedCandidate]
    budget_s: float | None = Field(None, description="wall-clock budget for executing the plan")
    author: str = "agent"
    version: int = Field(1, description="1 for a first plan; the replaced plan's version + 1")
    replaces: str | None = Field(None, description="the plan this version replaces (plan-…)")
    lessons: list[Lesson] = Field([], description="why the replaced plan's candidates lost and what changed")


def create_plan(profile_id: str, workloads: list[str], goals: list[Goal] | None, strategy: str,
                rationale: str, candidates: list[PlannedCandidate], budget_s: float | None = None,
                author: str = "agent", replaces: str | None = None,
                lessons: list[Lesson] | None = None) -> OptimizationPlan:
    """Check a plan against what exists (profile, policies and their parameters, reports, workloads,
    goals the workloads measure) and store it. A plan that could not run is refused now, not
    minutes into a validation. No goals: the profile's goals that the workloads measure.
    `replaces`: the plan this one is the next version of (same profile); it stays stored."""
    from .access import check_cap

    check_cap("plan_candidates", len(candidates), author, "candidates in one plan")
    check_cap("plan_workloads", len(workloads), author, "workloads in one plan")
    check_cap("text_chars", len(rationale), author, "characters of rationale")
    prof = get_profile(profile_id)
    if strategy not in STRATEGY_ORDER:
        raise BadInput(f"unknown strategy {strategy!r}", "one of: " + ", ".join(STRATEGY_ORDER))
    if not rationale.strip():
        raise BadInput("a plan needs a rationale", "say why this strategy and these candidates")
    if not candidates:
        raise BadInput("a plan needs at least one candidate",
                       "find one with search_policies, or write one")
    if not workloads:
        raise BadInput("a plan needs at least one sandbox workload", "see list_workloads")
    prev = get_plan(replaces) if replaces else None
    if prev and prev.profile_id != profile_id:
        raise BadInput(f"{replaces} serves profile {prev.profile_id}, not {profile_id}",
                       "a new version keeps its plan's profile; start a new plan for another profile")
    check_cap("plan_candidates", len(lessons or []), author, "lessons in one plan")
    chosen = get_workloads(workloads)
    goals = goals if goals else measurable_goals(prof.goals, workloads)
    check_goals_measurable(goals, chosen)
    for c in candidates:
        if c.policy:
            p = get_policy(c.policy)
            if p.kind != "schedcp":
                raise BadInput(f"{c.policy} is a catalogued scx scheduler, not one the sandbox can "
                               "build", "choose a schedcp policy (search_policies kind 'schedcp')")
            p.resolve_params(c.params)
        elif c.report_id:
            r = get_report(c.report_id)
            if not r.passed_layer1:
                raise BadInput(f"report {r.id} did not pass layer 1 ({r.status})",
                               "fix the source and submit it again")
    plan = OptimizationPlan(id=store.new_id("plan"), profile_id=profile_id, workloads=workloads,
                            goals=goals, strategy=strategy, rationale=rationale.strip(),
                            candidates=candidates, budget_s=budget_s, author=author,
                            version=prev.version + 1 if prev else 1, replaces=replaces, lessons=lessons or [])
    store.put(KIND, plan, ref=profile_id)
    return plan


def get_plan(plan_id: str) -> OptimizationPlan:
    return store.require(KIND, plan_id, OptimizationPlan, "optimization plan",
                         "the planning stage creates one with create_plan")


def list_plans(limit: int = 20, profile_id: str | None = None) -> list[OptimizationPlan]:
    return store.list_records(KIND, OptimizationPlan, ref=profile_id, limit=limit)


def plan_versions(plan_id: str) -> list[OptimizationPlan]:
    """The plan and every version it replaced, newest first."""
    out = [get_plan(plan_id)]
    while out[-1].replaces and len(out) < 100:
        out.append(get_plan(out[-1].replaces))
    return out
