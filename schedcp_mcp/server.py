"""The MCP server: a readable list of tools, each a thin call into the library.

Every tool has typed inputs (their `Field` descriptions are what the agent reads), structured
output (a pydantic model) and annotations saying whether it only reads or changes something.
Expected failures (`SchedcpError`) come back as MCP tool errors with the message and what to do;
anything else is logged here and reported without a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from . import __version__, diagnose, plans, reports, worker  # noqa: F401 — worker: every job kind
from . import answers as A
from . import candidates as candidate_jobs  # the name `candidates` is validate_campaign's argument
from .deploy import deployments, tokens
from .errors import BadInput, SchedcpError
from .jobs import queue as jobq
from .jobs.campaigns import CampaignResult
from .jobs.models import Budget, JobDetailView, LaneName
from .jobs.pool import Pool, run_to_end
from .learn import callbacks, contribute, feedback, history, match
from .models import Deployment, Goal, MetricResult
from .operations import CampaignCandidate, CampaignRequest, TuneRequest, ValidateRequest, VerifyRequest
from .observe import cpu, profile, system
from .repository import policies
from .synth.provenance import SynthResult
from .synth.spec import SchedulerSpec
from .workloads import get_workloads, list_workloads as all_workloads

log = logging.getLogger("schedcp.server")
T = TypeVar("T")

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True,
                            openWorldHint=False)
MEASURES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False,
                           openWorldHint=False)
SANDBOXED = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                            openWorldHint=False)
DESTRUCTIVE = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=False,
                              openWorldHint=False)

INSTRUCTIONS = """schedcp optimizes the Linux CPU scheduler with sched_ext BPF policies, safely.
Loop: observe (get_system_info, get_cpu_stats, profile_workload) -> plan (search_policies,
get_policy) -> execute (submit_scheduler = compile + kernel verifier; validate_scheduler = sandbox
VM stress + A/B benchmark; issue_token for a passed report, then deploy) -> learn (get_feedback,
record_outcome). Nothing reaches the host kernel without a deployment token (issue_token).
Results are summaries; ask detail="full" only for what a summary leaves out."""

@asynccontextmanager
async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
    """Background duties of a running server: resume deployment monitors that died with a previous
    server, evaluate registered callbacks, and run a job worker pool ($SCHEDCP_SERVER_WORKERS slots,
    default from the machine; 0: none, jobs wait for `schedcp worker`)."""
    pool = await anyio.to_thread.run_sync(_pool_enter)
    try:
        await anyio.to_thread.run_sync(deployments.resume_monitors)
    except Exception:  # the server must start even if the store or a target is unwell
        log.exception("could not resume deployment monitors")
    watcher = callbacks.Watcher(float(os.environ.get("SCHEDCP_CALLBACK_INTERVAL", "5"))).start()
    try:
        yield
    finally:
        watcher.stop()
        if pool:
            await anyio.to_thread.run_sync(_pool_leave)


_pool: Pool | None = None
_pool_users = 0
_pool_lock = threading.Lock()


def _pool_enter() -> bool:
    """The server process's one worker pool, shared by its sessions (a lifespan runs per session
    over HTTP); started by the first."""
    global _pool, _pool_users
    size = os.environ.get("SCHEDCP_SERVER_WORKERS")
    if size == "0":
        return False
    with _pool_lock:
        if _pool is None:
            try:
                _pool = Pool(int(size) if size else None).start()
            except Exception:
                log.exception("could not start the job worker pool")
                return False
        _pool_users += 1
    return True


def _pool_leave() -> None:
    global _pool, _pool_users
    with _pool_lock:
        _pool_users -= 1
        if _pool_users == 0 and _pool is not None:
            _pool.stop()
            _pool = None


server = MCPServer(name="schedcp", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan)


def agent_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn expected failures into tool errors an agent can act on; never leak a traceback."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except SchedcpError as e:
            raise ToolError(str(e)) from None
        except ValidationError as e:
            raise ToolError("invalid input: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        except Exception as e:  # a bug: log it for us, tell the agent plainly
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(f"internal error in {fn.__name__}: {type(e).__name__}: {e}. "
                            "This is a schedcp bug; the server logged the details.") from None

    return wrapper


async def in_thread(fn: Callable[..., T], *args: Any, ctx: Context | None = None, **kwargs: Any) -> T:
    """Run blocking library work in a worker thread; forward its progress(message, fraction)
    callbacks as MCP progress notifications."""
    if ctx is not None:
        def progress(message: str, fraction: float = 0.0) -> None:
            try:
                anyio.from_thread.run(ctx.report_progress, round(fraction * 100, 1), 100.0, message)
            except Exception:  # progress is best effort: a client that left must not kill work
                pass
        kwargs["progress"] = progress
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


# --- observe ---------------------------------------------------------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_system_info() -> CallToolResult:
    """Use first, to know the machine: CPU topology (cores, SMT, LLC, NUMA), kernel facts (sched_ext
    present and state, running BPF scheduler, BTF), and which observation/BPF tools work here."""
    s = await in_thread(system.get_system_info)
    sx = s.kernel.sched_ext
    return A.answer(s, f"{s.hostname}: kernel {s.kernel.release}, sched_ext "
                       f"{'present (' + str(sx.state) + ')' if sx.present else 'absent: use the sandbox'}")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_cpu_stats(
    interval_s: Annotated[float, Field(ge=0.1, le=60, description="sampling interval, seconds")] = 1.0,
    top_n: Annotated[int, Field(ge=1, le=100, description="how many top processes")] = 10,
) -> CallToolResult:
    """A snapshot of the host now: per-CPU utilisation, load, context switches/s, run-queue and
    scheduling delay, PSI cpu pressure, top processes with their policy and nice."""
    c = await in_thread(cpu.get_cpu_stats, interval_s, top_n)
    return A.answer(c, f"{c.ncpus} CPUs {c.total_busy_percent:.0f}% busy, "
                       f"{c.ctx_switches_per_s:.0f} ctx switches/s over {c.interval_s:g} s")


@server.tool(annotations=MEASURES)
@agent_errors
async def profile_workload(
    ctx: Context,
    command: Annotated[list[str] | None, Field(
        description="program and arguments to run on this host, e.g. ['hackbench','-g','2','-l','60']; "
        "only the sandbox workloads' commands unless the operator allowed more")] = None,
    pid: Annotated[int | None, Field(ge=1, description="attach to this running process instead")] = None,
    duration_s: Annotated[float, Field(ge=0.2, le=3600,
                                       description="max seconds to run / observe")] = 10.0,
    workload: Annotated[str | None, Field(
        description="or: a sandbox workload name (list_workloads); its benchmark runs here")] = None,
    repeat_s: Annotated[float, Field(
        ge=0, le=3600, description="rerun the command until this many seconds have passed (steady "
        "rates for a sub-second benchmark; match_workloads' references use 3)")] = 0.0,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Start of the loop: run (or attach to) a workload and store a WorkloadProfile. Returns its id,
    a summary, characteristics (CPU-bound / latency-sensitive / fork-heavy / parallelism) and goals;
    "full" adds perf counters, process-tree metrics and the runqlat histogram."""
    if workload is not None:
        if command is not None or pid is not None:
            raise ToolError("give one of command, pid or workload")
        p = await in_thread(match.profile_sandbox_workload, workload, duration_s, ctx=ctx)
    else:
        p = await in_thread(profile.profile_workload, command, pid, duration_s, ctx=ctx, actor="mcp",
                            repeat_s=repeat_s)
    return A.answer(p if detail == "full" else A.profile_brief(p), f"{p.id}: {A.clip(p.summary, 200)}")


