"""The sandbox benchmarks as supervised jobs: `schedcp bench aa | synth | policies | stability`.

A benchmark queues, survives the client that asked for it, shows its progress, can be cancelled and
have a deadline, and with `--background` is just a job id — like a validation:
- `bench aa` and `bench synth`: one job each (what they measure is one VM boot);
- `bench policies`: a campaign of one `validate` node per policy — the very job `schedcp validate
  --policy P` runs, so an identical validation is answered from the cache (`--no-cache` runs it
  again) — and a report node that runs once they have all ended, however they ended, and writes the
  table, markdown, JSON and chart;
- `bench stability`: a campaign of N `validate` nodes of the policy, each with its own report, and
  the report node; the N validations are never answered from the cache (or shared with one
  another): the point is N fresh boots.
The measuring and the tables are bench/validate.py's and bench/synth.py's. A job renders its
output into text (`printed`), which the command prints as it did when it ran the benchmark itself;
report nodes read the store and write files, so they run beside the store (`local`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field
from rich.console import Console
from rich.text import Text

from .. import candidates  # noqa: F401 — the validate and verify_program kinds its campaigns queue
from ..errors import BadInput, InfrastructureError
from ..jobs import queue
from ..jobs.campaigns import Node, submit_campaign
from ..jobs.kinds import JobContext, register
from ..jobs.models import Job
from ..operations import CandidateRef, ValidateRequest, ValidateResult, VerifyProgramRequest
from ..reports import get_report
from ..repository.policies import get_policy
from . import validate as bench


def _recorder(width: int) -> Console:
    return Console(record=True, file=io.StringIO(), width=width, force_terminal=True)


def show(result: dict[str, Any], console: Console) -> None:
    """Print what a benchmark job printed (its tables, styled as the console can show them)."""
    console.print(Text.from_ansi(result.get("printed", "")), soft_wrap=True, end="")


def without_printed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "printed"}


def report_of(campaign: Job) -> dict[str, Any]:
    """A finished benchmark campaign's report node's result (or what went wrong, raised)."""
    queue.result_or_raise(campaign)
    node = next(j for j in queue.list_jobs(parent=campaign.id, limit=10_000) if j.node == "report")
    return queue.result_or_raise(node)


def _siblings(ctx: JobContext) -> dict[str, Job]:
    return {j.node: j for j in queue.list_jobs(parent=ctx.job.parent, limit=10_000)}


def _report_id(job: Job) -> str:
    return job.result_as(ValidateResult).report_id


class AaRequest(BaseModel):
    rounds: int = 15
    budget_s: float | None = 0.0
    workloads: list[str] | None = None
    width: int = 100


class SynthBenchRequest(BaseModel):
    workers: int = 2


class ReportRequest(BaseModel):
    """A benchmark campaign's report node: what it reports on and where it writes."""
    names: list[str] = Field([], description="policies (policies, peers)")
    policy: str | None = Field(None, description="the policy (stability)")
    runs: int = Field(0, description="validations (stability)")
    rounds: int = 3
    validation_budget_s: float | None = Field(None, description="each validation's budget_s", validation_alias=AliasChoices(
        "validation_budget_s", "budget_s"))  # budget_s: how rows written before the rename call it
    out_dir: str | None = None
    width: int = 100


# --- aa, synth: one job each ---------------------------------------------------------------------

@register("bench_aa", timeout_s=3600, max_attempts=3, sandbox=True, request=AaRequest)
def _aa_job(ctx: JobContext) -> dict[str, Any]:
    i: AaRequest = ctx.request
    con = _recorder(i.width)
    res = bench.bench_aa(rounds=i.rounds, budget_s=i.budget_s, workloads=i.workloads,
                         console=con, progress=ctx.progress)
    return {**res, "printed": con.export_text(styles=True)}


