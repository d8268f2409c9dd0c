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
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from . import __version__, plans, reports
from . import candidates as candidate_jobs  # the name `candidates` is validate_campaign's argument
from .deploy import deployments
from .errors import SchedcpError
from .jobs import queue as jobq
from .jobs.campaigns import CampaignResult
from .jobs.models import Budget, JobDetailView, JobView, LaneName
from .jobs.pool import Pool, run_to_end
from .learn import callbacks, contribute, feedback, history, match
from .learn.history import Outcome
from .models import Deployment, Goal, MetricResult
from .observe import cpu, profile, system
from .repository import policies
from .synth.primitives import Catalog
from .synth.provenance import SynthResult
from .synth.spec import SchedulerSpec
from .synth.tune import TuneResult
from .validate.models import Layer2Result, Workload
from .validate.workloads import list_workloads as all_workloads
from .verify.models import Layer1Report

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
VM stress + A/B benchmark; deploy needs a token from a passed validation) -> learn (get_feedback,
record_outcome). Nothing reaches the host kernel without a deployment token."""

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
async def get_system_info() -> system.SystemInfo:
    """CPU topology (cores, SMT siblings, LLC domains, NUMA), kernel facts (sched_ext present and
    state, running BPF scheduler, BTF, config), and which observation/BPF tools work here and why
    not."""
    return await in_thread(system.get_system_info)


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_cpu_stats(
    interval_s: Annotated[float, Field(ge=0.1, le=60, description="sampling interval, seconds")] = 1.0,
    top_n: Annotated[int, Field(ge=1, le=100, description="how many top processes")] = 10,
) -> cpu.CpuStats:
    """Per-CPU utilisation split, load, context switches/interrupts per second, run-queue and
    scheduling-delay figures (/proc/schedstat where the kernel has it), PSI cpu pressure, and the
    top processes with their scheduling policy and nice."""
    return await in_thread(cpu.get_cpu_stats, interval_s, top_n)


@server.tool(annotations=MEASURES)
@agent_errors
async def profile_workload(
    ctx: Context,
    command: Annotated[list[str] | None, Field(
        description="program and arguments to run on this host, e.g. ['hackbench','-g','2','-l','60']; "
        "only the sandbox workloads' commands unless the operator allowed more "
        "(`schedcp serve --allow-command-prefix/--allow-command`)")] = None,
    pid: Annotated[int | None, Field(ge=1, description="attach to this running process instead")] = None,
    duration_s: Annotated[float, Field(ge=0.2, le=3600,
                                       description="max seconds to run / observe")] = 10.0,
    workload: Annotated[str | None, Field(
        description="or: a sandbox workload name (list_workloads); its benchmark runs here")] = None,
    repeat_s: Annotated[float, Field(
        ge=0, le=3600, description="run the command again and again until this many seconds have "
        "passed: a sub-second benchmark is too short for steady rates (match_workloads' references "
        "use 3)")] = 0.0,
) -> profile.WorkloadProfile:
    """Run (or attach to) a workload and store a WorkloadProfile: perf counters where supported,
    process-tree metrics, run-queue latency histogram (runqlat) where it can run, a summary,
    characteristics (CPU-bound / latency-sensitive / fork-heavy / parallelism / I/O) and explicit
    optimization goals. Returns the profile with its id for later tools."""
    if workload is not None:
        if command is not None or pid is not None:
            raise ToolError("give one of command, pid or workload")
        return await in_thread(match.profile_sandbox_workload, workload, duration_s, ctx=ctx)
    return await in_thread(profile.profile_workload, command, pid, duration_s, ctx=ctx, actor="mcp",
                           repeat_s=repeat_s)


class MatchResult(BaseModel):
    profile_id: str
    matches: list[match.WorkloadMatch]


@server.tool(annotations=MEASURES)
@agent_errors
async def match_workloads(
    ctx: Context,
    profile_id: Annotated[str, Field(description="a profile of a workload that runs on the host")],
    limit: Annotated[int, Field(ge=1, le=20)] = 5,
) -> MatchResult:
    """Rank the sandbox benchmark workloads by how much they resemble a profiled host workload
    (same similarity as the learning history), each with the features that agree or differ. The
    sandbox judges candidates on the best matches. First use profiles each sandbox workload here."""
    ms = await in_thread(match.match_workloads, profile_id, limit, ctx=ctx)
    return MatchResult(profile_id=profile_id, matches=ms)


class ProfileList(BaseModel):
    profiles: list[profile.WorkloadProfile]


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_profiles(
    limit: Annotated[int, Field(ge=1, le=200, description="how many, newest first")] = 20,
) -> ProfileList:
    """Stored workload profiles, newest first (from this and earlier sessions)."""
    return ProfileList(profiles=await in_thread(profile.list_profiles, limit))


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_profile(profile_id: Annotated[str, Field(description="e.g. prof-1a2b3c4d5e")]
                      ) -> profile.WorkloadProfile:
    """One stored workload profile by id."""
    return await in_thread(profile.get_profile, profile_id)


# --- plan --------------------------------------------------------------------------------------------

class SearchResult(BaseModel):
    query: str
    hits: list[policies.SearchHit]


@server.tool(annotations=READ_ONLY)
@agent_errors
async def search_policies(
    query: Annotated[str, Field(description="keywords: workload, goal, algorithm, e.g. "
                                            "'latency interactive wakeup'")] = "",
    tags: Annotated[list[str] | None, Field(description="only policies with any of these tags")] = None,
    limit: Annotated[int, Field(ge=1, le=100)] = 10,
    profile_id: Annotated[str | None, Field(
        description="rank also by outcomes on workload profiles similar to this one")] = None,
) -> SearchResult:
    """Search the policy repository (our sched_ext policies and the scx production catalog).
    Each hit has a score and the reason it matched."""
    scorer = history.scorer_for(profile_id) if profile_id else None
    hits = await in_thread(policies.search_policies, query, tags, limit, scorer)
    return SearchResult(query=query, hits=hits)


class PolicyDetail(BaseModel):
    policy: policies.Policy
    source_code: str | None
    history: list[Outcome] = Field([], description="outcomes recorded for this policy")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_policy(name: Annotated[str, Field(description="policy name, e.g. vtime_fair")]
                     ) -> PolicyDetail:
    """A policy's metadata, BPF source, parameters (type/default/range) and outcome history."""
    p = await in_thread(policies.get_policy, name)
    return PolicyDetail(policy=p, source_code=p.source_text(),
                        history=history.outcomes_for_policy(name))


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
) -> plans.OptimizationPlan:
    """Store an OptimizationPlan (checked now: policies, parameters, reports, workloads, and goals
    the workloads measure) and return it with its id, for the execution stage."""
    gs = [Goal(**g.model_dump(), why="given by the planner") for g in goals] if goals else None
    cs = [plans.PlannedCandidate(**c.model_dump()) for c in candidates]
    return await in_thread(plans.create_plan, profile_id, workloads, gs, strategy, rationale, cs,
                           budget_s, "mcp")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_plan(plan_id: Annotated[str, Field(description="plan-…")]) -> plans.OptimizationPlan:
    """One stored OptimizationPlan: profile, workloads, goals, strategy, rationale, candidates."""
    return await in_thread(plans.get_plan, plan_id)