@server.tool(annotations=MEASURES)
@agent_errors
async def match_workloads(
    ctx: Context,
    profile_id: Annotated[str, Field(description="a profile of a workload that runs on the host")],
    limit: Annotated[int, Field(ge=1, le=20)] = 5,
) -> CallToolResult:
    """After profiling a host workload: rank the sandbox benchmark workloads by resemblance, each
    with the features that agree or differ. Candidates are judged on the good matches (first use
    profiles each sandbox workload here)."""
    ms = await in_thread(match.match_workloads, profile_id, limit, ctx=ctx)
    return A.answer(A.MatchResult(profile_id=profile_id, matches=ms),
                    ", ".join(f"{m.workload} {m.similarity:.2f}" for m in ms) or "no workloads")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_profiles(
    limit: Annotated[int, Field(ge=1, le=200, description="page size, newest first")] = 20,
    cursor: Annotated[str | None, A.CURSOR] = None,
) -> CallToolResult:
    """Stored workload profiles (this and earlier sessions), newest first: id, command, summary."""
    ps, nxt = A.page(await in_thread(profile.list_profiles, A.offset(cursor) + limit + 1), cursor, limit)
    out = {"profiles": [A.pick(p, {"id", "created_at", "command", "pid", "summary"}) for p in ps],
           "next_cursor": nxt}
    return A.answer(out, f"{len(ps)} profile(s)" + (", more with next_cursor" if nxt else ""))


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_profile(profile_id: Annotated[str, Field(description="e.g. prof-1a2b3c4d5e")],
                      detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """One stored workload profile by id ("full": counters, process tree, runqlat histogram)."""
    p = await in_thread(profile.get_profile, profile_id)
    return A.answer(p if detail == "full" else A.profile_brief(p), f"{p.id}: {A.clip(p.summary, 200)}")


# --- plan --------------------------------------------------------------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def search_policies(
    query: Annotated[str, Field(description="keywords: workload, goal, algorithm, e.g. "
                                            "'latency interactive wakeup'")] = "",
    tags: Annotated[list[str] | None, Field(description="only policies with any of these tags")] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="page size")] = 10,
    profile_id: Annotated[str | None, Field(
        description="rank also by outcomes on workload profiles similar to this one")] = None,
    workloads: Annotated[list[str] | None, Field(
        description="the sandbox workloads the plan is judged on: a past win measured on fewer of them "
                    "is not counted (losses are)")] = None,
    cursor: Annotated[str | None, A.CURSOR] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Planning: find policies for a workload in the repository (ours and the scx catalog), best
    first. Each hit: name, score (text relevance + history on similar profiles), runnable, a
    one-line summary and the reason it matched; get_policy(name) for more."""
    metrics = {w.metric for w in get_workloads(workloads)} if workloads else None
    scorer = history.scorer_for(profile_id, metrics) if profile_id else None
    hits = await in_thread(policies.search_policies, query, tags, A.offset(cursor) + limit + 1, scorer)
    hits, nxt = A.page(hits, cursor, limit)
    out = [h.model_dump(mode="json") if detail == "full" else A.hit_brief(h) for h in hits]
    return A.answer({"query": query, "hits": out, "next_cursor": nxt},
                    " > ".join(f"{h.name} ({h.score:.2f})" for h in hits) or "no policy matches")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_policy(name: Annotated[str, Field(description="policy name, e.g. vtime_fair")],
                     detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """A policy before choosing or revising it: what it does, use cases, limitations, parameters
    (type/default/range) and its outcome history in brief; "full" adds the BPF source and every
    recorded outcome."""
    p = await in_thread(policies.get_policy, name)
    hist = await in_thread(history.outcomes_for_policy, name)
    if detail == "full":
        out = {"policy": p.model_dump(mode="json"), "source_code": p.source_text(),
               "history": [o.model_dump(mode="json") for o in hist]}
    else:
        out = {"policy": A.policy_brief(p),
               "history": [A.pick(o, {"id", "source", "params", "profile_id", "report_id", "reward",
                                      "goals_met"}) | {"measured": sorted({m.metric for m in o.metrics})}
                           for o in hist[:5]],
               "outcomes": len(hist)}
    return A.answer(out, f"{p.name}: {p.summary} ({len(hist)} recorded outcome(s))")


class GoalIn(BaseModel):
    metric: str = Field(description="e.g. p99_wakeup_latency_us, throughput, wall_time_s, or a "
                                    "workload metric such as messaging_time_s")
    direction: Literal["lower", "higher"]
    target_ratio: float = Field(description="candidate/baseline bound, e.g. 0.9 for 'lower'")


class CandidateIn(BaseModel):
    policy: str | None = Field(None, description="a repository policy name")
    params: dict[str, str] = Field({}, description="its parameters, e.g. {'slice_ns': '2000000'}")
    report_id: str | None = Field(None, description="or: a layer-1 report of a revised/generated source")
    source: str | None = Field(None, description="or: BPF C source")
    strategy: Literal["reconfigure", "revise", "generate"]
    why: str = Field(description="why this candidate suits the profile")


def plan_answer(p: plans.OptimizationPlan, detail: str) -> CallToolResult:
    out = p.model_dump(mode="json")
    if detail != "full":  # candidates' source text only on request
        for c in out["candidates"]:
            if c.get("source"):
                c["source"] = f"<{len(c['source'])} bytes: detail=full>"
    return A.answer(out, f"{p.id}: {p.strategy}, {len(p.candidates)} candidate(s) on "
                         f"{', '.join(p.workloads)}")


@server.tool(annotations=MEASURES)
@agent_errors
async def create_plan(
    profile_id: Annotated[str, Field(description="the WorkloadProfile the plan serves")],
    workloads: Annotated[list[str], Field(min_length=1,
                                          description="sandbox workloads that judge the candidates")],
    strategy: Annotated[Literal["reconfigure", "revise", "generate"], Field(
        description="reconfigure an existing policy (preferred), revise one, or generate one")],
    rationale: Annotated[str, Field(description="why this strategy and these candidates")],
    candidates: Annotated[list[CandidateIn], Field(min_length=1, description="in the order to try")],
    goals: Annotated[list[GoalIn] | None, Field(
        description="default: the profile's goals that the workloads measure")] = None,
    budget_s: Annotated[float | None, Field(gt=0, description="time budget for execution")] = None,
    replaces: Annotated[str | None, Field(description="re-planning: the plan (plan-…) this is the next "
                                          "version of; it stays stored")] = None,
    lessons: Annotated[list[plans.Lesson] | None, Field(
        description="re-planning: per lost candidate, why it lost and the change (from diagnose_report)")] = None,
) -> CallToolResult:
    """End of planning: store an OptimizationPlan (checked now: policies, parameters, reports,
    workloads, goals the workloads measure) for the execution stage; returns it with its id. After a
    round that failed, store the next round as a new version (`replaces`, `lessons`)."""
    gs = [Goal(**g.model_dump(), why="given by the planner") for g in goals] if goals else None
    cs = [plans.PlannedCandidate(**c.model_dump()) for c in candidates]
    p = await in_thread(plans.create_plan, profile_id, workloads, gs, strategy, rationale, cs,
                        budget_s, "mcp", replaces, lessons)
    return plan_answer(p, "summary")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def diagnose_report(report_id: Annotated[str, Field(description="a validated report (rep-…)")]
                          ) -> CallToolResult:
    """Re-planning: why a validated candidate lost, from the guest's evidence (run-queue waits and who
    they were behind, idle CPUs, the wake graph, switches; candidate vs default), and per rule the
    change to try next: a reconfigure_policy parameter change, a generate_scheduler spec or a
    revise_policy patch, each with its reason (docs/optimize.md, "When a round fails")."""
    a = await in_thread(diagnose_answer, report_id)
    return A.answer(a.model_dump(mode="json", exclude_none=True),
                    f"{a.report_id} ({a.candidate}): lost {', '.join(a.lost) or 'nothing'}; "
                    + (", ".join(f"{d.rule} -> {d.change.label}" for d in a.diagnoses) or "no rule fired"))


def diagnose_answer(report_id: str) -> A.DiagnosisAnswer:
    r = reports.get_report(report_id)
    if r.layer2 is None:
        raise BadInput(f"{report_id} has no sandbox run to diagnose ({r.status})", "validate it first")
    spec = r.provenance.spec if r.provenance else None
    policy = r.policy or (r.provenance.parent_policy if r.provenance and not spec else None)
    ds = diagnose.diagnose(r.layer2, policy, r.params, spec)
    label = (policy or (spec.name if spec else r.ops_name or "source")) + (
        "[" + ",".join(f"{k}={v}" for k, v in sorted(r.params.items())) + "]" if r.params and policy else "")
    return A.DiagnosisAnswer(report_id=r.id, candidate=label, lost=diagnose.lost_phases(r.layer2),
                           evidence=diagnose.evidence_lines(r.layer2), diagnoses=ds)


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_plan(plan_id: Annotated[str, Field(description="plan-…")],
                   detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """One stored OptimizationPlan: profile, workloads, goals, strategy, rationale, candidates
    (their source text with "full")."""
    return plan_answer(await in_thread(plans.get_plan, plan_id), detail)


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_plans(
    limit: Annotated[int, Field(ge=1, le=200, description="page size, newest first")] = 20,
    profile_id: Annotated[str | None, Field(description="only plans for this profile")] = None,
    cursor: Annotated[str | None, A.CURSOR] = None,
) -> CallToolResult:
    """Stored optimization plans, newest first: id, profile, strategy, workloads."""
    ps, nxt = A.page(await in_thread(plans.list_plans, A.offset(cursor) + limit + 1, profile_id),
                     cursor, limit)
    out = {"plans": [A.pick(p, {"id", "created_at", "profile_id", "strategy", "workloads"})
                     | {"candidates": len(p.candidates)} for p in ps], "next_cursor": nxt}
    return A.answer(out, f"{len(ps)} plan(s)")


# --- execute ---------------------------------------------------------------------------------------

JOB_ID = "the supervisor's job that ran (or, with background, will run) it: get_job"
BACKGROUND = Field(description="queue it and return a job id at once (follow with get_job); "
                               "otherwise wait, with progress notifications")
DEADLINE = Field(gt=0, le=7 * 86400, description="seconds from now; a job unfinished by then is "
                 "dead-lettered, its VMs stopped")


def queued(job_id: str) -> CallToolResult:
    return A.answer({"job_id": job_id, "state": "pending"},
                    f"queued as {job_id}: follow it with get_job")


def report_answer(r: reports.ValidationReport, detail: str, job_id: str | None = None) -> CallToolResult:
    """A report: in brief, or every field (logs, samples, timeline) with "full"."""
    out = r.model_dump(mode="json", exclude_none=True) if detail == "full" else A.report_brief(r)
    if job_id:
        out = {"job_id": job_id, **out}
    nxt = "; next: issue_token(report_id) to deploy it" if r.passed else ""
    what = r.policy or (f"program {r.layer1.program_name}" if r.layer1.program_args is not None else "source")
    return A.answer(out, f"{r.id} ({what}): {r.status}{nxt}")


@server.tool(annotations=SANDBOXED)
@agent_errors
async def submit_scheduler(
    ctx: Context,
    source: Annotated[str | None, Field(
        description="BPF C source of a sched_ext scheduler (#include <scx/common.bpf.h>)")] = None,
    policy: Annotated[str | None, Field(description="or: a repository policy name")] = None,
    params: Annotated[dict[str, str] | None, Field(
        description="const volatile parameters by name, e.g. {'slice_ns': '5000000'}; "
        "'map:NAME': 'N' sizes a map the scheduler leaves to its loader")] = None,
    target: Annotated[Literal["sandbox", "host"], Field(
        description="whose kernel verifies it: the sandbox VM (default), or this host (loaded, never "
        "attached; needs `schedcp serve --allow-host-verify`)")] = "sandbox",
    profile_id: Annotated[str | None, Field(
        description="the WorkloadProfile this candidate is for (its goals apply)")] = None,
    program: Annotated[str | None, Field(
        description="or: a scheduler program with its own loader, run only in the sandbox guest: a built "
        "peer's name (scx_simple, …) or an absolute path")] = None,
    program_args: Annotated[list[str] | None, Field(description="the program's arguments")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Layer 1, seconds: source checks, compile, ELF/BTF checks (kfuncs present in the target
    kernel, license, hot-path size) and the real kernel BPF verifier. Stores a ValidationReport;
    returns its id and verdict, a rejection with the failing program, source line and kernel
    message ("full": the whole verifier log). A program: it must attach in the sandbox."""
    if program is not None:
        if source or policy or params or target != "sandbox":
            raise BadInput("give a program alone (with program_args), in the sandbox")
        job = await in_thread(candidate_jobs.verify_program_job, program, program_args or [], profile_id=profile_id,
                              actor="mcp", lane="normal" if background else "high", complete_by_s=deadline_s)
    else:
        req = VerifyRequest(source=source, policy=policy, params=params or {}, target=target,
                            profile_id=profile_id, actor="mcp")
        job = await in_thread(candidate_jobs.verify_job, req, lane="normal" if background else "high",
                              complete_by_s=deadline_s)
    if background:
        return queued(job.id)
    r = candidate_jobs.verified_report(await in_thread(run_to_end, job.id, ctx=ctx))
    return report_answer(r, detail, job.id)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def validate_scheduler(
    ctx: Context,
    report_id: Annotated[str | None, Field(description="a report from submit_scheduler")] = None,
    source: Annotated[str | None, Field(description="or: BPF C source (runs layer 1 first)")] = None,
    policy: Annotated[str | None, Field(description="or: a repository policy name")] = None,
    params: Annotated[dict[str, str] | None, Field(description="parameters (with source/policy)")] = None,
    goals: Annotated[list[GoalIn] | None, Field(
        description="performance goals; default: the profile's goals, else 'no workload worse "
                    "than baseline beyond noise'")] = None,
    workloads: Annotated[list[str] | None, Field(description="subset of list_workloads names")] = None,
    profile_id: Annotated[str | None, Field(description="the WorkloadProfile it is for")] = None,
    rounds: Annotated[int, Field(ge=1, le=10, description="interleaved A/B rounds, at least")] = 3,
    budget_s: Annotated[float | None, Field(
        ge=0, le=3600, description="seconds for the sandbox run: more paired rounds while a workload's "
        "interval straddles its threshold (default 240; 0 = exactly `rounds`)")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Layer 2, minutes, one candidate: in a sched_ext sandbox VM, stress and correctness gates
    (stall watchdog, error exits, starvation) and interleaved A/B benchmarks against the default
    scheduler. Returns the report id, passed, failed gates and per workload the ratio with its
    interval ("full": samples, timeline, kernel log). A pass can then get a token (issue_token)."""
    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    req = ValidateRequest(report_id=report_id, source=source, policy=policy, params=params or {}, goals=gs,
                          workloads=workloads, profile_id=profile_id, rounds=rounds, budget_s=budget_s)
    job = await in_thread(candidate_jobs.validate_job, req, lane="normal" if background else "high", actor="mcp",
                          complete_by_s=deadline_s)
    if background:
        return queued(job.id)
    job = await in_thread(run_to_end, job.id, ctx=ctx)
    out = await in_thread(candidate_jobs.validation_outcome, job, False)
    return report_answer(out.report, detail, job.id)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def validate_campaign(
    ctx: Context,
    candidates: Annotated[list[CampaignCandidate], Field(min_length=1, max_length=50,
                                                         description="the candidates to validate")],
    goals: Annotated[list[GoalIn] | None, Field(description="performance goals for all")] = None,
    workloads: Annotated[list[str] | None, Field(description="subset of list_workloads names")] = None,
    profile_id: Annotated[str | None, Field(
        description="the WorkloadProfile they are all for (its goals apply; outcomes link to it)")] = None,
    rounds: Annotated[int, Field(ge=1, le=10)] = 3,
    budget_s: Annotated[float | None, Field(
        ge=0, le=3600, description="each validation's sandbox seconds, as validate_scheduler's "
        "(its validation_budget_s)")] = None,
    budget_runs: Annotated[int | None, Field(ge=0, description="at most this many sandbox runs")] = None,
    budget_sandbox_s: Annotated[float | None, Field(ge=0, description="at most this many sandbox seconds")] = None,
    measure_again: Annotated[bool, Field(description="run anew, not from an earlier identical run")] = False,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
) -> CallToolResult:
    """Execution, several candidates: validate them as one DAG campaign (verify -> validate each, in
    parallel up to the worker pool, within an optional budget). Returns each child job with its
    state, report id and passed, and what the budget left out; get_report for each one's figures."""
    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    budget = Budget(runs=budget_runs, sandbox_s=budget_sandbox_s) \
        if budget_runs is not None or budget_sandbox_s is not None else None
    req = CampaignRequest(candidates=candidates, goals=gs, workloads=workloads, profile_id=profile_id,
                          rounds=rounds, validation_budget_s=budget_s, budget=budget, use_cache=not measure_again)
    job = await in_thread(candidate_jobs.validate_campaign, req, actor="mcp",
                          lane="normal" if background else "high", complete_by_s=deadline_s)
    if background:
        return queued(job.id)
    job = await in_thread(run_to_end, job.id, ctx=ctx)
    jobq.result_or_raise(job)
    res = job.result_as(CampaignResult) if job.result else None
    out = {"job_id": job.id, "state": job.state, **(A.campaign_brief(res) if res else {})}
    passed = [c.name for c in (res.children if res else []) if c.passed]
    return A.answer(out, f"campaign {job.id} {job.state}: passed " + (", ".join(passed) or "none"))


# --- jobs --------------------------------------------------------------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_jobs(
    state: Annotated[Literal["pending", "running", "succeeded", "failed", "cancelled", "dead"] | None,
                     Field(description="only jobs in this state")] = None,
    kind: Annotated[str | None, Field(description="verify, validate, campaign, ...")] = None,
    lane: Annotated[LaneName | None, Field(description="priority lane")] = None,
    parent: Annotated[str | None, Field(description="the children of this campaign")] = None,
    limit: Annotated[int, Field(ge=1, le=500, description="page size, newest first")] = 20,
    cursor: Annotated[str | None, A.CURSOR] = None,
) -> CallToolResult:
    """The supervisor's jobs (sandbox runs), newest first, one line each (state, report, error);
    campaign children only with `parent`. get_job for one job's detail."""
    js = await in_thread(jobq.list_jobs, state, kind, lane, parent, parent is None,
                         A.offset(cursor) + limit + 1)
    js, nxt = A.page(js, cursor, limit)
    depth = await in_thread(jobq.queue_depth)
    return A.answer({"jobs": [A.job_brief(j) for j in js], "queue_depth": depth, "next_cursor": nxt},
                    f"{len(js)} job(s); pending per lane: {depth}")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_job(job_id: Annotated[str, Field(description="job-…")],
                  detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """A job: state, progress, attempts (with each failure), report id and verdict or error, its
    children ("full": inputs and raw result). A passed validation's token: issue_token."""
    d = await in_thread(jobq.detail, job_id)
    if detail == "full":
        out = JobDetailView.of(d).model_dump(mode="json", exclude_none=True)
    else:
        out = {"job": A.job_brief(d.job), "children": [A.job_brief(c) for c in d.children[:30]],
               "attempts": [A.pick(a, {"attempt", "outcome"}) | {"error": A.clip(a.error, 200)}
                            for a in d.attempts]}
    j = d.job
    return A.answer(out, f"{j.id} {j.kind} {j.state}" + (f": {A.clip(j.error, 200)}" if j.error else ""))


class Cancelled(BaseModel):
    cancelled: list[str] = Field(description="the job and the part of its subtree that had not ended")


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def cancel_job(job_id: Annotated[str, Field(description="job-…")]
                     ) -> Annotated[CallToolResult, Cancelled]:
    """Cancel a job and its subtree; their running sandbox VMs are stopped."""
    c = Cancelled(cancelled=await in_thread(jobq.cancel, job_id, actor="mcp"))
    return A.answer(c, f"cancelled {len(c.cancelled)} job(s)")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_workloads() -> CallToolResult:
    """The sandbox benchmark workloads that judge candidates: name, metric, unit, direction."""
    ws = all_workloads()
    return A.answer(A.WorkloadList.of(ws), ", ".join(w.name for w in ws))


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_report(report_id: Annotated[str, Field(description="rep-…")],
                     detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """A stored ValidationReport: passed, status, layer 1 verdict, layer 2 gates and per workload
    the A/B ratio with its interval ("full": samples, timeline, kernel and verifier logs)."""
    return report_answer(await in_thread(reports.get_report, report_id), detail)


@server.tool(annotations=MEASURES)
@agent_errors
async def issue_token(
    report_id: Annotated[str, Field(description="a report that passed layers 1 and 2 (rep-…)")],
    target: Annotated[Literal["sandbox", "host"], Field(
        description="host deploys need the operator's permission")] = "sandbox",
    scope: Annotated[Literal["system", "scoped"], Field(
        description="scoped: only deploy(scope=…)")] = "system",
) -> Annotated[CallToolResult, A.TokenOut]:
    """Execution, for the winner: a single-use token bound to that report's artifact and
    parameters (1 h). Refused for a report that did not pass (scoped only if it harmed only guards)."""
    t = await in_thread(tokens.issue, report_id, target, actor="mcp", scope=scope)
    return A.answer(A.TokenOut(token=t.token, report_id=t.report_id, target=t.target,
                             expires_at=t.expires_at),
                    f"single-use {t.target} token for {t.report_id}: deploy(token=…)")


class DeployResult(BaseModel):
    deployment: Deployment | deployments.DryRun


def deployment_answer(d: Deployment | deployments.DryRun, detail: str) -> CallToolResult:
    if isinstance(d, deployments.DryRun) or detail == "full":
        return A.answer(DeployResult(deployment=d), f"{type(d).__name__}")
    return A.answer({"deployment": A.deployment_brief(d)},
                    f"{d.id} of {d.policy or d.ops_name} on {d.target}: {d.status}")


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def deploy(
    ctx: Context,
    token: Annotated[str, Field(description="deployment token from issue_token")],
    target: Annotated[Literal["sandbox", "host"], Field(
        description="sandbox = the staging VM; host = this kernel (needs --allow-host-deploy)")] = "sandbox",
    dry_run: Annotated[bool, Field(description="check the token and say what would happen")] = False,
    metric_cmd: Annotated[str | None, Field(description="command printing a number to watch")] = None,
    metric_direction: Literal["lower", "higher"] = "lower",
    max_degradation_ratio: Annotated[float | None, Field(
        gt=1.0, le=10, description="default: from the report's goals (1.10 without goals)")] = None,
    consecutive: Annotated[int, Field(ge=1, le=100)] = 3,
    interval_s: Annotated[float, Field(ge=0.5, le=600)] = 5.0,
    workload_cmd: Annotated[str | None, Field(description="background workload in the target")] = None,
    scope: Annotated[str | None, Field(
        description="partial mode, only these tasks on it: pid:N or cgroup:PATH (default: system-wide)")] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Layer 3: load a validated scheduler with its single-use token, confirm it is enabled, and
    monitor it; rolled back automatically when the kernel disables it or the metric degrades.
    Returns the deployment id, status, baseline and the latest monitor reading."""
    from .deploy.scope import parse as parse_scope

    mon = deployments.MonitorPolicy(metric_cmd=metric_cmd, metric_direction=metric_direction,
                        max_degradation_ratio=max_degradation_ratio, consecutive=consecutive,
                        interval_s=interval_s, workload_cmd=workload_cmd)
    req = deployments.DeployRequest(token=token, target=target, dry_run=dry_run, monitor=mon,
                                    scope=parse_scope(scope))
    d = await in_thread(deployments.deploy, req, actor="mcp")
    return deployment_answer(d, detail)


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def rollback(
    deployment_id: Annotated[str | None, Field(description="default: the active one on target")] = None,
    target: Literal["sandbox", "host"] = "sandbox",
    reason: str = "agent requested rollback",
) -> CallToolResult:
    """Unload a deployed scheduler and restore the previous one (or the kernel default)."""
    d = await in_thread(deployments.rollback, deployment_id, target, reason, actor="mcp")
    return deployment_answer(d, "summary")


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def ab_test(
    ctx: Context,
    token: Annotated[str, Field(description="issue_token's; checked, not spent")],
    command: Annotated[list[str], Field(min_length=1, description="the workload's argv")],
    target: Literal["sandbox", "host"] = "sandbox",
    rounds: Annotated[int, Field(ge=2, le=50)] = 5,
    aa: Annotated[bool, Field(description="also a FIFO's partial-mode A/A")] = True,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Minutes: A/B of the user's command by its class, the candidate in partial mode: paired rounds
    as SCHED_EXT and SCHED_NORMAL, and a FIFO's A/A (the class order alone). Nothing stays
    deployed. Returns both intervals (> 1 = candidate better)."""
    from .bench.validate import fmt_interval
    from .deploy.ab import ab

    res = await in_thread(ab, token, command, target, rounds=rounds, aa=aa, actor="mcp",
                          ctx=ctx)
    line = (f"{res.ops_name} as SCHED_EXT vs SCHED_NORMAL: {fmt_interval(res.candidate)}"
            + (f"; fifo A/A (class order alone): {fmt_interval(res.aa)}" if res.aa else "")
            + f"; {res.rounds} paired rounds on {res.target}")
    if detail == "full":
        return A.answer(res, line)
    brief = {"report_id": res.report_id, "target": res.target, "rounds": res.rounds,
             "candidate": _interval_brief(res.candidate), "aa": _interval_brief(res.aa) if res.aa else None,
             "load_average": res.load_average, "seconds": res.seconds}
    return A.answer(brief, line)


def _interval_brief(w) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in w.model_dump().items()
            if k in ("speedup", "speedup_low", "speedup_high", "verdict", "pairs")}


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_status(detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """What is deployed where, since when, from which report, and the latest monitor reading
    ("full": every reading and the targets' sched_ext state)."""
    s = await in_thread(deployments.status)
    active = [d for d in s.deployments if d.status == "active"]
    text = ", ".join(f"{d.id} {d.policy} on {d.target}" for d in active) or "nothing deployed"
    if detail == "full":
        return A.answer(s, text)
    return A.answer({"deployments": [A.deployment_brief(d) for d in s.deployments[:10]],
                     "targets": {k: (v if isinstance(v, str) else
                                     v.model_dump(mode="json", exclude_none=True))
                                 for k, v in s.targets.items()}}, text)


# --- synthesis: primitives, generate, reconfigure, revise, tune --------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_primitives(detail: Annotated[A.Detail, A.DETAIL] = "summary") -> CallToolResult:
    """Before generate_scheduler: the algorithm primitives per axis (queue, ordering, cpu_select,
    slice, preempt, task_class) with what each does, and an example spec; "full" adds when to use
    each, where it fails, its knobs (type, default, range) and constraints."""
    from .synth.spec import catalog

    c = catalog()
    text = f"{len(c.primitives)} primitives on {len(c.axes)} axes"
    if detail == "full":
        return A.answer(c, text)
    return A.answer({"axes": c.axes,
                     "primitives": [A.pick(p, {"axis", "name", "what"})
                                    | {"knobs": [k.name for k in p.params]} for p in c.primitives],
                     "common_knobs": [k.name for k in c.common_params],
                     "class_treatments": list(c.class_treatments), "max_classes": c.max_classes,
                     "spec_example": c.spec_example.model_dump(mode="json", exclude_none=True)}, text)


def synth_answer(s: SynthResult, detail: str) -> CallToolResult:
    return A.answer(s if detail == "full" else A.synth_brief(s),
                    f"{s.candidate_id} / {s.report_id}: {s.status}")


@server.tool(annotations=SANDBOXED)
@agent_errors
async def generate_scheduler(
    ctx: Context,
    spec: Annotated[SchedulerSpec, Field(description="one primitive per axis, task classes and knob "
                                         "values — see list_primitives for the choices")],
    profile_id: Annotated[str | None, Field(description="the WorkloadProfile it is for")] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Generate a sched_ext scheduler from primitives: the spec is checked (unknown primitives,
    incompatible combinations, out-of-range knobs refused with why), rendered to C, compiled and
    run through the sandbox kernel's verifier. Returns a candidate id, the report id for
    validate_scheduler and structured errors ("full": the C source)."""
    from .synth.generate import generate

    return synth_answer(await in_thread(generate, spec, profile_id=profile_id, actor="mcp", ctx=ctx), detail)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def reconfigure_policy(
    ctx: Context,
    name: Annotated[str, Field(description="repository policy name")],
    params: Annotated[dict[str, str | int | bool], Field(
        description="new values of its policy.json parameters, e.g. {'slice_ns': 3000000}")],
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """A policy with new knob values: checked against its policy.json, injected as rodata by the
    loader (the source is never edited), then layer 1. Returns a candidate and report id."""
    from .synth.reconfigure import reconfigure

    return synth_answer(await in_thread(reconfigure, name, params, actor="mcp", ctx=ctx), detail)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def revise_policy(
    ctx: Context,
    base: Annotated[str, Field(description="a policy name or a candidate id (cand-…) to revise")],
    patch: Annotated[str, Field(description="unified diff of its BPF C source (diff -u / git diff)")],
    params: Annotated[dict[str, str] | None, Field(description="knob values to load it with")] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Apply a unified diff to a copy of a policy's or candidate's source and run layer 1 on it.
    A patch that does not apply is refused with the failing hunk. Returns a candidate and report
    id ("full": the revised source)."""
    from .synth.revise import revise

    return synth_answer(await in_thread(revise, base, patch, params, actor="mcp", ctx=ctx), detail)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def tune_policy(
    ctx: Context,
    name: Annotated[str, Field(description="a policy name, or a generated candidate id (cand-…)")],
    workloads: Annotated[list[str] | None, Field(
        description="sandbox workloads to tune on (list_workloads; default hackbench)")] = None,
    goals: Annotated[list[GoalIn] | None, Field(description="gates every trial is judged by")] = None,
    budget_rounds: Annotated[int, Field(ge=2, le=200, description="paired baseline/candidate rounds "
                                        "for all trials together (~3-10 s each under TCG)")] = 12,
    budget_s: Annotated[float | None, Field(gt=0, le=7200, description="wall-clock limit, s")] = None,
    configs: Annotated[int, Field(ge=2, le=16, description="configurations in the first rung")] = 4,
    space: Annotated[dict[str, list[int]] | None, Field(
        description="only these values per knob, e.g. {'slice_ns': [2000000, 5000000]}")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
    detail: Annotated[A.Detail, A.DETAIL] = "summary",
) -> CallToolResult:
    """Search a policy's knobs in the sandbox by successive halving (one VM boot). Returns the best
    parameters, their speedup interval against the defaults, and each trial in a line (each a
    candidate with a report); "full": every trial's per-round figures."""
    from .synth.tune import tune_job, tune_result

    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    req = TuneRequest(name=name, workloads=workloads, goals=gs, budget_rounds=budget_rounds, budget_s=budget_s,
                      configs=configs, space=space, actor="mcp")
    job = await in_thread(tune_job, req, lane="normal" if background else "high", complete_by_s=deadline_s)
    if background:
        return queued(job.id)
    job = await in_thread(run_to_end, job.id, ctx=ctx)
    t = tune_result(job)
    out = t.model_dump(mode="json", exclude_none=True) if detail == "full" else A.tune_brief(t)
    return A.answer({"job_id": job.id, "result": out},
                    f"{t.target}: best {t.best_params or 'defaults'} ({t.verdict})")


# --- learn -----------------------------------------------------------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_feedback(subject_id: Annotated[str, Field(
        description="a deployment id (dep-…) or a validation report id (rep-…)")]) -> CallToolResult:
    """Learning: before/after figures per metric, ratio, reward (mean log-improvement vs the
    default scheduler over the goal metrics, in [-1, 1]; -1 for a failed/killed scheduler), goals
    met, how long it ran, rollback and why, and a summary."""
    fb = await in_thread(feedback.get_feedback, subject_id)
    return A.answer(fb, A.clip(fb.summary, 300))


class MetricIn(BaseModel):
    metric: str
    direction: Literal["lower", "higher"]
    baseline: float = Field(gt=0)
    candidate: float = Field(gt=0)


@server.tool(annotations=MEASURES)
@agent_errors
async def record_outcome(
    policy: Annotated[str, Field(description="policy name (or 'custom')")],
    metrics: Annotated[list[MetricIn], Field(min_length=1, description="measured before/after")],
    profile_id: Annotated[str | None, Field(description="the workload it served")] = None,
    params: dict[str, int] | None = None,
    note: str = "",
) -> CallToolResult:
    """Record an outcome measured outside schedcp; it feeds the history ranking of search_policies."""
    ms = [MetricResult(**m.model_dump(), ratio=round(m.candidate / m.baseline, 6))
          for m in metrics]
    o = history.new_outcome(source="external", policy=policy, params=params or {},
                            profile_id=profile_id, metrics=ms, note=note)
    o = await in_thread(history.record, o)
    return A.answer(o, f"recorded {o.id}: reward {o.reward:+.3f}")


@server.tool(annotations=MEASURES)
@agent_errors
async def contribute_policy(
    report_id: Annotated[str, Field(description="a report that passed layers 1 and 2 and met its goals")],
    name: Annotated[str, Field(description="new policy name: lowercase, digits, underscore")],
    description: str,
    tags: list[str] | None = None,
) -> CallToolResult:
    """Learning: add a validated generated/revised scheduler to the repository with provenance."""
    p = await in_thread(contribute.contribute_policy, report_id, name, description, tags, actor="mcp")
    return A.answer(A.policy_brief(p) | {"provenance": p.provenance}, f"contributed policy {p.name}")


@server.tool(annotations=MEASURES)
@agent_errors
async def register_callback(
    url: Annotated[str, Field(description="http(s) URL; loopback unless the operator allowed the host")],
    kind: Literal["psi_cpu_above", "reward_below", "profile_changed"],
    threshold: float,
    deployment_id: str | None = None,
    profile_id: str | None = None,
    cooldown_s: Annotated[float, Field(ge=0)] = 60.0,
) -> CallToolResult:
    """Have the server POST a JSON event to `url` when a condition becomes true (CPU PSI above a
    level, a deployment's reward below a level, the workload no longer resembling a profile)."""
    cond = callbacks.Condition(kind=kind, threshold=threshold, deployment_id=deployment_id,
                               profile_id=profile_id, cooldown_s=cooldown_s)
    cb = await in_thread(callbacks.register, url, cond)
    return A.answer(cb, f"callback {cb.id} on {kind} > {threshold:g}")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_callbacks(
    limit: Annotated[int, Field(ge=1, le=200, description="page size")] = 50,
    cursor: Annotated[str | None, A.CURSOR] = None,
) -> CallToolResult:
    """Registered callbacks with their last value and firing count."""
    cbs, nxt = A.page(await in_thread(callbacks.list_callbacks), cursor, limit)
    return A.answer({"callbacks": [c.model_dump(mode="json", exclude_none=True) for c in cbs],
                     "next_cursor": nxt}, f"{len(cbs)} callback(s)")


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def remove_callback(callback_id: str) -> CallToolResult:
    """Stop a callback."""
    cb = await in_thread(callbacks.remove, callback_id)
    return A.answer(cb, f"removed {cb.id}")


def lean(schema: Any) -> Any:
    """A JSON schema without pydantic's generated titles: the property names say it already."""
    if isinstance(schema, dict):
        return {k: lean(v) for k, v in schema.items()
                if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [lean(v) for v in schema]
    return schema


for _tool in server._tool_manager.list_tools():  # once, before the first tools/list
    # the docstring's source indentation is not for the reader (~4 % of tools/list)
    _tool.description = " ".join((_tool.description or "").split())
    _tool.parameters = lean(_tool.parameters)
    if _tool.fn_metadata.output_schema:
        _tool.fn_metadata.output_schema = lean(_tool.fn_metadata.output_schema)


def run_stdio() -> None:
    server.run("stdio")


STATUS_COOKIE = "schedcp_status"
SESSION_TTL_S = 12 * 3600


def status_app(token: str, secure: bool = False):
    """The status page (/status, HTML), its state (/status/state, JSON), /status/login?token=… and
    /status/logout. A browser opens the login once: it gets a **session** cookie — a random value of
    its own, never the bearer token, valid for /status only (HttpOnly, SameSite=Strict, Secure over
    TLS), for SESSION_TTL_S, revoked by /status/logout or a server restart — and is redirected to
    /status. A session opens nothing else (/mcp takes only the bearer header). Every request needs
    the bearer header or a live session."""
    import hashlib
    import hmac
    import secrets
    import time as _time

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    from .access import bearer_ok
    from .web import status

    sessions: dict[str, float] = {}  # sha256(session) -> expiry: a leaked table opens nothing

    def session_ok(request: Request) -> bool:
        value = request.cookies.get(STATUS_COOKIE, "")
        h = hashlib.sha256(value.encode()).hexdigest()
        return bool(value) and sessions.get(h, 0) > _time.time()

    def allowed(request: Request) -> bool:
        return bearer_ok(request.headers.get("authorization", "").encode(), token) or session_ok(request)

    async def page(request: Request) -> Response:
        if not allowed(request):
            return HTMLResponse("<p>schedcp status: open /status/login?token=&lt;the server's HTTP "
                                "token&gt; once</p>", status_code=401)
        return HTMLResponse(status.render_html(await anyio.to_thread.run_sync(status.state)))

    async def state(request: Request) -> Response:
        if not allowed(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return JSONResponse((await anyio.to_thread.run_sync(status.state)).model_dump(mode="json"))

    async def login(request: Request) -> Response:
        given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "wrong token"}, status_code=401)
        now = _time.time()
        for h in [h for h, exp in sessions.items() if exp <= now]:
            del sessions[h]
        value = secrets.token_urlsafe(32)
        sessions[hashlib.sha256(value.encode()).hexdigest()] = now + SESSION_TTL_S
        r = RedirectResponse("/status", status_code=303)
        r.set_cookie(STATUS_COOKIE, value, max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                     path="/status", secure=secure)
        return r

    async def logout(request: Request) -> Response:
        sessions.pop(hashlib.sha256(request.cookies.get(STATUS_COOKIE, "").encode()).hexdigest(), None)
        r = JSONResponse({"logged_out": True})
        r.delete_cookie(STATUS_COOKIE, path="/status")
        return r

    return Starlette(routes=[Route("/status", page), Route("/status/state", state),
                             Route("/status/login", login), Route("/status/logout", logout)])


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values this server answers to (DNS rebinding: a page on another name that
    resolves here must not reach it). Loopback answers to its usual names."""
    from .access import is_loopback

    names = {"127.0.0.1", "localhost", "[::1]"} if is_loopback(host) else \
        {f"[{host}]" if ":" in host else host}
    return {f"{n}:{port}" for n in names}


def host_origin_ok(headers: list[tuple[bytes, bytes]], hosts: set[str]) -> bool:
    """One Host header naming this server, and an Origin (when a browser sends one) of this server."""
    got = [(k.lower(), v.decode("latin-1")) for k, v in headers]
    host = [v for k, v in got if k == b"host"]
    origin = [v for k, v in got if k == b"origin"]
    if len(host) != 1 or host[0].lower() not in hosts or len(origin) > 1:
        return False
    return not origin or origin[0].lower() in {f"{s}://{h}" for s in ("http", "https") for h in hosts}


def run_http(host: str, port: int, token: str, tls: tuple[str, str] | None = None) -> None:
    """Streamable HTTP. The bearer token is required on every request (compared in constant time),
    and the Host/Origin check on every request, /status included; /status is the status page (see
    status_app). `tls`: (certificate file, key file) to serve HTTPS."""
    import uvicorn
    from starlette.responses import JSONResponse

    from .access import bearer_ok

    if not token:
        raise ValueError("run_http needs a token")
    inner = server.streamable_http_app(host=host)
    status_pages = status_app(token, secure=tls is not None)
    hosts = allowed_hosts(host, port)
    _pool_enter()  # for the life of the process: background jobs outlive the sessions that asked

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            return
        if scope["type"] == "http":
            if not host_origin_ok(scope.get("headers") or [], hosts):
                await JSONResponse({"error": "wrong Host or Origin for this server"},
                                   status_code=421)(scope, receive, send)
                return
            if (scope.get("path") or "").startswith("/status"):
                await status_pages(scope, receive, send)
                return
            auth = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
            if len(auth) != 1 or not bearer_ok(auth[0], token):
                await JSONResponse({"error": "missing or wrong bearer token"},
                                   status_code=401)(scope, receive, send)
                return
        await inner(scope, receive, send)

    kw = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    uvicorn.run(app, host=host, port=port, log_level="warning", **kw)
