"""`schedcp optimize`: the four-stage loop without an LLM, through the MCP tools.

It spawns `python -m schedcp_mcp serve` and talks to it with the MCP SDK's stdio client, like Claude
Code would, and runs each stage with **only the tools its subagent definition allows**
(`.claude/agents/schedcp-<role>.md`, read at run time): a call outside a stage's allowlist is an
error. So the loop proves that the agents have what they need, and no more.

observe -> plan -> execute -> learn, with a deterministic planner in place of the planning agent's
judgement: search with the profile; strategy reconfigure > revise > generate by rule, with the
reason; policies that already won on similar workloads first. The winner is the passed candidate
with the best A/B ratios on the goal metrics. Nothing reaches the host: with `target="host"` the
human gets the `schedcp deploy --token …` command.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client
from pydantic import BaseModel, Field, PrivateAttr

from . import agents, answers, config
from .answers import (CampaignAnswer, DeploymentAnswer, DeploymentBrief, DiagnosisAnswer, FigureBrief, HitBrief, Layer2Brief,
                      MatchResult, PolicyAnswer, PolicyBrief, PrimitivesAnswer, ProfileBrief, ReportBrief,
                      SearchAnswer, StatusAnswer, SynthBrief, TokenOut, WorkloadList, WorkloadRow)
from .candidates import check_goal_ratio, check_layer2_request
from .diagnose import Change, Diagnosis
from .errors import BadInput, InfrastructureError, SchedcpError
from .learn.feedback import Feedback
from .models import Goal, in_words, times, vs_default
from .observe.system import SystemInfo
from .plans import Lesson, OptimizationPlan, PlannedCandidate
from .sandbox import neighbours
from .validate.gates import GUARD_RESULTS, PERFORMANCE_GATES
from .workloads import GUARDS, SEARCH_WORDS

Progress = Callable[[str, float], None]
M = TypeVar("M", bound=BaseModel)

#: seconds a validation costs besides its rounds (boot, layer 1, stress) and per workload round,
#: measured on the 2-vCPU TCG development machine (README "Results"); used only to fit the budget
VALIDATION_FIXED_S = 55.0  # boot, layer 1, warm-up, the starvation phase (~24 s), stress
LAYER1_S = 5.0  # a layer-1 job before its validation (`schedcp bench verify`: 4.5 s uncached)
VALIDATION_PER_ROUND_S = 3.0  # one workload, one side, one round (5 workloads x 2 sides: ~29 s a round)
#: deploy (baseline x3 + load) plus the learning stage
DEPLOY_RESERVE_S = 45.0
#: plan versions one run may try: the first plan and up to two re-plans from the diagnoses
MAX_PLAN_ROUNDS = 3
#: a round that a re-plan may follow spends at most this share of the time left (the rest is the
#: re-plan's); the last possible round spends all of it
ROUND_SHARE = 0.5
#: a host command is profiled repeated for this long, as match_workloads' references are
MATCH_PROFILE_S = 3
#: words a search gets for each profile characteristic (a workload's: workloads.SEARCH_WORDS)
TRAIT_WORDS = {"latency_sensitive": "latency interactive", "cpu_bound": "throughput cpu-bound",
               "many_short_lived_processes": "build many-processes", "io_heavy": "io"}


class StageRefused(SchedcpError):
    """A stage called a tool its agent definition does not allow (a bug, or stale definitions)."""


class ToolFailed(SchedcpError):
    """An MCP tool answered with an error."""


class Traffic(BaseModel):
    """What a stage's tool calls cost the agent's context: every result's bytes as they cross the
    wire (JSON-RPC result: content + structuredContent), and tokens estimated at
    answers.BYTES_PER_TOKEN bytes each; `definitions_bytes`: the stage's tool definitions
    (tools/list entries of its allowlist), which its agent reads once per session."""
    calls: int = 0
    result_bytes: int = 0
    est_tokens: int = 0
    definitions_bytes: int = 0
    largest: dict[str, int] = Field({}, description="tool -> its largest result, bytes")

    def add(self, tool: str, n: int) -> None:
        self.calls += 1
        self.result_bytes += n
        self.est_tokens = answers.tokens(self.result_bytes)
        self.largest[tool] = max(n, self.largest.get(tool, 0))


class Stage:
    """One stage's view of the MCP session: only the tools of its role's allowlist; it counts what
    each call returns."""

    def __init__(self, session: ClientSession, role: str, allowed: set[str]):
        self.session, self.role, self.allowed = session, role, allowed
        self.calls: list[str] = []
        self.traffic = Traffic()

    def may(self, tool: str) -> bool:
        return tool in self.allowed

    async def call(self, tool: str, args: dict[str, Any] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
        if tool not in self.allowed:
            raise StageRefused(
                f"the {self.role} stage may not call {tool!r}: its agent definition "
                f"({agents.agent_path(self.role)}) does not list it",
                "allowed: " + ", ".join(sorted(self.allowed)))
        self.calls.append(tool)

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            if progress:
                progress(message or tool, (p / total) if total else 0.0)

        res = await self.session.call_tool(tool, args or {}, progress_callback=on_progress)
        self.traffic.add(tool, answers.result_bytes(res))
        if res.is_error:
            text = " ".join(getattr(c, "text", "") for c in res.content).strip()
            raise ToolFailed(f"{tool}: {text}")
        return res.structured_content or {}

    async def ask(self, tool: str, model: type[M], args: dict[str, Any] | None = None,
                  progress: Progress | None = None) -> M:
        """A tool's answer, parsed by the model the server answers with (answers.py, or the record's own)."""
        return model.model_validate(await self.call(tool, args, progress))


# --- the report --------------------------------------------------------------------------------------

class OptimizeRequest(BaseModel):
    workloads: list[str] = Field([], description="sandbox workloads to optimize for")
    command: list[str] | None = Field(None, description="or: a host command, matched to workloads")
    goals: list[Goal] = []
    target: Literal["sandbox", "host"] = "sandbox"
    budget_s: float = Field(600.0, gt=0)
    rounds: int = Field(3, ge=1, le=10)
    max_candidates: int = Field(3, ge=1, le=10)
    watch_s: float = Field(20.0, ge=0, description="how long the monitor runs before learning")
    out_dir: str | None = None


class WorkloadFigure(BaseModel):
    workload: str
    metric: str
    unit: str
    direction: str
    baseline: float | None
    candidate: float | None
    ratio: float | None = Field(None, description="candidate / baseline")
    ratio_low: float | None = Field(None, description="the ratio's confidence interval, low end")
    ratio_high: float | None = None
    noise: float | None
    verdict: str
    guard: bool = Field(False, description="a guard workload (the rest of the machine), not the target")

    @property
    def speedup(self) -> float | None:
        """vs default: > 1 = better, whatever the metric's direction (models.vs_default)."""
        return vs_default(self.ratio, self.direction) if self.ratio else None

    @property
    def interval(self) -> str:
        """The vs-default interval (> 1 = better)."""
        if self.ratio_low is None or self.ratio_high is None:
            return f"±{self.noise:.0%}" if self.noise else "-"
        a, b = vs_default(self.ratio_low, self.direction), vs_default(self.ratio_high, self.direction)
        lo, hi = min(a, b), max(a, b)
        return f"[{times(lo)[:-1]}, {times(hi)[:-1]}]"


