"""What an MCP tool answers an agent: concise by default, every field on request.

An agent pays for every byte of a result in its context. So a tool with a large result takes
`detail`: "summary" (the default) names the verdict, the figures that decide it and the ids to drill
down with; "full" gives every field. Source text, logs, raw samples and histograms are "full" only.
Lists page with an opaque `cursor`.

What a client shows the model: Claude Code (2.1.x) shows `JSON.stringify(structuredContent)` when a
result has structured content and drops its text blocks; clients without structured-content support
show the text. So the structured content is the answer, and the text beside it is one short line
for a human, never the same JSON again.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from .diagnose import Diagnosis
from .learn import match
from .repository.policies import Parameter
from .synth.spec import SchedulerSpec

Detail = Literal["summary", "full"]
DETAIL = Field(description='"summary": what decides, ids to drill down; "full": every field')
CURSOR = Field(description="next_cursor of the previous page")

#: ~4 bytes of JSON per token: the estimate `schedcp optimize` reports (OpenAI's and Anthropic's
#: tokenizers both average 3.5-4.5 bytes per token on JSON with English words)
BYTES_PER_TOKEN = 4


def answer(data: BaseModel | dict[str, Any], text: str) -> CallToolResult:
    """The structured content (what Claude Code shows the model) and a short line for a human."""
    content = data.model_dump(mode="json", exclude_none=True) if isinstance(data, BaseModel) else data
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=content)


def pick(model: BaseModel, include: Any) -> dict[str, Any]:
    """Some fields of a model, as JSON values; None fields left out."""
    return model.model_dump(mode="json", include=include, exclude_none=True)


def page(items: list, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """One page of `items` (fetched with at least offset + limit + 1 of them) and the next cursor."""
    start = int(cursor) if cursor and cursor.isdigit() else 0
    chunk = items[start:start + limit]
    return chunk, (str(start + limit) if len(items) > start + limit else None)


def offset(cursor: str | None) -> int:
    return int(cursor) if cursor and cursor.isdigit() else 0


def clip(text: str | None, n: int = 300) -> str | None:
    return text if text is None or len(text) <= n else text[:n - 1] + "…"


def result_bytes(result: CallToolResult) -> int:
    """A result's size as it crosses the wire (JSON-RPC result: content + structuredContent)."""
    return len(result.model_dump_json(by_alias=True, exclude_none=True).encode())