class PlanList(BaseModel):
    plans: list[plans.OptimizationPlan]


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_plans(
    limit: Annotated[int, Field(ge=1, le=200)] = 20,
    profile_id: Annotated[str | None, Field(description="only plans for this profile")] = None,
) -> PlanList:
    """Stored optimization plans, newest first."""
    return PlanList(plans=await in_thread(plans.list_plans, limit, profile_id))


# --- execute ---------------------------------------------------------------------------------------

JOB_ID = Field(description="the supervisor's job that ran (or, with background, will run) it: get_job")


class SubmitResult(BaseModel):
    job_id: str = JOB_ID
    report_id: str | None = Field(None, description="None while a background job runs")
    status: str | None = None
    layer1: Layer1Report | None = None


class ValidateResult(BaseModel):
    """reports.ValidationOutcome, with the job; only job_id is set while a background job runs."""
    job_id: str = JOB_ID
    report_id: str | None = None
    passed: bool | None = None
    status: str | None = None
    token: str | None = Field(None, description="single-use deployment token when the report passed")
    layer1: Layer1Report | None = None
    layer2: Layer2Result | None = None


BACKGROUND = Field(description="queue it and return a job id at once (follow with get_job); "
                               "otherwise wait, with progress notifications")
DEADLINE = Field(gt=0, le=7 * 86400, description="complete-by deadline, seconds from now: a job "
                 "not finished by then is dead-lettered (its sandbox VMs stopped); default none")


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
        "attached; needs a sched_ext host and `schedcp serve --allow-host-verify`)")] = "sandbox",
    profile_id: Annotated[str | None, Field(
        description="the WorkloadProfile this candidate is for (its goals apply)")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
) -> SubmitResult:
    """Layer 1: untrusted-source checks, compile, ELF/BTF checks (callbacks, kfuncs present in the
    target kernel, license, hot-path size) and the real kernel BPF verifier. Stores a
    ValidationReport; a rejection explains the failing program, source line and kernel message."""
    job = await in_thread(candidate_jobs.verify_job, source, policy, params, target, profile_id, actor="mcp",
                          lane="normal" if background else "high", complete_by_s=deadline_s)
    if background:
        return SubmitResult(job_id=job.id)
    r = candidate_jobs.verified_report(await in_thread(run_to_end, job.id, ctx=ctx))
    return SubmitResult(job_id=job.id, report_id=r.id, status=r.status, layer1=r.layer1)


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
        "interval straddles its threshold (default 120; 0 = exactly `rounds`)")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
) -> ValidateResult:
    """Layer 2 in a sched_ext sandbox VM: baseline under the default scheduler, load, stress and
    correctness checks (stall watchdog, error exits, starvation), interleaved A/B benchmarks, unload.
    Takes minutes; sends progress. A pass returns a deployment token."""
    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    job = await in_thread(candidate_jobs.validate_job, report_id, source, policy, params, gs, workloads,
                          profile_id, rounds, lane="normal" if background else "high", actor="mcp",
                          budget_s=budget_s, complete_by_s=deadline_s)
    if background:
        return ValidateResult(job_id=job.id)
    job = await in_thread(run_to_end, job.id, ctx=ctx)
    out = await in_thread(candidate_jobs.validation_outcome, job)
    return ValidateResult(job_id=job.id, **out.model_dump())


