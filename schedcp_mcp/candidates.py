"""A candidate's way through the layers: submit (layer 1) -> validate (layer 2) -> token.

The CLI and the MCP server both call these; each step stores its ValidationReport so an agent in a
later session can pick up from a report id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .deploy.tokens import issue
from .errors import BadInput
from .learn.feedback import record_validation_outcome
from .models import Goal
from .observe.profile import get_profile
from .reports import ValidationOutcome, ValidationReport, get_report, new_report, save, save_source
from .repository.policies import get_policy
from .validate.runner import validate_in_sandbox
from .validate.workloads import get_workloads, list_workloads
from .verify import pipeline
from .verify.source_check import MAX_SOURCE_BYTES

Progress = Callable[[str, float], None]


def submit(source: str | None = None, policy: str | None = None,
           params: dict[str, Any] | None = None, target: str = "sandbox",
           profile_id: str | None = None, goals: list[Goal] | None = None,
           trusted_include_dirs: tuple[Path, ...] = (), use_cache: bool = True,
           progress: Progress | None = None, vm=None, actor: str = "api") -> ValidationReport:
    """Layer 1 for a raw source or a repository policy; returns the stored report.

    The host target puts untested BPF through this machine's own kernel verifier (loaded, never
    attached): an operator may ask for that (`actor="cli"`); an MCP client only when the server
    was started with --allow-host-verify."""
    if (source is None) == (policy is None):
        raise BadInput("give exactly one of source or policy",
                       "source = BPF C text; policy = a repository policy name")
    if target == "host" and actor != "cli" and os.environ.get("SCHEDCP_ALLOW_HOST_VERIFY") != "1":
        raise BadInput("verifying on the host loads the program into this machine's kernel, and no "
                       "one allowed MCP clients to do that",
                       "use target sandbox; or a human runs `schedcp verify --target host`, or starts "
                       "the server with `schedcp serve --allow-host-verify`")
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
    return new_report(layer1, policy=policy, params=layer1.params, profile_id=profile_id, goals=goals)


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


def validate(report_id: str | None = None, source: str | None = None, policy: str | None = None,
             params: dict[str, Any] | None = None, goals: list[Goal] | None = None,
             workloads: list[str] | None = None, profile_id: str | None = None,
             rounds: int = 3, progress: Progress | None = None, issue_token: bool = True,
             use_cache: bool = True) -> ValidationOutcome:
    """Layer 2 in the sandbox for a report (or a new submission): stress, correctness and same-boot
    A/B against the default scheduler. Records the outcome; returns the report and, when it
    passed, a deployment token."""
    say = progress or (lambda msg, frac: None)
    r = report_or_submit(report_id, source, policy, params, profile_id=profile_id, goals=goals,
                         use_cache=use_cache,
                         progress=lambda m, f: say(f"layer 1: {m}", 0.1 * f))
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
    layer2 = validate_in_sandbox(
        Path(r.object_path).read_bytes(), ops_name=r.ops_name or "", params=r.params, goals=r.goals,
        workloads=chosen, rounds=rounds,
        progress=lambda m, f: say(f"layer 2: {m}", 0.1 + 0.9 * f))
    r.layer2 = layer2
    save(r)
    record_validation_outcome(r.id)
    token = None
    if issue_token and r.passed:
        token = issue(r.id, "sandbox")
    return ValidationOutcome.of(r, token)
