"""A candidate's way through the layers: submit (layer 1) -> validate (layer 2) -> token.

The CLI and the MCP server both call these; each step stores its ValidationReport so an agent in a
later session can pick up from a report id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from .deploy.tokens import issue
from .errors import BadInput
from .jobs import queue
from .jobs.kinds import JobContext, register
from .jobs.models import Job
from .learn.feedback import record_validation_outcome
from .models import Goal
from .store import new_id
from .operations import (CampaignCandidate, CampaignRequest, CandidateRef, ValidateRequest, ValidateResult,
                         VerifyManyResult, VerifyProgramRequest, VerifyRequest, VerifyResult)
from .observe.profile import get_profile
from .reports import ValidationOutcome, ValidationReport, get_report, new_report, save, save_source
from .repository.policies import get_policy
from .validate.runner import BUDGET_S, MAX_ROUNDS, validate_in_sandbox
from .workloads import get_workloads, list_workloads
from .verify import pipeline
from .verify.source_check import MAX_SOURCE_BYTES

Progress = Callable[[str, float], None]


def submit(source: str | None = None, policy: str | None = None,
           params: dict[str, Any] | None = None, target: str = "sandbox",
           profile_id: str | None = None, goals: list[Goal] | None = None,
           trusted_include_dirs: tuple[Path, ...] = (), use_cache: bool = True,
           progress: Progress | None = None, vm=None, actor: str = "api",
           provenance=None, candidate_id: str | None = None,
           fixed_id: str | None = None) -> ValidationReport:
    """Layer 1 for a raw source or a repository policy; returns the stored report (with the
    synthesis provenance and candidate id when `synth` made it; `fixed_id`: its id, for a job).

    The host target puts untested BPF through this machine's own kernel verifier (loaded, never
    attached): an operator may ask for that (`actor="cli"`); an MCP client only when the server
    was started with --allow-host-verify."""
    if (source is None) == (policy is None):
        raise BadInput("give exactly one of source or policy",
                       "source = BPF C text; policy = a repository policy name")
    _refuse_host_verify(target, actor)
    if profile_id:
        prof = get_profile(profile_id)
        goals = goals if goals else prof.goals
    kw = dict(target=target, use_cache=use_cache, progress=progress, vm=vm)
    if policy is not None:
        text = get_policy(policy).source_text()
        layer1 = pipeline.verify_policy(policy, {k: str(v) for k, v in (params or {}).items()},
                                        trusted_include_dirs=trusted_include_dirs, **kw)
    else:
        # refused before anything is stored (the verifier's own check would reject it too, but
        # only after save_source had kept it)
        if len(source.encode()) > MAX_SOURCE_BYTES:
            raise BadInput(f"source is {len(source.encode())} bytes; the limit is {MAX_SOURCE_BYTES}",
                           "a sched_ext scheduler fits in a few hundred lines")
        text = source
        layer1 = pipeline.verify_source(source, params={k: str(v) for k, v in (params or {}).items()},
                                        trusted_include_dirs=trusted_include_dirs, **kw)
    if text:
        save_source(text)
    return new_report(layer1, policy=policy, params=layer1.params, profile_id=profile_id, goals=goals,
                      provenance=provenance, candidate_id=candidate_id, report_id=fixed_id)


def submit_program(program_sha: str, args: list[str], *, name: str = "program",
                   profile_id: str | None = None, goals: list[Goal] | None = None, vm=None,
                   progress: Progress | None = None, fixed_id: str | None = None) -> ValidationReport:
    """Layer 1 for a scheduler program (stored by `verify.program.save_program`) with its arguments:
    does it attach in the sandbox. The report binds the program's bytes and its arguments."""
    from .verify import program as vprog

    data = vprog.stored_program(program_sha)
    if data is None:
        raise BadInput(f"no stored program {program_sha[:12]}", "give the program's path again")
    if profile_id:
        goals = goals if goals else get_profile(profile_id).goals
    layer1 = vprog.verify_program(data, args, name=name, vm=vm, progress=progress)
    return new_report(layer1, policy=None, params={}, profile_id=profile_id, goals=goals, report_id=fixed_id)