class CampaignCandidate(BaseModel):
    policy: str | None = Field(None, description="a repository policy name")
    source: str | None = Field(None, description="or: BPF C source")
    report_id: str | None = Field(None, description="or: a report that passed layer 1 (submit_scheduler, "
                                  "generate_scheduler)")
    params: dict[str, str] | None = None
    name: str | None = Field(None, description="how the campaign's result names it")
    lane: LaneName = Field("normal", description="priority: a tight budget starts higher lanes first")


class CampaignOut(BaseModel):
    job_id: str
    state: str
    result: CampaignResult | None = None


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
        ge=0, le=3600, description="each validation's sandbox seconds, as validate_scheduler's")] = None,
    budget_runs: Annotated[int | None, Field(ge=0, description="at most this many sandbox runs")] = None,
    budget_sandbox_s: Annotated[float | None, Field(ge=0, description="at most this many sandbox seconds")] = None,
    background: Annotated[bool, BACKGROUND] = False,
    deadline_s: Annotated[float | None, DEADLINE] = None,
) -> CampaignOut:
    """Validate several candidates as one DAG campaign (verify -> validate each, in parallel up to
    the worker pool's size, within an optional budget). The result lists every candidate's report
    and what the budget left out; get_report / get_job give the details."""
    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    budget = Budget(runs=budget_runs, sandbox_s=budget_sandbox_s) \
        if budget_runs is not None or budget_sandbox_s is not None else None
    job = await in_thread(candidate_jobs.validate_campaign, [c.model_dump() for c in candidates], goals=gs,
                          workloads=workloads, rounds=rounds, budget=budget, actor="mcp",
                          lane="normal" if background else "high", budget_s=budget_s,
                          profile_id=profile_id, complete_by_s=deadline_s)
    if not background:
        job = await in_thread(run_to_end, job.id, ctx=ctx)
        jobq.result_or_raise(job)
    return CampaignOut(job_id=job.id, state=job.state,
                       result=CampaignResult.model_validate(job.result) if job.result else None)