def aa_job(rounds: int = 15, budget_s: float | None = 0.0, workloads: list[str] | None = None, *,
           width: int = 100, lane: str = "high", actor: str = "api", complete_by_s: float | None = None) -> Job:
    """Queue `bench aa` (never from the cache: it measures the machine's noise now)."""
    from ..workloads import get_workloads

    get_workloads(workloads)
    return queue.submit("bench_aa", AaRequest(rounds=rounds, budget_s=budget_s, workloads=workloads,
                                              width=width), lane=lane, actor=actor, use_cache=False,
                        complete_by_s=complete_by_s)


@register("bench_synth", timeout_s=1800, max_attempts=3, sandbox=True, request=SynthBenchRequest)
def _synth_job(ctx: JobContext) -> dict[str, Any]:
    from .synth import bench_synth
    from ..synth.matrix import matrix

    lines: list[str] = []
    total = len(list(matrix())) + 2

    def say(line: str) -> None:
        lines.append(line)
        ctx.progress(line.split("  ")[0][:60], min(1.0, len(lines) / total))

    res = bench_synth(workers=ctx.request.workers, say=say)
    return {**res, "printed": "".join(line + "\n" for line in lines)}


def synth_job(workers: int = 2, *, lane: str = "high", actor: str = "api",
              complete_by_s: float | None = None) -> Job:
    """Queue `bench synth` (never from the cache: it times the verifier)."""
    if not 1 <= workers <= 16:
        raise BadInput(f"workers={workers}: give 1..16 compile threads")
    return queue.submit("bench_synth", SynthBenchRequest(workers=workers), lane=lane, actor=actor, use_cache=False,
                        complete_by_s=complete_by_s)


# --- policies: a validation per policy, then the report ----------------------------------------

def _validation(name: str, **kw: Any) -> dict[str, Any]:
    """A policy's validate request: a repository policy by name, a kernel example by its source."""
    src = bench.peer_source(name)
    if src is None:
        get_policy(name)
    return ValidateRequest(policy=None if src else name, source=src, **kw).model_dump(mode="json")


def policies_campaign(names: list[str] | None = None, rounds: int = 3, validation_budget_s: float | None = None,
                      out_dir: Path = Path("results"), *, use_cache: bool = True, width: int = 100,
                      lane: str = "high", actor: str = "api", complete_by_s: float | None = None) -> Job:
    """Queue `bench policies`: one validation per policy (in parallel up to the pool size), then the
    report into `out_dir`."""
    names = bench.policy_names(names)
    nodes = [Node(name=f"validate:{n}", kind="validate", lane=lane,
                  inputs=_validation(n, rounds=rounds, budget_s=validation_budget_s, use_cache=use_cache))
             for n in names]
    nodes.append(Node(name="report", kind="bench_policies_report", lane=lane, join=True,
                      after=[n.name for n in nodes], inputs=ReportRequest(
                          names=names, rounds=rounds, validation_budget_s=validation_budget_s,
                          out_dir=str(Path(out_dir).resolve()),
                          width=width).model_dump(mode="json")))
    return submit_campaign(f"bench policies ({len(names)})", nodes, lane=lane, use_cache=use_cache,
                           actor=actor, complete_by_s=complete_by_s)


def _policy_row(name: str, job: Job) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": name}
    if job.state != "succeeded":
        row["error"] = job.error or job.state
        return row
    r = get_report(_report_id(job))
    row["layer1"] = r.layer1.verdict
    if not r.passed_layer1:
        row["error"] = f"layer 1 {r.layer1.verdict} at {r.layer1.stage}: " + "; ".join(
            e.message for e in r.layer1.errors[:2])
    elif r.layer2 is not None:
        row.update(result=r.layer2, wall_s=job.elapsed_s)
    return row