def store_program(path: str | Path, args: list[str]) -> tuple[str, str, list[str]]:
    """Read, check (an x86-64 ELF executable; sane arguments) and keep a program before a job is
    queued: (sha256, file name, arguments). A peer's name (`scx_simple`) stands for its built program."""
    from .sandbox import peers
    from .sandbox.program import inspect_elf
    from .verify import program as vprog

    p = Path(path)
    if not p.exists() and "/" not in str(path) and str(path) in peers.WANTED:
        p = Path(peers.built_peers([str(path)])[0].path)
    data = vprog.read_program(p)
    inspect_elf(data, p.name)
    args = vprog.check_args(list(args))
    sha, _ = vprog.save_program(data)
    return sha, p.name, args


@register("verify_program", key=lambda r: _content_key("verify_program", r), timeout_s=600, max_attempts=2,
          sandbox=True, request=VerifyProgramRequest)
def _verify_program_job(ctx: JobContext) -> VerifyResult:
    req: VerifyProgramRequest = ctx.request
    r = submit_program(req.program_sha, req.args, name=req.name or "program", profile_id=req.profile_id,
                       goals=req.goals or None, progress=ctx.progress, fixed_id=f"rep-{ctx.job.id[4:]}")
    return VerifyResult(report_id=r.id, verdict=r.layer1.verdict, status=r.status)


def verify_program_job(path: str | Path, args: list[str], *, profile_id: str | None = None,
                       goals: list[Goal] | None = None, use_cache: bool = True, lane: str = "high",
                       actor: str = "api", complete_by_s: float | None = None) -> Job:
    """Queue layer 1 for a scheduler program with its arguments (the program is checked and stored
    first: a bad path or a non-executable is refused before anything is queued)."""
    sha, name, args = store_program(path, args)
    if profile_id:
        get_profile(profile_id)
    req = VerifyProgramRequest(program_sha=sha, args=args, name=name, profile_id=profile_id, goals=goals or None)
    return queue.submit("verify_program", req, lane=lane, use_cache=use_cache, actor=actor,
                        complete_by_s=complete_by_s)


def _refuse_host_verify(target: str, actor: str) -> None:
    if target == "host" and actor != "cli" and os.environ.get("SCHEDCP_ALLOW_HOST_VERIFY") != "1":
        raise BadInput("verifying on the host loads the program into this machine's kernel, and no "
                       "one allowed MCP clients to do that",
                       "use target sandbox; or a human runs `schedcp verify --target host`, or starts "
                       "the server with `schedcp serve --allow-host-verify`")


def report_or_submit(report_id: str | None, source: str | None, policy: str | None,
                     params: dict[str, Any] | None, **kw) -> ValidationReport:
    if report_id:
        if source or policy:
            raise BadInput("give a report_id or a source/policy, not both", "")
        return get_report(report_id)
    return submit(source=source, policy=policy, params=params, **kw)


def measures(workload, metric: str) -> bool:
    return metric == workload.metric or metric in workload.goal_metrics


def measurable_goals(goals: list[Goal], workload_names: list[str]) -> list[Goal]:
    """The goals (a profile's, typically) that the named sandbox workloads measure; when none is
    left, "do no harm" on each workload's own metric, so a validation never falls back to goals
    it cannot measure."""
    chosen = get_workloads(workload_names)
    kept = [g for g in goals if any(measures(w, g.metric) for w in chosen)]
    return kept or [Goal(metric=w.metric, direction=w.direction, target_ratio=1.0,
                         why=f"no profile goal is measured by {w.name}: do no harm on its metric")
                    for w in chosen]


def check_goals_measurable(goals: list[Goal], workloads) -> None:
    """Refuse, before any VM boots, a goal that no chosen workload measures (a typo, or a profile's
    goal with too few workloads), and say which workloads would measure it."""
    for g in goals:
        if any(measures(w, g.metric) for w in workloads):
            continue
        able = [w.name for w in list_workloads() if measures(w, g.metric)]
        known = sorted({m for w in list_workloads() for m in [w.metric, *w.goal_metrics]})
        raise BadInput(f"goal {g.metric!r} is not measured by the chosen workloads "
                       f"({', '.join(w.name for w in workloads)})",
                       f"add --workload {' / '.join(able)}" if able else
                       f"known metrics: {', '.join(known)}")


#: the longest one validation may run (the runner refuses more)
MAX_BUDGET_S = 3600.0


def check_goal_ratio(g: Goal) -> None:
    if g.target_ratio is not None and not (0 < g.target_ratio <= 100):
        raise BadInput(f"goal {g.metric}: ratio {g.target_ratio:g} is not a ratio to the default scheduler",
                       "give candidate/baseline, e.g. messaging_time_s<=0.9 (10 % faster) or "
                       "throughput>=1.05")