# --- jobs --------------------------------------------------------------------------------------------

class JobList(BaseModel):
    jobs: list[JobView]
    queue_depth: dict[str, int] = Field(description="pending jobs per priority lane")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_jobs(
    state: Annotated[Literal["pending", "running", "succeeded", "failed", "cancelled", "dead"] | None,
                     Field(description="only jobs in this state")] = None,
    kind: Annotated[str | None, Field(description="verify, validate, campaign, ...")] = None,
    lane: Annotated[LaneName | None, Field(description="priority lane")] = None,
    parent: Annotated[str | None, Field(description="the children of this campaign")] = None,
    limit: Annotated[int, Field(ge=1, le=500)] = 50,
) -> JobList:
    """The supervisor's jobs (sandbox runs), newest first; campaign children only with `parent`."""
    js = await in_thread(jobq.list_jobs, state, kind, lane, parent, parent is None, limit)
    return JobList(jobs=[JobView.of(j) for j in js], queue_depth=await in_thread(jobq.queue_depth))


class JobOut(BaseModel):
    detail: JobDetailView
    validation: reports.ValidationOutcome | None = Field(
        None, description="a finished validate job's outcome (a pass carries a fresh deployment token)")


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_job(job_id: Annotated[str, Field(description="job-…")]) -> JobOut:
    """A job: state, progress, attempts (with each failure), result or error, children."""
    d = await in_thread(jobq.detail, job_id)
    out = None
    if d.job.kind == "validate" and d.job.state == "succeeded":
        out = await in_thread(candidate_jobs.validation_outcome, d.job)
    return JobOut(detail=JobDetailView.of(d), validation=out)


class Cancelled(BaseModel):
    cancelled: list[str] = Field(description="the job and the part of its subtree that had not ended")


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def cancel_job(job_id: Annotated[str, Field(description="job-…")]) -> Cancelled:
    """Cancel a job and its subtree; their running sandbox VMs are stopped."""
    return Cancelled(cancelled=await in_thread(jobq.cancel, job_id, actor="mcp"))


class WorkloadList(BaseModel):
    workloads: list[Workload]


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_workloads() -> WorkloadList:
    """The sandbox benchmark workloads: name, command, metric, unit, direction."""
    return WorkloadList(workloads=all_workloads())


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_report(report_id: Annotated[str, Field(description="rep-…")]) -> reports.ValidationReport:
    """A stored ValidationReport (layer 1 and layer 2 results, status, passed)."""
    return await in_thread(reports.get_report, report_id)


class DeployResult(BaseModel):
    deployment: Deployment | deployments.DryRun


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def deploy(
    ctx: Context,
    token: Annotated[str, Field(description="deployment token from validate_scheduler")],
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
) -> DeployResult:
    """Layer 3: load a validated scheduler with its single-use token, confirm it is enabled, and
    monitor it; it is rolled back automatically when the kernel disables it or the metric degrades."""
    mon = deployments.MonitorPolicy(metric_cmd=metric_cmd, metric_direction=metric_direction,
                        max_degradation_ratio=max_degradation_ratio, consecutive=consecutive,
                        interval_s=interval_s, workload_cmd=workload_cmd)
    d = await in_thread(deployments.deploy, token, target, actor="mcp", dry_run=dry_run, monitor=mon)
    return DeployResult(deployment=d)


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def rollback(
    deployment_id: Annotated[str | None, Field(description="default: the active one on target")] = None,
    target: Literal["sandbox", "host"] = "sandbox",
    reason: str = "agent requested rollback",
) -> DeployResult:
    """Unload a deployed scheduler and restore the previous one (or the kernel default)."""
    d = await in_thread(deployments.rollback, deployment_id, target, reason, actor="mcp")
    return DeployResult(deployment=d)


@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_status() -> deployments.StatusReport:
    """What is deployed where, since when, from which report/token, and the latest monitor reading."""
    return await in_thread(deployments.status)