def tokens(n_bytes: int) -> int:
    return -(-n_bytes // BYTES_PER_TOKEN)


# --- summaries, one per kind of record -------------------------------------------------------------

def profile_brief(p) -> dict[str, Any]:
    """A WorkloadProfile: id, the one-paragraph summary, what it is, its goals."""
    return pick(p, {"id": True, "command": True, "pid": True, "duration_s": True, "summary": True,
                    "characteristics": {"cpu_bound", "latency_sensitive", "many_short_lived_processes",
                                        "parallelism", "io_heavy", "cpu_utilization"},
                    "goals": {"__all__": {"metric", "direction", "target_ratio"}}})


def hit_brief(h) -> dict[str, Any]:
    """A search hit: what ranks it, a line of what it is, why it matched (tags: "full")."""
    return pick(h, {"name", "kind", "score", "text_score", "history_score", "runnable"}) | {
        "summary": clip(h.summary, 100), "reason": clip(h.reason, 160)}


def policy_brief(p) -> dict[str, Any]:
    return pick(p, {"name", "kind", "summary", "use_cases", "limitations", "runnable", "ops_name",
                    "parameters"})


def layer1_brief(l1) -> dict[str, Any]:
    """Verdict, where it stopped and the first findings with their source line."""
    out = pick(l1, {"verdict": True, "stage": True, "ops_name": True, "missing_kfuncs": True,
                    "missing_callbacks": True, "hot_path_insns": True, "cached": True,
                    "errors": {"__all__": {"stage", "code", "message", "line", "program", "snippet"}}})
    out["errors"] = out.get("errors", [])[:3]
    for e in out["errors"]:
        e["message"] = clip(e.get("message"), 400)
    if l1.warnings:
        out["warnings"] = [clip(w.message, 160) for w in l1.warnings[:3]]
    if l1.verdict != "accepted" and l1.verifier_log:
        out["verifier_log_tail"] = l1.verifier_log[-600:]
    return out


def layer2_brief(l2) -> dict[str, Any]:
    """Pass/fail, the failed gates, and per workload the A/B ratio with its interval."""
    out: dict[str, Any] = {"passed": l2.passed, "rounds": l2.rounds}
    if l2.failure_reason:
        out["failure_reason"] = clip(l2.failure_reason, 400)
    failed = [g for g in l2.correctness + l2.performance if not g.passed]
    if failed:
        out["failed_gates"] = [{"name": g.name, "reason": clip(g.reason, 240)} for g in failed[:4]]
    out["workloads"] = [pick(w, {"name", "metric", "unit", "direction", "pairs", "ratio", "ratio_low",
                                 "ratio_high", "noise", "verdict"})
                        | {"baseline": w.baseline_stats.median if w.baseline_stats else None,
                           "candidate": w.candidate_stats.median if w.candidate_stats else None}
                        for w in l2.workloads]
    if l2.host:
        out["host_others_cpu"] = l2.host.others_cpu  # CPUs' worth others used while it measured
    if l2.warnings:
        out["warnings"] = [clip(w, 280) for w in l2.warnings[:3]]
    return out


def report_brief(r) -> dict[str, Any]:
    """A ValidationReport: verdict, both layers in brief, the ids it links."""
    out = pick(r, {"id", "policy", "params", "ops_name", "target", "profile_id", "candidate_id",
                   "passed", "status"})
    out["goals"] = [f"{g.metric} {'<=' if g.direction == 'lower' else '>='} {g.target_ratio}x"
                    for g in r.goals]
    out["layer1"] = layer1_brief(r.layer1)
    if r.layer1.program_args is not None:  # a scheduler program: what ran, and the end of what it said
        out["program"] = {"name": r.layer1.program_name, "args": r.layer1.program_args,
                          "sha256": r.layer1.object_sha256,
                          "stderr_tail": clip(r.layer1.program_stderr.strip()[-400:], 400)}
    if r.layer2 is not None:
        out["layer2"] = layer2_brief(r.layer2)
    return out


def job_brief(j) -> dict[str, Any]:
    """A Job (or JobView) in one line's worth of fields: never its inputs or raw result."""
    out = pick(j, {"id", "kind", "state", "lane", "attempts", "parent", "cached_from", "progress",
                   "message", "elapsed_s", "created_at"})
    r = getattr(j, "result", None) or {}
    for k in ("report_id", "passed", "name"):
        if r.get(k) is not None:
            out[k] = r[k]
    name = (getattr(j, "inputs", None) or {}).get("name")
    if name:
        out["name"] = name
    if j.error:
        out["error"] = clip(j.error, 300)
    return out


def deployment_brief(d) -> dict[str, Any]:
    out = pick(d, {"id", "report_id", "policy", "params", "ops_name", "target", "status", "baseline",
                   "end_reason", "created_at", "ended_at", "monitor_pid", "scope"})
    out["readings"] = len(d.readings)
    if d.readings:
        out["last_reading"] = d.readings[-1].model_dump(mode="json", exclude_none=True)
    if d.exit is not None:
        out["exit"] = clip(json.dumps(d.exit.model_dump(mode="json", exclude_none=True)), 300)
    return out


def synth_brief(s) -> dict[str, Any]:
    """A synthesized candidate: its ids and layer-1 verdict with the first errors; no source."""
    out = pick(s, {"candidate_id": True, "report_id": True, "verdict": True, "stage": True,
                   "status": True, "ops_name": True, "params": True, "next_step": True,
                   "errors": {"__all__": {"stage", "code", "message", "line", "snippet"}}})
    out["errors"] = out.get("errors", [])[:3]
    if s.verdict != "accepted" and s.verifier_log:
        out["verifier_log_tail"] = s.verifier_log[-600:]
    return out


def tune_brief(t) -> dict[str, Any]:
    out = pick(t, {"id", "target", "workloads", "rounds_used", "rungs", "best_params",
                   "best_candidate_id", "best_report_id", "defaults", "vs_defaults", "vs_defaults_low",
                   "vs_defaults_high", "verdict", "seconds"})
    out["trials"] = [pick(x, {"report_id", "label", "rounds", "speedup", "passed", "broken"})
                     for x in t.trials[:12]]
    return out


def campaign_brief(c) -> dict[str, Any]:
    """A CampaignResult: each child's state, report and verdict; never its raw result."""
    out = pick(c, {"children": {"__all__": {"id", "name", "kind", "state", "cached", "report_id",
                                            "passed", "error"}},
                   "counts": True, "used": True, "not_started_for_budget": True})
    for k in out["children"]:
        if k.get("error"):
            k["error"] = clip(k["error"], 300)
    return out


# --- the answers as a client reads them ----------------------------------------------------------------
# One model per answer a client parses (`optimize`'s stages read every tool result through these, never
# through string keys). Where a tool answers with a record's own model (plans.OptimizationPlan,
# learn.feedback.Feedback, observe.system.SystemInfo, a Diagnosis) the client parses with that model;
# the summaries above have theirs here, field for field (a field the summary leaves out is optional).

class WorkloadRow(BaseModel):
    """A sandbox workload as list_workloads names it."""
    name: str
    description: str = ""
    metric: str
    unit: str = ""
    direction: Literal["lower", "higher"]
    goal_metrics: list[str] = []
    default: bool = True


class WorkloadList(BaseModel):
    workloads: list[WorkloadRow]

    @classmethod
    def of(cls, workloads) -> "WorkloadList":
        return cls(workloads=[WorkloadRow.model_validate(w, from_attributes=True) for w in workloads])


class Traits(BaseModel):
    """A profile's characteristics, as profile_brief gives them."""
    cpu_bound: bool = False
    latency_sensitive: bool = False
    many_short_lived_processes: bool = False
    io_heavy: bool = False
    parallelism: float | None = None
    cpu_utilization: float | None = None


class GoalBrief(BaseModel):
    metric: str
    direction: Literal["lower", "higher"]
    target_ratio: float | None = None


class ProfileBrief(BaseModel):
    """profile_workload / get_profile (summary)."""
    id: str
    command: list[str] | None = None
    duration_s: float | None = None
    summary: str = ""
    characteristics: Traits = Traits()
    goals: list[GoalBrief] = []


class MatchResult(BaseModel):
    """match_workloads."""
    profile_id: str
    matches: list[match.WorkloadMatch]


class HitBrief(BaseModel):
    """A search_policies hit."""
    name: str
    kind: str
    score: float
    text_score: float = 0.0
    history_score: float = 0.0
    runnable: bool = False
    summary: str | None = None
    reason: str | None = ""


class SearchAnswer(BaseModel):
    query: str = ""
    hits: list[HitBrief]
    next_cursor: str | None = None


class OutcomeBrief(BaseModel):
    """A recorded outcome in get_policy's history (summary)."""
    id: str
    source: str
    params: dict[str, Any] = {}
    profile_id: str | None = None
    report_id: str | None = None
    reward: float
    goals_met: bool
    measured: list[str] = []


class PolicyBrief(BaseModel):
    name: str
    kind: str = ""
    summary: str = ""
    runnable: bool = False
    parameters: list[Parameter] = []


class PolicyAnswer(BaseModel):
    """get_policy (summary)."""
    policy: PolicyBrief
    history: list[OutcomeBrief] = []
    outcomes: int = 0


class PrimitivesAnswer(BaseModel):
    """list_primitives (summary): what optimize needs of it, the example spec."""
    spec_example: SchedulerSpec


class SynthBrief(BaseModel):
    """generate_scheduler / reconfigure_policy / revise_policy (summary)."""
    candidate_id: str | None = None
    report_id: str | None = None
    verdict: str
    stage: str | None = None
    status: str = ""


class DiagnosisAnswer(BaseModel):
    """diagnose_report."""
    report_id: str
    candidate: str = Field(description="the policy (with parameters) or generated scheduler validated")
    lost: list[str] = Field(description="workloads it did not show unharmed")
    evidence: list[str] = Field(description="per traced phase, candidate and default side by side")
    diagnoses: list[Diagnosis] = Field(description="rule, figures, reason and the change to try")


class ChildBrief(BaseModel):
    """A campaign child in campaign_brief."""
    id: str
    name: str
    kind: str
    state: str
    cached: bool = False
    report_id: str | None = None
    passed: bool | None = None
    error: str | None = None


class CampaignAnswer(BaseModel):
    """validate_campaign."""
    job_id: str
    state: str
    children: list[ChildBrief] = []
    counts: dict[str, int] = {}
    used: dict[str, float] = {}
    not_started_for_budget: list[str] = []


class FigureBrief(BaseModel):
    """One workload's A/B in layer2_brief."""
    name: str
    metric: str
    unit: str
    direction: Literal["lower", "higher"]
    pairs: int = 0
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    noise: float | None = None
    verdict: str
    baseline: float | None = None
    candidate: float | None = None


class Layer2Brief(BaseModel):
    passed: bool
    rounds: int = 0
    failure_reason: str | None = None
    workloads: list[FigureBrief] = []
    warnings: list[str] = []


class ReportBrief(BaseModel):
    """get_report / submit_scheduler / validate_scheduler (summary)."""
    id: str
    policy: str | None = None
    params: dict[str, str] = {}
    passed: bool = False
    status: str = ""
    layer2: Layer2Brief | None = None


class TokenOut(BaseModel):
    """issue_token."""
    token: str = Field(description="pass to deploy(token=…); single use")
    report_id: str
    target: str
    expires_at: float


class DeploymentBrief(BaseModel):
    id: str
    report_id: str | None = None
    policy: str | None = None
    params: dict[str, str] = {}
    target: str
    status: str
    baseline: float | None = None
    end_reason: str | None = None
    readings: int = 0


class DeploymentAnswer(BaseModel):
    """deploy / rollback (summary)."""
    deployment: DeploymentBrief


class StatusAnswer(BaseModel):
    """get_status (summary)."""
    deployments: list[DeploymentBrief] = []