class CandidateResult(BaseModel):
    label: str
    policy: str | None
    params: dict[str, str] = {}
    strategy: str
    why: str
    report_id: str | None = None
    passed: bool = False
    status: str = ""
    figures: list[WorkloadFigure] = []
    score: float | None = Field(None, description="mean log-ratio on the goal metrics, lower = "
                                                   "better (negative beats the default scheduler)")
    worst: float | None = Field(None, description="the same at the least favourable end of each "
                                                   "ratio's confidence interval: what decides the winner")
    warnings: list[str] = []
    error: str | None = None
    job_id: str | None = Field(None, description="its validate job in the campaign")
    harmed_guards: list[str] = Field([], description="guard workloads it made worse (or could not show "
                                     "unharmed): never deployed system-wide")
    round: int = Field(1, description="the planning round (plan version) it was tried in")
    lost_because: list[str] = Field([], description="its evidence, per phase it lost (validate.evidence)")
    diagnoses: list[str] = Field([], description="rule: figures -> change (diagnose.py)")
    came_from: str | None = Field(None, description="re-planned: the lost candidate and the rule it answers")
    rule: str | None = Field(None, description="re-planned: the rule (`undecided`: measured again)")


class OptimizeReport(BaseModel):
    started_at: float
    seconds: float = 0.0
    request: OptimizeRequest
    host_sched_ext: bool | None = None
    host_note: str = ""
    profile_id: str | None = None
    profile_summary: str = ""
    goals: list[Goal] = []
    workloads: list[str] = []
    workload_reasons: list[str] = []
    plan_id: str | None = None
    plan_versions: list[str] = Field([], description="every plan version of this run, first to last")
    replans: list[str] = Field([], description="why each re-plan happened, or why none could")
    strategy: str | None = None
    rationale: str = ""
    candidates: list[CandidateResult] = []
    campaign_id: str | None = Field(None, description="the campaign job that validated them")
    campaign_seconds: float = 0.0
    winner: str | None = Field(None, description="the winning candidate's report id")
    winner_label: str | None = None
    why: str = ""
    token: str | None = None
    deployment: DeploymentBrief | None = None
    host_command: str | None = None
    feedback: list[str] = []
    outcome_ids: list[str] = []
    contributed: str | None = None
    ranking_after: list[str] = []
    calls: dict[str, list[str]] = {}
    traffic: dict[str, Traffic] = Field({}, description="per stage: tool calls, result bytes, tokens")
    traffic_total: Traffic = Field(default_factory=Traffic)
    outcome: Literal["deployed", "ready_for_host", "kept_default"] = "kept_default"
    query: str = ""
    json_path: str | None = None
    chart_path: str | None = None
    #: workload name -> the metrics it measures (its own and its goal metrics), from list_workloads
    _measures: dict[str, set[str]] = PrivateAttr(default_factory=dict)
    #: list_workloads' rows (name, metric, …)
    _workload_rows: list[WorkloadRow] = PrivateAttr(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.outcome in ("deployed", "ready_for_host") else 1


# --- the stages ----------------------------------------------------------------------------------------

async def observe(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress) -> None:
    info = await st.ask("get_system_info", SystemInfo)
    rep.host_sched_ext = info.kernel.sched_ext.present
    rep.host_note = ("this host has sched_ext: a human can deploy the winner here with its token"
                     if rep.host_sched_ext else
                     "this host has no sched_ext: candidates are judged in the sandbox VM; only a "
                     "host deployment needs a sched_ext kernel")
    listed = (await st.ask("list_workloads", WorkloadList)).workloads
    rep._measures = {w.name: {w.metric, *w.goal_metrics} for w in listed}
    rep._workload_rows = listed
    known = list(rep._measures)
    unknown = [w for w in req.workloads if w not in known]
    if unknown:
        raise BadInput(f"unknown sandbox workload(s): {', '.join(unknown)}", "known: " + ", ".join(known))
    if req.command:
        say("observation: profiling the command on this host", 0.02)
        # repeated for as long as the sandbox workloads' reference profiles, so the rates compare
        prof = await st.ask("profile_workload", ProfileBrief, {"command": req.command, "duration_s": 30,
                                                               "repeat_s": MATCH_PROFILE_S})
        rep.profile_id, rep.profile_summary = prof.id, prof.summary
        say("observation: matching it to the sandbox workloads", 0.05)
        matches = (await st.ask("match_workloads", MatchResult, {"profile_id": prof.id})).matches
        good = [m for m in matches if m.good][:2] or matches[:1]
        rep.workloads = [m.workload for m in good]
        rep.workload_reasons = [
            f"{m.workload}: similarity {m.similarity:.2f}"
            + ("" if m.good else " (the best there is, below the 0.75 of a good match)")
            + f" — {m.reason}" for m in good]
    else:
        rep.workloads = req.workloads or [w.name for w in listed if w.default]
        for i, name in enumerate(rep.workloads):
            say(f"observation: profiling sandbox workload {name} on this host", 0.02 + 0.03 * i)
            prof = await st.ask("profile_workload", ProfileBrief, {"workload": name, "duration_s": 30})
            if rep.profile_id is None:  # the plan serves the first; each is stored for history
                rep.profile_id, rep.profile_summary = prof.id, prof.summary
            rep.workload_reasons.append(f"{name}: given (profile {prof.id})")


def search_query(profile: ProfileBrief, workloads: list[str]) -> str:
    ch = profile.characteristics
    words = [SEARCH_WORDS.get(w, w) for w in workloads]
    words += [w for trait, w in TRAIT_WORDS.items() if getattr(ch, trait)]
    return " ".join(dict.fromkeys(" ".join(words).split()))


def choose_strategy(hits: list[HitBrief], query: str, can_generate: bool,
                    won_before: set[str] = frozenset()) -> tuple[str, str, list[HitBrief]]:
    """Reconfigure > revise > generate, by rule: reconfigure while repository policies match and
    have not all done worse than the default on similar workloads. Revising needs a patch only an
    agent can write, so this planner moves on to generate (when the server can) and otherwise
    reconfigures the closest policies, saying so. Returns (strategy, rationale, policies to try
    in order: policies that passed and met their goals before (`won_before`), then the best
    history on similar workloads, then relevance)."""
    ours = [h for h in hits if h.kind == "schedcp" and h.runnable]
    # what did best on similar workloads before comes first (by that history alone), then the rest
    # by relevance
    ours.sort(key=lambda h: (h.name not in won_before, h.history_score <= 0,
                             -h.history_score if h.history_score > 0 else -h.score))
    fits = [h for h in ours if h.text_score > 0 or h.history_score > 0]
    if fits and not all(h.history_score < 0 for h in fits):
        return "reconfigure", (f"reconfigure: {len(fits)} repository policies match {query!r}; "
                               "running them with parameters fitted to the profile is the cheapest "
                               "and best-known way. "), fits
    why = ("every matching policy did worse than the default on similar workloads before (revise "
           "would be next, but a patch needs an agent's judgement)" if fits else
           f"no repository policy matches {query!r}")
    if can_generate:
        return "generate", f"generate: {why}; a scheduler built from primitives is tried first. ", \
            fits or ours
    return "reconfigure", (f"reconfigure, for want of better: {why}, and this server has no "
                           "generate_scheduler tool. "), fits or ours


def candidate_budget(req: OptimizeRequest, n_workloads: int, share: float = 1.0) -> tuple[int, float]:
    """How many candidates fit the budget (`share` of it), and the estimated seconds of one validation."""
    per = VALIDATION_FIXED_S + VALIDATION_PER_ROUND_S * n_workloads * req.rounds * 2
    fit = int((req.budget_s - DEPLOY_RESERVE_S - req.watch_s) * share // per)
    return max(1, min(req.max_candidates, fit)), per


def sandbox_budget(left: float, n: int, per: float) -> float:
    """One validation's budget when `n` share `left` seconds (each estimated at `per`). The sandbox
    counts it from its own VM's boot (the minimum rounds, boot, warm-up, starvation and stress all
    inside), so only the layer-1 job before it is taken off. (Taking off the whole fixed part gave
    round-1 validations ~84 s when their three rounds take 113-121 s: none could add a pair for a
    guard left undecided, which is how most optimize candidates lost.)"""
    return max(per - LAYER1_S, min(600.0, left / max(1, n) - LAYER1_S))


def round_share(left: float, per: float, last: bool) -> float:
    """The share of the `left` seconds a round plans for: ROUND_SHARE while another round may follow
    and that share still pays for a validation (`per`); else all of it — one more round beats none.
    (Reserving half for a third round, the main job once stopped with 219 s left: "a validation needs
    ~127 s", and lean_preempt, undecided on one guard, was not measured again.)"""
    return ROUND_SHARE if not last and left * ROUND_SHARE >= per else 1.0


def time_left(req: OptimizeRequest, t0: float) -> float:
    """Seconds of the budget left for validations (the deploy and its watch kept aside)."""
    return req.budget_s - (time.monotonic() - t0) - DEPLOY_RESERVE_S - req.watch_s


def first_share(req: OptimizeRequest, n_workloads: int) -> float:
    """The share of the budget the first round plans for (a re-plan can follow a failed round)."""
    per = candidate_budget(req, n_workloads)[1]
    return round_share(req.budget_s - DEPLOY_RESERVE_S - req.watch_s, per, last=MAX_PLAN_ROUNDS == 1)


def reconfigured(policy: PolicyBrief, profile: ProfileBrief) -> dict[str, str] | None:
    """Parameters chosen for the profile, within the policy's ranges: shorter slices for a
    latency-sensitive workload, longer for a CPU-bound one. None when the defaults stand."""
    ch = profile.characteristics
    slice_p = next((p for p in policy.parameters if p.name == "slice_ns"), None)
    if slice_p is None:
        return None
    d = int(slice_p.default)
    lo, hi = slice_p.min or 1, slice_p.max or d * 8
    if ch.latency_sensitive:
        v = max(lo, d // 4)
    elif ch.cpu_bound:
        v = min(hi, d * 2)
    else:
        return None
    return {"slice_ns": str(v)} if v != d else None


def goal_args(goals: list[Goal]) -> list[dict[str, Any]]:
    """Goals as the tools take them (GoalIn)."""
    return [{"metric": g.metric, "direction": g.direction,
             "target_ratio": g.target_ratio if g.target_ratio is not None else 1.0} for g in goals]


def plan_args(cands: list[PlannedCandidate]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", exclude_none=True) for c in cands]


async def plan(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress) -> None:
    say("planning: searching the repository", 0.1)
    prof = await st.ask("get_profile", ProfileBrief, {"profile_id": rep.profile_id})
    query = rep.query = search_query(prof, rep.workloads)
    judged = with_guards(rep.workloads)
    hits = (await st.ask("search_policies", SearchAnswer, {"query": query, "profile_id": rep.profile_id,
                                                          "workloads": judged})).hits
    measured = {w.metric for w in rep._workload_rows if w.name in judged}
    won_before = set()
    for h in hits:  # a history that includes a validated win on everything this plan is judged on
        if h.kind == "schedcp" and h.history_score > 0:
            hist = (await st.ask("get_policy", PolicyAnswer, {"name": h.name})).history
            if any(o.goals_met and o.reward > 0 and o.source != "external" and measured <= set(o.measured)
                   for o in hist):
                won_before.add(h.name)
    strategy, rationale, fits = choose_strategy(hits, query, st.may("generate_scheduler"), won_before)
    share = first_share(req, len(with_guards(rep.workloads)))
    n, per = candidate_budget(req, len(with_guards(rep.workloads)), share)
    chosen = fits[:n]
    candidates = [PlannedCandidate(policy=h.name, strategy="reconfigure", why=f"score {h.score:.2f}: {h.reason}")
                  for h in chosen]
    if chosen and n > 1:  # last: the top policy with parameters fitted to the profile (other families
        # first: a campaign the budget cuts short drops the last candidates, and a variant of the top
        # policy tells less than another policy)
        top = await st.ask("get_policy", PolicyAnswer, {"name": chosen[0].name})
        params = reconfigured(top.policy, prof)
        if params:
            kind = "latency-sensitive" if prof.characteristics.latency_sensitive else "CPU-bound"
            candidates.insert(max(1, n - 1), PlannedCandidate(
                policy=chosen[0].name, params=params, strategy="reconfigure",
                why=f"{chosen[0].name} with {params} for a {kind} profile"))
    if strategy == "generate":
        spec = (await st.ask("list_primitives", PrimitivesAnswer)).spec_example
        spec = spec.model_copy(update={"name": f"gen_{rep.workloads[0]}"[:31]})
        g = await st.ask("generate_scheduler", SynthBrief, {"spec": spec.model_dump(mode="json", exclude_none=True),
                                                            "profile_id": rep.profile_id})
        if g.verdict == "accepted":
            candidates.insert(0, PlannedCandidate(report_id=g.report_id, strategy="generate",
                                                  why=f"generated from primitives: {spec.description}"))
        else:
            rationale += f"The generated scheduler was refused by layer 1 ({g.status}). "
    if not candidates:
        raise InfrastructureError("the repository has no runnable schedcp policy",
                                  "check `schedcp policies list`")
    candidates = candidates[:n]
    candidates = diverse(candidates, fits, n)
    rationale += (f"{len(candidates)} candidate(s) fit {'half of ' if share < 1 else ''}the {req.budget_s:.0f} s "
                  f"budget (~{per:.0f} s per validation on {len(with_guards(rep.workloads))} workload(s) x "
                  f"{req.rounds} rounds{'; the rest is for a re-plan if this round fails' if share < 1 else ''}); "
                  "policies with a winning history on similar workloads first.")
    # the plan's budget_s: the seconds its validations may spend (validate_round holds a round to it)
    args: dict[str, Any] = {"profile_id": rep.profile_id, "workloads": rep.workloads,
                            "strategy": strategy, "rationale": rationale, "candidates": plan_args(candidates),
                            "budget_s": max(1.0, (req.budget_s - DEPLOY_RESERVE_S - req.watch_s) * share)}
    if req.goals:
        args["goals"] = goal_args(req.goals)
    p = await st.ask("create_plan", OptimizationPlan, args)
    rep.plan_id, rep.strategy, rep.rationale = p.id, p.strategy, p.rationale
    rep.plan_versions.append(p.id)
    rep.goals = p.goals


def diverse(candidates: list[PlannedCandidate], fits: list[HitBrief], n: int) -> list[PlannedCandidate]:
    """At least one candidate of another family (policy) when there is room for two and the plan holds
    one family only (a history won on one workload must not fill a broader plan with variants of one
    policy: fifo and fifo at 5 ms both failed the wakeup goal, and the one policy that had passed
    other workloads was never tried)."""
    fams = {c.policy or "generated" for c in candidates}
    if n < 2 or len(fams) > 1:
        return candidates
    other = next((h for h in fits if h.name not in fams), None)
    if other is None:
        return candidates
    keep = candidates[:n - 1] if len(candidates) >= n else candidates
    return [*keep, PlannedCandidate(policy=other.name, strategy="reconfigure",
                                    why=f"another family beside {', '.join(sorted(fams))} (diversity): score "
                                        f"{other.score:.2f}: {other.reason}")]


def tied(rep: OptimizeReport) -> bool:
    """The winner so far only ties: none of its target workloads is better than the default."""
    win = next((c for c in rep.candidates if c.report_id and c.report_id == rep.winner), None)
    return bool(win) and not any(f.verdict == "better" for f in win.figures if not f.guard)


def change_label(ch: Change) -> str:
    if ch.tool == "reconfigure_policy":
        return f"reconfigure {ch.policy} with " + ", ".join(f"{k}={v}" for k, v in sorted(ch.params.items()))
    if ch.tool == "generate_scheduler" and ch.spec is not None:
        sp = ch.spec
        return (f"generate {sp.name} ({sp.queue}/{sp.ordering}/{sp.cpu_select}/{sp.slice}/{sp.preempt}"
                + (", " + ", ".join(f"{k}={v}" for k, v in sorted(sp.params.items())) if sp.params else "") + ")")
    return f"revise {ch.policy}"


def base_label(label: str) -> str:
    """A candidate's label without the `#n` a second validation of the same thing gets."""
    return label.split("#", 1)[0]


def measure_again(rep: OptimizeReport, rnd: int) -> list[CandidateResult]:
    """Round `rnd`'s candidates that lost only because an interval stayed open: every correctness
    gate passed, no figure was decided worse, some were undecided. What they need is more pairs,
    not another scheduler: a second validation, once per candidate. (lean_preempt lost the pipe
    target at 0.98x [0.84, 1.14] after 3 pairs, better on wakeup by 1.44x, and the re-plan then
    spent 460 s on variants of fifo, which had lost by 1.8x.) Best first: the better worst case."""
    seen = Counter(base_label(c.label) for c in rep.candidates)
    out = []
    for c in rep.candidates:
        verdicts = [f.verdict for f in c.figures]
        if (c.round == rnd and not c.passed and c.report_id and verdicts and seen[base_label(c.label)] == 1
                and c.status.removeprefix("layer 2 failed: ").startswith(PERFORMANCE_GATES)
                and "undecided" in verdicts and not {"worse", "failed"} & set(verdicts)):
            out.append(c)
    return sorted(out, key=lambda c: c.worst if c.worst is not None else math.inf)


async def replan(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress, t0: float,
                 rnd: int, why: str) -> bool:
    """The next plan version from the diagnoses of round `rnd`'s lost candidates (diagnose_report),
    within what is left of the budget; False when nothing is worth another round (no time, no rule
    fired, every change already tried)."""
    left = time_left(req, t0)
    nw = len(with_guards(rep.workloads))
    per = candidate_budget(req, nw)[1]
    n = min(req.max_candidates, int(left * round_share(left, per, last=rnd + 1 >= MAX_PLAN_ROUNDS) // per))
    if n < 1:
        rep.replans.append(f"after round {rnd}: {why}; no re-plan: {max(left, 0):.0f} s left, a validation "
                           f"needs ~{per:.0f} s")
        return False
    say(f"planning: round {rnd} {why}; diagnosing", 0.5)
    # a round that only measured candidates again leaves the round before it's diagnoses untried
    measured_only = rnd > 1 and all(c.rule == "undecided"
                                    for c in rep.candidates if c.round == rnd)
    lost = [c for c in rep.candidates if (c.round == rnd or measured_only and c.round == rnd - 1)
            and c.report_id and (not c.passed or c.report_id == rep.winner)]
    per_cand: list[list[tuple[CandidateResult, Diagnosis]]] = []
    for c in lost:
        try:
            d = await st.ask("diagnose_report", DiagnosisAnswer, {"report_id": c.report_id})
        except ToolFailed as e:
            c.diagnoses.append(f"not diagnosed: {e.message}")
            continue
        c.lost_because = d.evidence
        c.diagnoses = [f"{g.rule} ({g.phase}): {g.evidence} -> {change_label(g.change)}" for g in d.diagnoses]
        per_cand.append([(c, g) for g in d.diagnoses])
    # one change per lost candidate in turn: each lost candidate's first (strongest) change first
    order = [x for k in range(max((len(p) for p in per_cand), default=0)) for p in per_cand if k < len(p)
             for x in [p[k]]]
    tried = {c.label for c in rep.candidates}
    cands: list[PlannedCandidate] = []
    lessons: list[Lesson] = []
    again = measure_again(rep, rnd)[:n]
    if again:  # the plan holds only these: a validation's extra rounds, not a new candidate, buy the pairs
        n = len(again)
    for c in again:
        open_ = [f"{f.workload} {f.interval}" for f in c.figures if f.verdict == "undecided"]
        cands.append(PlannedCandidate(policy=c.policy, params=c.params if c.policy else {},
                                      report_id=None if c.policy else c.report_id, strategy=c.strategy,
                                      why=f"measure {c.label} again: it lost only by open intervals"))
        lessons.append(Lesson(candidate=c.label, report_id=c.report_id, rule="undecided",
                              evidence="no figure decided worse; still open: " + (", ".join(open_) or "?"),
                              change="measure again (a new validation: more pairs)",
                              next_candidate=_label(cands[-1])))
    for c, g in order:
        if len(cands) >= n:
            break
        ch = g.change
        why_c = f"from {c.label}: {g.rule} on {g.phase}: {g.reason}"
        if ch.tool == "reconfigure_policy":
            cand = PlannedCandidate(policy=ch.policy, params=ch.params, strategy="reconfigure", why=why_c)
        elif ch.tool == "generate_scheduler" and ch.spec is not None and st.may("generate_scheduler"):
            if any(ls.change == change_label(ch) for ls in lessons):
                continue
            try:
                out = await st.ask("generate_scheduler", SynthBrief, {
                    "spec": ch.spec.model_dump(mode="json", exclude_none=True), "profile_id": rep.profile_id})
            except ToolFailed as e:
                c.diagnoses.append(f"generate {ch.spec.name} refused: {e.message}")
                continue
            if out.verdict != "accepted":
                c.diagnoses.append(f"generate {ch.spec.name}: layer 1 said {out.status}")
                continue
            cand = PlannedCandidate(report_id=out.report_id, strategy="generate", why=why_c)
        elif ch.tool == "revise_policy" and st.may("revise_policy") and ch.patch:
            try:
                out = await st.ask("revise_policy", SynthBrief, {"base": ch.policy, "patch": ch.patch})
            except ToolFailed as e:
                c.diagnoses.append(f"revise {ch.policy} refused: {e.message}")
                continue
            cand = PlannedCandidate(report_id=out.report_id, strategy="revise", why=why_c)
        else:
            continue
        lbl = _label(cand)
        if lbl in tried or any(_label(x) == lbl for x in cands):
            continue
        cands.append(cand)
        lessons.append(Lesson(candidate=c.label, report_id=c.report_id, rule=g.rule, evidence=g.evidence,
                              change=change_label(ch), next_candidate=lbl))
    if not cands:
        rep.replans.append(f"after round {rnd}: {why}; no re-plan: " +
                           ("no diagnosis rule fired on the evidence" if not order else
                            "every change the diagnoses name was tried already or refused"))
        return False
    strategy = "generate" if any(x.strategy == "generate" for x in cands) else \
        "revise" if any(x.strategy == "revise" for x in cands) else "reconfigure"
    rationale = (f"re-plan {rnd + 1} of {rep.plan_id}: {why}; {len(cands)} change(s) from the diagnoses, "
                 f"within the {max(left, 0):.0f} s left: " + "; ".join(
                     f"{ls.candidate} -> {ls.rule} -> {ls.change}" for ls in lessons))
    args: dict[str, Any] = {"profile_id": rep.profile_id, "workloads": rep.workloads, "strategy": strategy,
                            "rationale": rationale[:3900], "candidates": plan_args(cands),
                            "budget_s": max(left, 1.0), "replaces": rep.plan_id,
                            "lessons": [ls.model_dump(mode="json", exclude_none=True) for ls in lessons],
                            "goals": goal_args(rep.goals)}
    p = await st.ask("create_plan", OptimizationPlan, args)
    rep.replans.append(f"after round {rnd}: {why}; plan {p.id} (version {p.version}) replaces {rep.plan_id}")
    rep.plan_id = p.id
    rep.plan_versions.append(p.id)
    return True


def figures(layer2: Layer2Brief | None, targets: list[str] = ()) -> list[WorkloadFigure]:
    """The A/B figures of a report; a workload that is not a target is marked as a guard."""
    def fig(w: FigureBrief) -> WorkloadFigure:
        return WorkloadFigure(workload=w.name, metric=w.metric, unit=w.unit, direction=w.direction,
                              baseline=w.baseline, candidate=w.candidate, ratio=w.ratio, ratio_low=w.ratio_low,
                              ratio_high=w.ratio_high, noise=w.noise, verdict=w.verdict,
                              guard=w.name in GUARD_RESULTS and w.name.removesuffix("_tail") not in targets)
    return [fig(w) for w in (layer2.workloads if layer2 else [])]


def harmed(figs: list[WorkloadFigure]) -> list[str]:
    """Guard workloads not shown to be unharmed (worse beyond the margin, undecided, or not measured)."""
    return [f.workload for f in figs if f.guard and f.verdict in ("worse", "undecided", "failed")]


def guard_words(c: "CandidateResult") -> str:
    """What a candidate did to the guard set, in words that do not overstate it: 'harmed' only where
    the interval was worse beyond the margin; 'not shown unharmed' where it stayed undecided."""
    verdict = {f.workload: f.verdict for f in c.figures}
    worse = [g for g in c.harmed_guards if verdict.get(g) == "worse"]
    open_ = [g for g in c.harmed_guards if g not in worse]
    parts = ([f"harmed the guard workload(s) {', '.join(worse)}"] if worse else []) + \
        ([f"did not show {', '.join(open_)} unharmed (undecided)"] if open_ else [])
    return "; ".join(parts)


def with_guards(workloads: list[str]) -> list[str]:
    """The target workloads and, after them, every guard workload not among them."""
    return [*workloads, *(g for g in GUARDS if g not in workloads)]


def goal_score(figs: list[WorkloadFigure], goals: list[Goal], measures: dict[str, set[str]],
               worst: bool = False) -> float | None:
    """Mean log-ratio over the workloads a goal covers (all when none does), oriented so that lower
    is better: ln(candidate/baseline) for lower-is-better metrics, ln(baseline/candidate) else.
    `worst`: at the least favourable end of each ratio's confidence interval (the median ratio
    where there is no interval) — what the candidate achieves at worst, as far as the A/B rounds
    can tell."""
    usable = [f for f in figs if f.ratio and f.ratio > 0 and not f.guard]
    chosen = [f for f in usable if any(g.metric in measures.get(f.workload, ()) for g in goals)] \
        or usable
    if not chosen:
        return None

    def log(f: WorkloadFigure) -> float:
        if f.direction == "lower":
            return math.log((f.ratio_high if worst and f.ratio_high else f.ratio))
        return -math.log((f.ratio_low if worst and f.ratio_low else f.ratio))

    return round(sum(log(f) for f in chosen) / len(chosen), 4)


def _label(c: PlannedCandidate) -> str:
    if not c.policy:
        return c.report_id or "source"
    params = ",".join(f"{k}={v}" for k, v in sorted(c.params.items()))
    return c.policy + (f"[{params}]" if params else "")


async def execute(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress,
                  t0: float) -> None:
    """The plan's candidates as ONE campaign of supervised jobs (verify -> validate each, for the
    plan's profile and goals), then each report's A/B figures, and the winner's token."""
    await validate_round(st, req, rep, say, t0, 1)
    await conclude(st, req, rep, say)


async def validate_round(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress,
                         t0: float, rnd: int, share: float = 1.0) -> None:
    """One plan version's candidates validated as a campaign; figures read; the winner so far kept.
    `share`: the fraction of the time left this round may spend (the rest is for re-planning)."""
    p = await st.ask("get_plan", OptimizationPlan, {"plan_id": rep.plan_id})
    n = len(p.candidates)
    _, per = candidate_budget(req, len(with_guards(p.workloads)))
    # what is left for the sandbox: each validation gets its share (the sandbox adds paired rounds
    # within it while a workload's interval still straddles its threshold), and the campaign starts
    # no node once its children have used it all (validations slower than estimated); never more than
    # the plan's own budget_s
    left = time_left(req, t0) * share
    if p.budget_s is not None:
        left = min(left, p.budget_s)
    sandbox_s = sandbox_budget(left, n, per)
    specs, this_round = [], []
    came = {ls.next_candidate: ls for ls in p.lessons if ls.next_candidate}
    for i, c in enumerate(p.candidates):
        label = _label(c)
        label = f"{label}#{i}" if any(r.label == label for r in rep.candidates) else label
        res = CandidateResult(label=label, policy=c.policy, params=c.params, strategy=c.strategy, why=c.why,
                              round=rnd)
        if (ls := came.get(_label(c))) is not None:
            res.came_from, res.rule = f"{ls.candidate}: {ls.rule}", ls.rule
        rep.candidates.append(res)
        this_round.append(res)
        spec = {"name": label, **{k: v for k, v in (("policy", c.policy), ("report_id", c.report_id),
                                                    ("source", c.source)) if v}}
        if c.params and not c.report_id:
            spec["params"] = c.params
        specs.append(spec)
    args: dict[str, Any] = {
        "candidates": specs, "workloads": with_guards(p.workloads), "profile_id": p.profile_id,
        "rounds": req.rounds, "budget_s": round(sandbox_s), "budget_sandbox_s": round(max(per, left)),
        "goals": goal_args(p.goals)}
    if any(r.rule == "undecided" for r in this_round):
        args["measure_again"] = True  # more pairs, never an earlier identical run's answer
    start = time.monotonic()
    camp = await st.ask("validate_campaign", CampaignAnswer, args,
                        progress=lambda m, f: say(f"execution: {m}", 0.15 + 0.7 * f))
    rep.campaign_id = camp.job_id
    kids = {k.name: k for k in camp.children}
    for res in this_round:
        v, check = kids.get(f"validate:{res.label}"), kids.get(f"verify:{res.label}")
        if v is None or v.state != "succeeded":
            first = check if check and check.state != "succeeded" else v  # what ended it
            why = (first.error or first.state) if first else None
            res.error = (f"skipped: the budget ({req.budget_s:.0f} s) is spent" if
                         (why or "").startswith("budget exhausted") else why or "not run")
            res.report_id = check.report_id if check else None
            continue
        r = await st.ask("get_report", ReportBrief, {"report_id": v.report_id})
        res.job_id, res.report_id, res.passed, res.status = v.id, r.id, r.passed, r.status
        res.figures = figures(r.layer2, rep.workloads)
        res.harmed_guards = harmed(res.figures)
        res.warnings = r.layer2.warnings if r.layer2 else []
        res.score = goal_score(res.figures, rep.goals, rep._measures)
        res.worst = goal_score(res.figures, rep.goals, rep._measures, worst=True)
        if res.passed and (rep.winner is None or _better(res, rep)):
            rep.winner, rep.winner_label = res.report_id, res.label
    rep.campaign_seconds = round(rep.campaign_seconds + time.monotonic() - start, 1)
    if all(c.error and not c.report_id for c in this_round) and rnd == 1:
        raise InfrastructureError("no candidate could be validated: " + this_round[0].error,
                                  "check the sandbox with `schedcp sandbox info`")


async def conclude(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress) -> None:
    """The winner over every round (if any): its token, why it won, the staging deploy."""
    if rep.winner:  # only the winner gets a (single-use) deployment token
        rep.token = (await st.ask("issue_token", TokenOut, {"report_id": rep.winner})).token
    passed = [c for c in rep.candidates if c.passed]
    if not passed:
        rep.why = ("no candidate passed the sandbox's gates, so the default scheduler stays "
                   "(a valid outcome): " + "; ".join(
                       f"{c.label}: " + (f"{guard_words(c)}, so it is not deployed system-wide; "
                                         if c.harmed_guards else "")
                       + (c.error or c.status) for c in rep.candidates))
        return
    win = next(c for c in passed if c.report_id == rep.winner)
    others = [c for c in passed if c is not win]
    figs = ", ".join(f"{f.metric} {in_words(f.speedup)} than the default ({f.verdict}, interval {f.interval})"
                     for f in win.figures if f.ratio)
    # scores are mean log(candidate/baseline) (lower = better, what ranks); shown the one way:
    # log vs default, > 0 = better
    rep.why = (f"{win.label} passed every gate and has the best worst case: mean log vs default "
               f"{-win.worst:+.3f} at the unfavourable end of its intervals ({-win.score:+.3f} at the "
               f"median; > 0 = better than the default): {figs}"
               + (f"; beat {', '.join(f'{o.label} ({-o.worst:+.3f})' for o in others)}" if others else "")
               + ".")
    if req.target == "host":
        rep.host_command = (f'schedcp deploy --token "$(schedcp token {win.report_id} --target host)"'
                            " --target host")
        rep.outcome = "ready_for_host"
        return
    say(f"execution: deploying {win.label} to the sandbox staging VM", 0.87)
    try:
        d = await st.ask("deploy", DeploymentAnswer, {"token": rep.token, "target": "sandbox",
                                                      "interval_s": max(2.0, min(10.0, req.watch_s / 3 or 5))})
    except ToolFailed as e:
        rep.why += f" Deploying it to the sandbox staging VM failed: {e.message}"
        return
    dep = d.deployment
    if req.watch_s:
        say(f"execution: monitor watching {dep.id} for {req.watch_s:.0f} s", 0.9)
        await anyio.sleep(req.watch_s)
    status = await st.ask("get_status", StatusAnswer)
    dep = next((x for x in status.deployments if x.id == dep.id), dep)
    rep.deployment = dep
    rep.outcome = "deployed" if dep.status == "active" else "kept_default"
    if rep.outcome != "deployed":
        rep.why += f" The staging deployment did not stay active: {dep.end_reason}."
    rep.host_command = (f'schedcp deploy --token "$(schedcp token {win.report_id} --target host)"'
                        " --target host")


def _better(res: CandidateResult, rep: OptimizeReport) -> bool:
    """By the A/B intervals: the better worst case wins; the median ratios break a tie."""
    cur = next((c for c in rep.candidates if c.report_id == rep.winner), None)
    if cur is None or cur.worst is None:
        return True
    key = lambda c: (c.worst if c.worst is not None else math.inf,  # noqa: E731
                     c.score if c.score is not None else math.inf)
    return key(res) < key(cur)


async def learn(st: Stage, req: OptimizeRequest, rep: OptimizeReport, say: Progress) -> None:
    say("learning: feedback and repository update", 0.95)
    subjects = ([rep.deployment.id] if rep.deployment else []) + \
        [c.report_id for c in rep.candidates if c.report_id]
    for sid in subjects:
        try:
            fb = await st.ask("get_feedback", Feedback, {"subject_id": sid})
        except ToolFailed as e:
            rep.feedback.append(f"{sid}: {e.message}")
            continue
        rep.feedback.append(fb.summary)
        if fb.outcome_id:
            rep.outcome_ids.append(fb.outcome_id)
    win = next((c for c in rep.candidates if c.report_id and c.report_id == rep.winner), None)
    if win is not None and (win.params or not win.policy):
        fb = await st.ask("get_feedback", Feedback, {"subject_id": win.report_id})
        if fb.goals_met:
            base = win.policy or "custom"
            name = f"{base}_{rep.workloads[0]}_{win.report_id.split('-')[-1][:6]}"[:31]
            desc = (f"{win.label}, found by schedcp optimize for {', '.join(rep.workloads)} "
                    f"(profile {rep.profile_id}): {rep.why}")
            try:
                p = await st.ask("contribute_policy", PolicyBrief, {"report_id": win.report_id, "name": name,
                                                                    "description": desc})
                rep.contributed = p.name
            except ToolFailed as e:
                rep.feedback.append(f"not contributed: {e.message}")
    hits = (await st.ask("search_policies", SearchAnswer, {"query": rep.query, "profile_id": rep.profile_id,
                                                           "limit": 3})).hits
    rep.ranking_after = [f"{h.name} ({h.score:.2f}: {h.reason})" for h in hits]


# --- running it ------------------------------------------------------------------------------------

def server_params(req: OptimizeRequest) -> StdioServerParameters:
    args = ["-m", "schedcp_mcp", "serve"]
    if req.command:  # the human asked for exactly this command: the server may run it, no other
        args += ["--allow-exact-command", shlex.join(req.command)]
    # its validations trace round 1 of every workload: the re-plan diagnoses a loss from that
    # evidence (validate.evidence.TRACE_ROUNDS; a plain validation does not pay for it)
    env = {"SCHEDCP_TRACE_ROUNDS": "1", **os.environ}
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(Path.cwd()))


async def run(req: OptimizeRequest, progress: Progress | None = None) -> OptimizeReport:
    say = progress or (lambda m, f=0.0: None)
    if req.command is not None and req.workloads:
        raise BadInput("give sandbox workloads or a host command, not both",
                       "schedcp optimize --workload hackbench, or schedcp optimize -- CMD …")
    # every check that needs no VM, before the server starts (a host command's workloads are
    # matched later: only its goals' ratios can be checked now)
    if req.command is None:
        check_layer2_request(req.goals, req.workloads or None, req.rounds, None)
    for g in req.goals:
        check_goal_ratio(g)
    allowed = {role: agents.allowlist(role) for role in agents.ROLES}
    rep = OptimizeReport(started_at=time.time(), request=req)
    t0 = time.monotonic()
    try:
        await _stages(req, rep, allowed, say, t0)
    except BaseExceptionGroup as eg:  # the client's task group wraps what a stage raised
        raise _first(eg) from None
    rep.seconds = round(time.monotonic() - t0, 1)
    write_outputs(rep)
    say("done", 1.0)
    return rep


def _first(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        return e
    return eg


async def _stages(req: OptimizeRequest, rep: OptimizeReport, allowed: dict[str, set[str]],
                  say: Progress, t0: float) -> None:
    async with AsyncExitStack() as stack:
        say("starting the schedcp MCP server", 0.0)
        r, w = await stack.enter_async_context(stdio_client(server_params(req)))
        session = await stack.enter_async_context(ClientSession(r, w))
        await session.initialize()
        listed = (await session.list_tools()).tools
        have = {t.name for t in listed}
        defs = {t.name: len(t.model_dump_json(by_alias=True, exclude_none=True).encode()) for t in listed}
        for role, tools in allowed.items():
            if tools - have:
                raise InfrastructureError(
                    f"the {role} agent definition names tools this server lacks: "
                    f"{', '.join(sorted(tools - have))}", "run `schedcp agents generate`")
        stages = {role: Stage(session, role, allowed[role]) for role in agents.ROLES}
        try:
            await observe(stages["observation"], req, rep, say)
            await plan(stages["planning"], req, rep, say)
            rnd = 1
            nw = len(with_guards(rep.workloads))
            while True:
                more = rnd < MAX_PLAN_ROUNDS
                share = first_share(req, nw) if rnd == 1 else \
                    round_share(time_left(req, t0), candidate_budget(req, nw)[1], last=not more)
                await validate_round(stages["execution"], req, rep, say, t0, rnd, share)
                why = ("every candidate of the round failed" if rep.winner is None else
                       f"the best so far ({rep.winner_label}) only ties the default scheduler" if tied(rep) else None)
                if why is None or not more:
                    break
                if not await replan(stages["planning"], req, rep, say, t0, rnd, why):
                    break
                rnd += 1
            await conclude(stages["execution"], req, rep, say)
            await learn(stages["learning"], req, rep, say)
        finally:
            rep.calls = {role: s.calls for role, s in stages.items()}
            rep.traffic = {role: s.traffic for role, s in stages.items()}
            for role, s in stages.items():
                s.traffic.definitions_bytes = sum(defs.get(t, 0) for t in s.allowed)
            rep.traffic_total = total_traffic(rep.traffic.values())


def total_traffic(stages) -> Traffic:
    t = Traffic()
    for s in stages:
        t.calls += s.calls
        t.result_bytes += s.result_bytes
        t.definitions_bytes += s.definitions_bytes
        for tool, n in s.largest.items():
            t.largest[tool] = max(n, t.largest.get(tool, 0))
    t.est_tokens = answers.tokens(t.result_bytes)
    return t


def write_outputs(rep: OptimizeReport) -> None:
    out = Path(rep.request.out_dir) if rep.request.out_dir else \
        config.home() / "optimize" / (rep.plan_id or time.strftime("run-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    rep.json_path = str(out / "report.json")
    rep.chart_path = str(out / "chart.png") if any(c.figures for c in rep.candidates) else None
    if rep.chart_path and not has_matplotlib():
        rep.chart_path = None  # the chart is optional: `pip install 'schedcp[charts]'`
    if rep.chart_path:
        chart(rep, Path(rep.chart_path))
    Path(rep.json_path).write_text(rep.model_dump_json(indent=2) + "\n")


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def chart(rep: OptimizeReport, path: Path) -> None:
    """Each candidate vs the default scheduler per workload (> 1 = better, the one convention)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = [c for c in rep.candidates if c.figures]
    wls = list(dict.fromkeys(f.workload for c in cands for f in c.figures))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cands) * len(wls)), 4.2))
    width = 0.8 / max(1, len(wls))
    for j, wl in enumerate(wls):
        xs, ys, colors = [], [], []
        for i, c in enumerate(cands):
            f = next((f for f in c.figures if f.workload == wl), None)
            if f is None or not f.ratio:
                continue
            xs.append(i + j * width)
            ys.append(f.speedup)
            colors.append("tab:green" if c.report_id == rep.winner else
                          ("tab:blue" if c.passed else "tab:gray"))
        bars = ax.bar(xs, ys, width, color=colors, label=wl)
        guard = any(f.guard for c in cands for f in c.figures if f.workload == wl)
        for b, y in zip(bars, ys):
            ax.annotate(f"{wl}{' (guard)' if guard else ''}\n{y:.2f}", (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xticks([i + width * (len(wls) - 1) / 2 for i in range(len(cands))])
    ax.set_xticklabels([c.label + ("\n(winner)" if c.report_id == rep.winner else
                                   "\n(passed)" if c.passed else
                                   "\n(harms a guard)" if c.harmed_guards else "\n(failed)") for c in cands],
                       fontsize=8)
    ax.set_ylabel("vs default scheduler\n(> 1 is better)")
    ax.set_title(f"schedcp optimize {', '.join(rep.workloads)} — same-boot A/B medians", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chain_lines(rep: OptimizeReport) -> list[str]:
    """The learning chain: candidate -> why it lost (evidence) -> change -> next candidate -> figures."""
    if len(rep.plan_versions) < 2 and not rep.replans:
        return []
    out = ["re-planning: plan versions " + " -> ".join(rep.plan_versions)]
    out += [f"  {r}" for r in rep.replans]
    for c in rep.candidates:
        if not (c.diagnoses or c.came_from):
            continue
        figs = ", ".join(f"{f.workload} {in_words(f.speedup)} {f.interval} {f.verdict}"
                         for f in c.figures if f.ratio and not f.guard)
        head = f"  round {c.round}: {c.label}" + (f" (from {c.came_from})" if c.came_from else "")
        out.append(head + f": {'passed' if c.passed else 'lost'}" + (f"; {figs}" if figs else ""))
        phase = ""
        for ln in c.lost_because:  # diagnose_report's evidence: "phase:", then each side indented
            if not ln.startswith(" "):
                phase = ln.rstrip(":")
            elif ln.strip().startswith("candidate:"):
                out.append(f"    evidence {phase}: {ln.strip().removeprefix('candidate: ')}")
        out += [f"    -> {d}" for d in c.diagnoses]
    return out


def render(rep: OptimizeReport, console) -> None:
    """The human-readable report."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]schedcp optimize[/bold] — {rep.seconds:.0f} s, target {rep.request.target}")
    console.print(f"[bold]host[/bold]: {escape(rep.host_note)}")
    console.print(f"[bold]observation[/bold]: profile {rep.profile_id}: {escape(rep.profile_summary)}")
    for r in rep.workload_reasons:
        console.print(f"  workload {escape(r)}")
    console.print("  goals: " + ", ".join(f"{g.metric} {'<=' if g.direction == 'lower' else '>='} "
                                          f"{g.target_ratio}x" for g in rep.goals))
    console.print(f"[bold]planning[/bold]: plan {(rep.plan_versions or [rep.plan_id])[0]}, strategy {rep.strategy}: "
                  f"{escape(rep.rationale)}")
    t = Table("candidate", "report", "workload", "baseline", "candidate", "vs default", "95% interval",
              "verdict", "result", title="execution: sandbox A/B against the default scheduler "
                                           "(same boot; vs default: > 1 = better)")
    for c in rep.candidates:
        result = ("[green]WINNER[/green]" if c.report_id and c.report_id == rep.winner else
                  "passed" if c.passed else "[red]skipped[/red]" if c.error and not c.report_id
                  else "[red]failed[/red]")
        if not c.figures:
            t.add_row(escape(c.label), c.report_id or "-", "-", "-", "-", "-", "-", "-", result)
        for k, f in enumerate(c.figures):
            t.add_row(escape(c.label) if k == 0 else "", (c.report_id or "-") if k == 0 else "",
                      f.workload + (" (guard)" if f.guard else ""),
                      f"{f.baseline:.4g} {f.unit}" if f.baseline is not None else "-",
                      f"{f.candidate:.4g}" if f.candidate is not None else "-",
                      in_words(f.speedup) if f.ratio else "-", f.interval,
                      f.verdict, result if k == 0 else "")
    console.print(t)
    if rep.campaign_id:
        console.print(f"  validated as one campaign of supervised jobs: {rep.campaign_id} "
                      f"({rep.campaign_seconds:.0f} s; `schedcp jobs show {rep.campaign_id}`)")
    for c in rep.candidates:
        if c.harmed_guards:
            console.print(f"  [red]{escape(c.label)}[/red] {escape(guard_words(c))}: not deployable system-wide")
            if c.report_id and any(not f.guard and f.verdict == "better" for f in c.figures):
                # a target won and only guards lost: tokens.issue gives it a scoped token (partial mode)
                console.print(f"    if the guards were all it failed, it may run scoped (only the workload's tasks "
                              f"on it): `schedcp token {c.report_id} --scoped`, then `schedcp deploy --token T -- CMD`")
        if not c.passed:
            console.print(f"  [red]{escape(c.label)}[/red]: {escape(c.error or c.status)}")
        for w in c.warnings:
            if w.startswith(neighbours.BUSY):
                console.print(f"  [yellow]{escape(c.label)}[/yellow]: {escape(w)}")
    for ln in chain_lines(rep):
        console.print(escape(ln), soft_wrap=True)
    colour = "green" if rep.exit_code == 0 else "yellow"
    console.print(f"[{colour}]{'winner' if rep.winner else 'no winner'}[/{colour}]: {escape(rep.why)}")
    if rep.deployment:
        d = rep.deployment
        console.print(f"[bold]deployment[/bold]: {d.id} of {d.policy} on {d.target}: "
                      f"{d.status}, baseline {d.baseline}, {d.readings} monitor reading(s)"
                      + (f" ({escape(str(d.end_reason))})" if d.end_reason else ""))
    if rep.token and rep.request.target == "sandbox" and rep.deployment:
        console.print("  (its single-use sandbox token was spent by that deploy)")
    if rep.host_command:
        console.print("[bold]host[/bold] (a human decides; needs a sched_ext kernel and root):")
        console.print(f"  {escape(rep.host_command)}")
    for f in rep.feedback:
        console.print(f"[bold]feedback[/bold]: {escape(f)}")
    if rep.contributed:
        console.print(f"[bold]repository[/bold]: contributed policy {rep.contributed}")
    if rep.ranking_after:
        console.print("[bold]ranking now[/bold]: " + escape(" > ".join(rep.ranking_after[:3])))
    if rep.deployment and rep.outcome == "deployed":
        console.print("The staging VM keeps running it under the monitor (`schedcp status`); end it "
                      "with `schedcp rollback` and `schedcp sandbox stop`.")
    if rep.traffic:
        console.print("[bold]tool traffic[/bold] (what the agents read; tokens ≈ bytes/"
                      f"{answers.BYTES_PER_TOKEN}): " + ", ".join(
                          f"{role} {t.calls} calls {t.result_bytes / 1000:.1f} kB ~{t.est_tokens} tok"
                          for role, t in rep.traffic.items()))
        t = rep.traffic_total
        console.print(f"  total {t.calls} calls, {t.result_bytes / 1000:.1f} kB of results "
                      f"(~{t.est_tokens} tokens); largest: " + ", ".join(
                          f"{k} {v / 1000:.1f} kB" for k, v in
                          sorted(t.largest.items(), key=lambda kv: -kv[1])[:3]))
    console.print(f"report {rep.json_path}" + (f", chart {rep.chart_path}" if rep.chart_path else ""))