# --- synthesis: primitives, generate, reconfigure, revise, tune --------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_primitives() -> Catalog:
    """The algorithm primitives a generated scheduler is built from, per axis (queue, ordering,
    cpu_select, slice, preempt, task_class): what each does, when to use it, where it fails, its
    knobs (type, default, range) and constraints, plus an example spec for generate_scheduler."""
    from .synth.primitives import catalog

    return catalog()


@server.tool(annotations=SANDBOXED)
@agent_errors
async def generate_scheduler(
    ctx: Context,
    spec: Annotated[SchedulerSpec, Field(description="one primitive per axis, task classes and knob "
                                         "values — see list_primitives for the choices")],
    profile_id: Annotated[str | None, Field(description="the WorkloadProfile it is for")] = None,
) -> SynthResult:
    """Generate a sched_ext scheduler from primitives: the spec is checked first (unknown primitives,
    incompatible combinations, out-of-range knobs are refused, each saying which and why), then
    rendered to C, compiled and loaded by the sandbox kernel's verifier at once. Returns the source,
    a candidate id, the report id for validate_scheduler, and structured compile/verifier errors."""
    from .synth.generate import generate

    return await in_thread(generate, spec, profile_id=profile_id, actor="mcp", ctx=ctx)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def reconfigure_policy(
    ctx: Context,
    name: Annotated[str, Field(description="repository policy name")],
    params: Annotated[dict[str, str | int | bool], Field(
        description="new values of its policy.json parameters, e.g. {'slice_ns': 3000000}")],
) -> SynthResult:
    """A policy with new knob values: types and ranges checked against its policy.json, injected as
    rodata by the loader (the source is never edited), then checked by layer 1. Returns a candidate."""
    from .synth.reconfigure import reconfigure

    return await in_thread(reconfigure, name, params, actor="mcp", ctx=ctx)


@server.tool(annotations=SANDBOXED)
@agent_errors
async def revise_policy(
    ctx: Context,
    base: Annotated[str, Field(description="a policy name or a candidate id (cand-…) to revise")],
    patch: Annotated[str, Field(description="unified diff of its BPF C source (diff -u / git diff)")],
    params: Annotated[dict[str, str] | None, Field(description="knob values to load it with")] = None,
) -> SynthResult:
    """Apply a unified diff to a copy of a policy's or candidate's source and run layer 1 on the
    result. A patch that does not apply is refused with the failing hunk."""
    from .synth.revise import revise

    return await in_thread(revise, base, patch, params, actor="mcp", ctx=ctx)


class TuneOut(BaseModel):
    job_id: str = JOB_ID
    result: TuneResult | None = Field(None, description="None while a background job runs")


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
) -> TuneOut:
    """Search a policy's knobs in the sandbox by successive halving (defaults, earlier best, one- and
    two-knob moves; the better half gets twice the rounds each rung; one VM boot). Returns the best
    parameters, their speedup interval against the defaults, and every trial (each a candidate with a
    report and a learning-history outcome)."""
    from .synth.tune import tune_job, tune_result

    gs = [Goal(**g.model_dump(), why="given by the agent") for g in goals] if goals else None
    job = await in_thread(tune_job, name, workloads, gs, budget_rounds, budget_s, configs, space,
                          lane="normal" if background else "high", actor="mcp", complete_by_s=deadline_s)
    if background:
        return TuneOut(job_id=job.id)
    job = await in_thread(run_to_end, job.id, ctx=ctx)
    return TuneOut(job_id=job.id, result=tune_result(job))


# --- learn -----------------------------------------------------------------------------------------

@server.tool(annotations=READ_ONLY)
@agent_errors
async def get_feedback(subject_id: Annotated[str, Field(
        description="a deployment id (dep-…) or a validation report id (rep-…)")]) -> feedback.Feedback:
    """Before/after figures per metric, ratio, reward (mean log-improvement vs the default
    scheduler over the goal metrics, in [-1, 1]; -1 for a failed/killed scheduler), whether goals were
    met, how long it ran, rollback and why, and a summary."""
    return await in_thread(feedback.get_feedback, subject_id)


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
) -> history.Outcome:
    """Record an outcome measured outside schedcp; it feeds the history ranking of search_policies."""
    ms = [MetricResult(**m.model_dump(), ratio=round(m.candidate / m.baseline, 6))
          for m in metrics]
    o = history.new_outcome(source="external", policy=policy, params=params or {},
                            profile_id=profile_id, metrics=ms, note=note)
    return history.record(o)