@register("bench_policies_report", timeout_s=600, max_attempts=2, local=True, request=ReportRequest)
def _policies_report(ctx: JobContext) -> dict[str, Any]:
    i: ReportRequest = ctx.request
    kids = _siblings(ctx)
    runs = [kids[f"validate:{n}"] for n in i.names]
    rows = [_policy_row(n, j) for n, j in zip(i.names, runs)]
    ran = [j for j in runs if j.state == "succeeded" and not j.cached_from]
    cold_s = ran[0].elapsed_s if ran else None  # verify + validate, own VM boots: one `schedcp validate`
    con = _recorder(i.width)
    bench.report_policies(rows, i.rounds, Path(i.out_dir or "results"), con, i.validation_budget_s, cold_s,
                          time.time() - queue.get(ctx.job.parent).created_at)
    cached = [n for n, j in zip(i.names, runs) if j.cached_from]
    if cached:
        con.print(f"[dim]answered from the cache (identical validations ran before): {', '.join(cached)}; "
                  "--no-cache runs them again[/dim]")
    return {"printed": con.export_text(styles=True), "out_dir": i.out_dir, "cached": cached,
            "rows": [{"policy": r["policy"], "report_id": j.brief.report_id,
                      "passed": r["result"].passed if r.get("result") else None, "error": r.get("error")}
                     for r, j in zip(rows, runs)]}


# --- stability: N validations in fresh boots, then the report ------------------------------------

def stability_campaign(policy: str, runs: int = 3, rounds: int = 3, validation_budget_s: float | None = None,
                       out_dir: Path | None = None, *, width: int = 100, lane: str = "high",
                       actor: str = "api", complete_by_s: float | None = None) -> Job:
    """Queue `bench stability`: `runs` validations of the policy, each its own job, report and VM
    boot (none answered from the cache, none shared; layer 1 comes from the verifier's cache after
    the first), then the report that counts flips."""
    if runs < 2:
        raise BadInput(f"runs={runs}: at least 2 validations are needed to see a flip")
    nodes = [Node(name=f"run{k}", kind="validate", lane=lane,
                  inputs=_validation(policy, rounds=rounds, budget_s=validation_budget_s)) for k in range(1, runs + 1)]
    nodes.append(Node(name="report", kind="bench_stability_report", lane=lane, join=True,
                      after=[n.name for n in nodes], inputs=ReportRequest(
                          policy=policy, runs=runs, rounds=rounds, validation_budget_s=validation_budget_s,
                          out_dir=str(Path(out_dir).resolve()) if out_dir else None, width=width
                      ).model_dump(mode="json")))
    return submit_campaign(f"bench stability {policy} ({runs} boots)", nodes, lane=lane, use_cache=False,
                           actor=actor, complete_by_s=complete_by_s)


@register("bench_stability_report", timeout_s=600, max_attempts=2, local=True, request=ReportRequest)
def _stability_report(ctx: JobContext) -> dict[str, Any]:
    i: ReportRequest = ctx.request
    kids = _siblings(ctx)
    measured = []
    for k in range(1, i.runs + 1):
        j = kids[f"run{k}"]
        if j.state != "succeeded":
            raise InfrastructureError(f"run {k} of {i.policy} did not finish ({j.state}): {j.error}",
                                      f"`schedcp jobs show {j.id}` lists its attempts")
        r = get_report(_report_id(j))
        if not r.passed_layer1:
            raise BadInput(f"{i.policy} did not pass layer 1 ({r.layer1.verdict} at {r.layer1.stage})")
        measured.append(r.layer2)
    con = _recorder(i.width)
    out = bench.bench_stability(i.policy or "", measured, rounds=i.rounds, budget_s=i.validation_budget_s,
                                out_dir=Path(i.out_dir) if i.out_dir else None, console=con)
    return {**out, "printed": con.export_text(styles=True)}


# --- peers: the repository's best policy against the kernel's example scheduler programs ---------

#: the repository policy `bench peers` puts against the peers (README Results: the best on the guard set)
BEST_POLICY = "lean_preempt"