def check_layer2_request(goals: list[Goal] | None, workloads: list[str] | None, rounds: int,
                         budget_s: float | None, profile_id: str | None = None) -> None:
    """Every check of a layer-2 request that needs no VM, made before anything is queued (CLI and
    MCP alike): rounds, budget, workload names, the profile, and goals the workloads measure."""
    if not 1 <= rounds <= MAX_ROUNDS:
        raise BadInput(f"rounds must be 1..{MAX_ROUNDS}, not {rounds}", "3 is the usual minimum")
    if budget_s is not None and not 0 <= budget_s <= MAX_BUDGET_S:
        raise BadInput(f"budget must be 0..{MAX_BUDGET_S:g} seconds, not {budget_s:g}",
                       f"0 runs exactly the given rounds; the default is {BUDGET_S:g} s")
    chosen = get_workloads(workloads)
    if profile_id:
        get_profile(profile_id)  # an unknown profile is refused before anything is queued
    for g in goals or []:
        check_goal_ratio(g)
    if goals:
        check_goals_measurable(goals, chosen)


def validate(report_id: str | None = None, source: str | None = None, policy: str | None = None,
             params: dict[str, Any] | None = None, goals: list[Goal] | None = None,
             workloads: list[str] | None = None, profile_id: str | None = None,
             rounds: int = 3, progress: Progress | None = None, issue_token: bool = True,
             use_cache: bool = True, budget_s: float | None = None,
             run_id: str | None = None) -> ValidationOutcome:
    """Layer 2 in the sandbox for a report (or a new submission): stress, correctness and same-boot
    A/B against the default scheduler. Records the outcome; returns the report and, when it
    passed, a deployment token. `budget_s`: seconds for the sandbox run (default runner.BUDGET_S).
    `run_id` (a job's) fixes the new report's and the outcome's ids, so a job that runs again
    after a crash rewrites them instead of adding twins."""
    say = progress or (lambda msg, frac: None)
    r = report_or_submit(report_id, source, policy, params, profile_id=profile_id, goals=goals,
                         use_cache=use_cache, fixed_id=f"rep-{run_id}" if run_id else None,
                         progress=lambda m, f: say(f"layer 1: {m}", 0.1 * f))
    r = r.measured_again(f"rep-{run_id}" if run_id else new_id("rep"))
    if profile_id and not r.profile_id:
        r.profile_id = profile_id
    if goals:
        r.goals = goals
    elif not r.goals and r.profile_id:
        r.goals = get_profile(r.profile_id).goals
    if not r.passed_layer1:
        save(r)
        return ValidationOutcome.of(r, None)
    chosen = get_workloads(workloads)
    check_goals_measurable(r.goals, chosen)
    data = Path(r.object_path).read_bytes()
    launcher = None
    if r.layer1.program_args is not None:  # a scheduler program: started with its own loader
        from .sandbox.program import ProgramLauncher

        launcher = ProgramLauncher(data, list(r.layer1.program_args))
    layer2 = validate_in_sandbox(
        data, ops_name=r.ops_name or "", params=r.params, goals=r.goals,
        workloads=chosen, rounds=rounds, budget_s=BUDGET_S if budget_s is None else budget_s,
        progress=lambda m, f: say(f"layer 2: {m}", 0.1 + 0.9 * f), launcher=launcher)
    r.layer2 = layer2
    save(r)
    record_validation_outcome(r.id, outcome_id=f"out-{run_id}" if run_id else None)
    token = None
    if issue_token and r.passed:
        token = issue(r.id, "sandbox")
    return ValidationOutcome.of(r, token)


# --- as supervised jobs (schedcp_mcp.jobs) ----------------------------------------------------------
# The CLI and the MCP tools submit these and wait for them (or return the job id at once): a run
# outlives the client that asked for it, is retried when the machine fails it, and identical
# requests are answered from the result of the first.

@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the code of every layer that decides a verdict: layer 1 (verify/), layer 2
    (validate/, its BPF tracer included), the workloads and their parsers (workloads.py), the sandbox
    that runs both (sandbox/) and this module. A change to any of them must
    never be answered from an older job's result."""
    here = Path(__file__).parent
    return pipeline.files_hash([here / "candidates.py", here / "reports.py", here / "workloads.py",
                                *pipeline.source_files("verify", "validate", "sandbox")])


def _policy_src(name: str) -> str | None:
    """A policy's source and its metadata (the parameter defaults a validation loads it with)."""
    pol = get_policy(name)
    text = (pol.source_text() or "") + "\0" + pol.model_dump_json()
    return hashlib.sha256(text.encode()).hexdigest()