@server.tool(annotations=MEASURES)
@agent_errors
async def contribute_policy(
    report_id: Annotated[str, Field(description="a report that passed layers 1 and 2 and met its goals")],
    name: Annotated[str, Field(description="new policy name: lowercase, digits, underscore")],
    description: str,
    tags: list[str] | None = None,
) -> policies.Policy:
    """Add a validated generated/revised scheduler to the repository with provenance."""
    return await in_thread(contribute.contribute_policy, report_id, name, description, tags, actor="mcp")


@server.tool(annotations=MEASURES)
@agent_errors
async def register_callback(
    url: Annotated[str, Field(description="http(s) URL; loopback unless the operator allowed the host")],
    kind: Literal["psi_cpu_above", "reward_below", "profile_changed"],
    threshold: float,
    deployment_id: str | None = None,
    profile_id: str | None = None,
    cooldown_s: Annotated[float, Field(ge=0)] = 60.0,
) -> callbacks.Callback:
    """Have the server POST a JSON event to `url` when a condition becomes true (CPU PSI above a
    level, a deployment's reward below a level, the workload no longer resembling a profile)."""
    cond = callbacks.Condition(kind=kind, threshold=threshold, deployment_id=deployment_id,
                               profile_id=profile_id, cooldown_s=cooldown_s)
    return await in_thread(callbacks.register, url, cond)


class CallbackList(BaseModel):
    callbacks: list[callbacks.Callback]


@server.tool(annotations=READ_ONLY)
@agent_errors
async def list_callbacks() -> CallbackList:
    """Registered callbacks with their last value and firing count."""
    return CallbackList(callbacks=await in_thread(callbacks.list_callbacks))


@server.tool(annotations=DESTRUCTIVE)
@agent_errors
async def remove_callback(callback_id: str) -> callbacks.Callback:
    """Stop a callback."""
    return await in_thread(callbacks.remove, callback_id)


def run_stdio() -> None:
    server.run("stdio")


STATUS_COOKIE = "schedcp_status"


def status_app(token: str):
    """The status page (/status, HTML), its state (/status/state, JSON) and /status/login?token=…,
    which a browser opens once: it sets the token as an HttpOnly cookie (a browser cannot send a
    bearer header) and redirects to /status. Every other request needs the bearer header or that
    cookie."""
    import hmac

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    from .access import bearer_ok
    from .jobs import status

    def allowed(request: Request) -> bool:
        cookie = request.cookies.get(STATUS_COOKIE, "")
        return bearer_ok(request.headers.get("authorization", "").encode(), token) or \
            hmac.compare_digest(cookie.encode(), token.encode())

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
        r = RedirectResponse("/status", status_code=303)
        r.set_cookie(STATUS_COOKIE, token, httponly=True, samesite="strict", path="/status")
        return r

    return Starlette(routes=[Route("/status", page), Route("/status/state", state),
                             Route("/status/login", login)])


def run_http(host: str, port: int, token: str) -> None:
    """Streamable HTTP. The bearer token is required on every request (compared in constant time);
    /status is the status page (see status_app)."""
    import uvicorn
    from starlette.responses import JSONResponse

    from .access import bearer_ok

    if not token:
        raise ValueError("run_http needs a token")
    inner = server.streamable_http_app(host=host)
    status_pages = status_app(token)
    _pool_enter()  # for the life of the process: background jobs outlive the sessions that asked

    async def app(scope, receive, send):
        if scope["type"] == "http" and (scope.get("path") or "").startswith("/status"):
            await status_pages(scope, receive, send)
            return
        if scope["type"] == "http":
            auth = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
            if len(auth) != 1 or not bearer_ok(auth[0], token):
                await JSONResponse({"error": "missing or wrong bearer token"},
                                   status_code=401)(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            return
        await inner(scope, receive, send)

    uvicorn.run(app, host=host, port=port, log_level="warning")