def peers_campaign(peer_names: list[str] | None = None, programs: list[tuple[str, list[str]]] | None = None,
                   policies: list[str] | None = None, rounds: int = 3, validation_budget_s: float | None = None,
                   workloads: list[str] | None = None, out_dir: Path = Path("results"), *,
                   use_cache: bool = True, width: int = 100, lane: str = "high", actor: str = "api",
                   complete_by_s: float | None = None) -> Job:
    """Queue `bench peers`: the repository's best policy (or `policies`) and every built peer program
    (the kernel's examples, `schedcp peers build`; or `peer_names`), plus any `programs` given as
    (path, args), each through the same validation — a program as layer 1 (it attaches) then the same
    A/B and gates — then one table (and chart) into `out_dir` (peers-ab.*)."""
    from ..sandbox import peers

    pols = policies or [BEST_POLICY]
    for p in pols:
        get_policy(p)
    cands: list[tuple[str, str, list[str]]] = []  # (row name, stored program sha, args)
    for p in peers.built_peers(peer_names):
        sha, name, args = candidates.store_program(p.path, [])
        cands.append((name, sha, args))
    for path, args in programs or []:
        sha, name, args = candidates.store_program(path, args)
        cands.append((" ".join([name, *args]), sha, args))
    if not cands:
        raise BadInput("no peer program was built", "`schedcp peers build` says which did not build and why")
    common = dict(workloads=workloads, rounds=rounds, budget_s=validation_budget_s, use_cache=use_cache)
    nodes = [Node(name=f"validate:{p}", kind="validate", lane=lane,
                  inputs=ValidateRequest(policy=p, **common).model_dump(mode="json")) for p in pols]
    for row, sha, args in cands:
        nodes.append(Node(name=f"verify:{row}", kind="verify_program", lane=lane, inputs=VerifyProgramRequest(
            program_sha=sha, args=args, name=row.split()[0]).model_dump(mode="json")))
        nodes.append(Node(name=f"validate:{row}", kind="validate", lane=lane, after=[f"verify:{row}"],
                          inputs=ValidateRequest(candidate=CandidateRef(program_sha=sha, args=args),
                                                 **common).model_dump(mode="json")))
    names = pols + [c[0] for c in cands]
    nodes.append(Node(name="report", kind="bench_peers_report", lane=lane, join=True,
                      after=[n.name for n in nodes], inputs=ReportRequest(
                          names=names, rounds=rounds, validation_budget_s=validation_budget_s,
                          out_dir=str(Path(out_dir).resolve()),
                          width=width).model_dump(mode="json")))
    return submit_campaign(f"bench peers ({len(names)})", nodes, lane=lane, use_cache=use_cache,
                           actor=actor, complete_by_s=complete_by_s)


@register("bench_peers_report", timeout_s=600, max_attempts=2, local=True, request=ReportRequest)
def _peers_report(ctx: JobContext) -> dict[str, Any]:
    i: ReportRequest = ctx.request
    kids = _siblings(ctx)
    rows = []
    for n in i.names:
        v = kids.get(f"verify:{n}")
        if v is not None and v.state != "succeeded":
            rows.append({"policy": n, "error": f"layer 1 job {v.state}: {v.error or ''}"[:300]})
            continue
        rows.append(_policy_row(n, kids[f"validate:{n}"]))
    con = _recorder(i.width)
    load = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    con.print(f"host load average at the report: {load} (a shared machine: read the intervals, not the medians)")
    bench.report_policies(rows, i.rounds, Path(i.out_dir or "results"), con, i.validation_budget_s, None,
                          time.time() - queue.get(ctx.job.parent).created_at, stem="peers-ab",
                          title="The repository's best policy and the kernel's example scheduler programs")
    return {"printed": con.export_text(styles=True), "out_dir": i.out_dir, "load_average": load,
            "rows": [{"policy": r["policy"], "passed": r["result"].passed if r.get("result") else None,
                      "error": r.get("error"),
                      "workloads": [bench._w(w) for w in r["result"].workloads] if r.get("result") else []}
                     for r in rows]}