def _content_key(kind: str, req: VerifyRequest | ValidateRequest | VerifyProgramRequest) -> str | None:
    """What decides a verify/validate result: source (or report), every policy and its source,
    parameters, target, kernel build, the code of every deciding layer, workloads, rounds, goals.
    None (no dedupe) without a built sandbox image."""
    from .sandbox import image

    m = image.load_manifest()
    i = req.model_dump(mode="json")  # the request's fields, where its kind has them
    if m is None or i.get("include_dirs"):
        return None
    src = i.get("source")
    blob = {"kind": kind, "src": hashlib.sha256(src.encode()).hexdigest() if src else None,
            "policy_src": _policy_src(i["policy"]) if i.get("policy") else None,
            "policies": [(n, _policy_src(n)) for n in i.get("policies") or []],
            "report": i.get("report_id"), "policy": i.get("policy"), "params": sorted((i.get("params") or {}).items()),
            "target": i.get("target", "sandbox"), "build": m.build_id, "code": code_version(),
            "workloads": sorted(i.get("workloads") or []), "rounds": i.get("rounds"), "budget_s": i.get("budget_s"),
            "goals": i.get("goals"), "profile": i.get("profile_id"), "candidate": i.get("candidate"),
            "program": i.get("program_sha"), "args": i.get("args")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _check_request(source: str | None, policy: str | None, report_id: str | None = None) -> None:
    """The cheap checks, before a job is queued: a bad request is refused at once."""
    if sum(x is not None for x in (source, policy, report_id)) != 1:
        raise BadInput("give exactly one of source or policy" + (" or report_id" if report_id is not None else ""),
                       "source = BPF C text; policy = a repository policy name")
    if policy is not None:
        get_policy(policy)
    if report_id is not None:
        get_report(report_id)


@register("verify", key=lambda r: _content_key("verify", r), timeout_s=900, max_attempts=3, sandbox=True,
          issues_ids=("rep", "out"), request=VerifyRequest)
def _verify_job(ctx: JobContext) -> VerifyResult | VerifyManyResult:
    req: VerifyRequest = ctx.request
    if req.policies:  # several policies share one VM (a boot is most of a verify)
        from .sandbox.vm import VM

        out = []
        with VM() as vm:
            for n, name in enumerate(req.policies):
                ctx.progress(name, n / len(req.policies))
                r = submit(policy=name, target=req.target, use_cache=req.use_cache,
                           vm=vm, actor=req.actor, fixed_id=f"rep-{ctx.job.id[4:]}-{n}")
                out.append(VerifyResult(report_id=r.id, verdict=r.layer1.verdict, status=r.status))
        return VerifyManyResult(reports=out)
    r = submit(source=req.source, policy=req.policy, params=req.params, target=req.target,
               profile_id=req.profile_id, trusted_include_dirs=tuple(Path(d) for d in req.include_dirs),
               use_cache=req.use_cache, progress=ctx.progress, actor=req.actor,
               fixed_id=f"rep-{ctx.job.id[4:]}")
    return VerifyResult(report_id=r.id, verdict=r.layer1.verdict, status=r.status)


@register("validate", key=lambda r: _content_key("validate", r), timeout_s=3600, max_attempts=3, sandbox=True,
          issues_ids=("rep", "out"), request=ValidateRequest)
def _validate_job(ctx: JobContext) -> ValidateResult:
    req: ValidateRequest = ctx.request
    report_id = req.report_id
    if not report_id and not req.source and not req.policy:
        # a campaign node: validate the report its verify dependency made
        report_id = next(r.report_id for r in ctx.dep_result(VerifyResult))
    out = validate(report_id=report_id, source=req.source, policy=req.policy, params=req.params,
                   goals=req.goals or None, workloads=req.workloads, profile_id=req.profile_id,
                   rounds=req.rounds, budget_s=req.budget_s, progress=ctx.progress,
                   issue_token=False, use_cache=req.use_cache, run_id=ctx.job.id[4:])
    return ValidateResult(report_id=out.report_id, passed=out.passed, status=out.status)


def verify_job(request: VerifyRequest | None = None, *, lane: str = "high", complete_by_s: float | None = None,
               **fields: Any) -> Job:
    """Queue layer 1 (one source or policy, or several `policies` in one VM); the request, or its
    fields as keywords; `complete_by_s`: a deadline from now (a job past it is dead-lettered)."""
    req = request or VerifyRequest(**fields)
    if not req.policies:
        _check_request(req.source, req.policy)
    _refuse_host_verify(req.target, req.actor)
    return queue.submit("verify", req, lane=lane, use_cache=req.use_cache, actor=req.actor,
                        complete_by_s=complete_by_s)


def validate_job(request: ValidateRequest | None = None, *, lane: str = "high", actor: str = "api",
                 complete_by_s: float | None = None, **fields: Any) -> Job:
    """Queue layer 2 (after layer 1 when given a source or policy); the request, or its fields as
    keywords. Every check that needs no VM is made first."""
    req = request or ValidateRequest(**fields)
    if req.report_id:
        _check_request(req.source, req.policy, req.report_id)
    else:
        _check_request(req.source, req.policy)
    check_layer2_request(req.goals, req.workloads, req.rounds, req.budget_s, req.profile_id)
    return queue.submit("validate", req, lane=lane, use_cache=req.use_cache, actor=actor,
                        complete_by_s=complete_by_s)


def verified_report(job: Job) -> ValidationReport:
    """The report a finished verify job made (raises what went wrong otherwise)."""
    queue.result_or_raise(job)
    return get_report(job.result_as(VerifyResult).report_id)


def validation_outcome(job: Job, issue_token: bool = True) -> ValidationOutcome:
    """What a finished validate job answers, with a fresh deployment token when it passed (a job
    answered from the cache gets its own token: tokens are single use)."""
    queue.result_or_raise(job)
    r = get_report(job.result_as(ValidateResult).report_id)
    return ValidationOutcome.of(r, issue(r.id, "sandbox") if issue_token and r.passed else None)


def validate_campaign(request: CampaignRequest | list[CampaignCandidate | dict[str, Any]], *,
                      lane: str = "normal", actor: str = "api", complete_by_s: float | None = None,
                      **fields: Any) -> Job:
    """Validate several candidates as one DAG campaign: verify → validate for each (the validate
    node takes its report from the verify node; a report_id is validated as it is), the candidates
    in parallel up to the pool size, within the request's `budget` (earlier lanes first);
    `validation_budget_s` is each validation's own `budget_s`. `profile_id`: the WorkloadProfile
    they are all for: every report links to it (so the learning stage sees their outcomes) and its
    goals apply unless `goals` are given. A list of candidates with the request's other `fields` as
    keywords is the same request."""
    from .jobs.campaigns import Node, submit_campaign

    req = request if isinstance(request, CampaignRequest) else CampaignRequest(candidates=request, **fields)
    if not req.candidates:
        raise BadInput("a campaign needs at least one candidate", "give --policy NAME or --file FILE")
    from .access import check_cap

    check_cap("campaign_candidates", len(req.candidates), actor, "candidates in one campaign")
    check_layer2_request(req.goals, req.workloads, req.rounds, req.validation_budget_s, req.profile_id)
    check = dict(goals=req.goals or None, workloads=req.workloads, rounds=req.rounds,
                 budget_s=req.validation_budget_s, profile_id=req.profile_id, use_cache=req.use_cache)
    nodes, seen = [], set()
    for n, c in enumerate(req.candidates):
        _check_request(c.source, c.policy, c.report_id)
        name = c.name or c.policy or c.report_id or f"source{n}"
        name = name if name not in seen else f"{name}#{n}"
        seen.add(name)
        if c.report_id:  # already through layer 1 (e.g. generate_scheduler's)
            nodes.append(Node(name=f"validate:{name}", kind="validate", lane=c.lane,
                              inputs=ValidateRequest(report_id=c.report_id, **check).model_dump(mode="json")))
            continue
        who = CandidateRef(policy=c.policy, params=c.params or {}, report_id=c.report_id,
                           source_sha256=hashlib.sha256(c.source.encode()).hexdigest() if c.source else None)
        nodes.append(Node(name=f"verify:{name}", kind="verify", lane=c.lane, inputs=VerifyRequest(
            source=c.source, policy=c.policy, params=c.params or {}, target="sandbox", profile_id=req.profile_id,
            use_cache=req.use_cache, actor=actor).model_dump(mode="json")))
        nodes.append(Node(name=f"validate:{name}", kind="validate", lane=c.lane, after=[f"verify:{name}"],
                          inputs=ValidateRequest(candidate=who, **check).model_dump(mode="json")))
    return submit_campaign(f"validate {len(req.candidates)} candidates", nodes, budget=req.budget, lane=lane,
                           use_cache=req.use_cache, actor=actor, complete_by_s=complete_by_s)
