"""Tune a policy's (or a generated candidate's) knobs in the sandbox within a budget.

Method: **successive halving** over a small candidate set. The set is the defaults, the best
parameters of earlier tunings of the same policy (warm start), and one- and two-knob moves around the
defaults (numeric knobs x1/4, x1/2, x2, x4 clipped to their range; booleans flipped), or the values
the caller lists in `space`. Rung 0 gives every configuration one or two paired rounds (the
default scheduler, then the configuration, back to back in the same boot); each later rung keeps the
better half — by the mean log speedup over the chosen workloads — and doubles its rounds, pooling
them with the earlier ones. The defaults are never dropped, so the last rungs measure the winner and
the defaults side by side until the budget is spent.

Why this and not Bayesian optimisation or a bandit: a trial costs ~10 s under TCG and its noise is
±10-30 %, so a budget buys tens of rounds, not hundreds; a surrogate model cannot be fitted on that
little, noisy data, while halving spends most rounds on the few configurations still in contention —
exactly where more pairs tighten the intervals — and is simple to reason about and to reproduce.

Verdicts come from the layer-2 intervals (`validate.gates.summarize`: paired log ratios, t-interval);
`compare` turns two configurations' per-round speedups into an interval on winner/defaults. The
search itself only sees one number per configuration (`_objective`), so a change in how layer 2
judges does not touch it.

One VM boot serves every trial: layer 1 (verify, cached by source + parameters) and layer 2 (each
validation marks its own part of the kernel log and restores the default scheduler) both run in it;
a configuration that kills the VM gets a fresh one. Every trial is a candidate (`kind="tuned"`) with
a report holding its pooled layer-2 result and a learning-history outcome; the run is stored as a
`tune` record so a later tuning starts from its best.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from typing import Any, Callable

from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput
from ..models import Goal
from ..repository.policies import Parameter, get_policy
from ..repository.provenance import get_candidate
from .provenance import Provenance, candidate_source, submit

KIND = "tune"
Progress = Callable[[str, float], None]
FACTORS = (0.25, 0.5, 2.0, 4.0)
STRESS_S = 4.0  # correctness stress per trial (a full validation stresses 6 s; 2 s starved stress-ng's
               # sleep stressor of bogo ops under a loaded host: a false failure)
LEVEL = 0.95


class Trial(BaseModel):
    candidate_id: str
    report_id: str
    params: dict[str, str]
    label: str = Field(description="what changed from the defaults")
    rounds: int = 0
    log_speedups: list[float] = Field([], description="per paired round: mean over the workloads of "
                                      "log(speedup vs the default scheduler); > 0 = faster")
    speedup: float | None = Field(None, description="geometric-mean speedup vs the default scheduler")
    speedup_low: float | None = None
    speedup_high: float | None = None
    passed: bool | None = Field(None, description="layer 2 gates on the pooled rounds")
    failure_reason: str | None = None
    broken: bool = Field(False, description="failed layer 1 or a correctness gate: out of the search "
                         "(an undecided performance gate is not: the search ranks by the objective)")
    eliminated_at_rung: int | None = None


class TuneResult(BaseModel):
    id: str
    created_at: float = Field(default_factory=time.time)
    target: str = Field(description="the policy (or cand-…) tuned")
    method: str = "successive halving (eta=2) over defaults + warm start + one/two-knob moves"
    workloads: list[str]
    goals: list[Goal] = []
    budget_rounds: int
    budget_s: float | None
    rounds_used: int = 0
    rungs: int = 0
    best_params: dict[str, str] = {}
    best_candidate_id: str | None = None
    best_report_id: str | None = None
    defaults: dict[str, str] = {}
    vs_defaults: float | None = Field(None, description="best/defaults speedup (> 1: best is faster)")
    vs_defaults_low: float | None = None
    vs_defaults_high: float | None = None
    verdict: str = Field("", description="better / same (at least as good within the interval) / "
                         "defaults (the defaults won)")
    trials: list[Trial] = []
    seconds: float = 0.0


# ---------------------------------------------------------------- the candidate set

def _moves(knobs: list[Parameter], space: dict[str, list[Any]] | None) -> list[dict[str, int]]:
    """Single-knob changes first (each is interpretable), then pairs of them."""
    tunable = [k for k in knobs if not k.sizes_map]
    single: list[dict[str, int]] = []
    for k in tunable:
        if space is not None:
            values = [k.check(v) for v in space.get(k.name, [])]
        elif k.type == "bool":
            values = [int(not k.default)]
        else:
            lo = k.min if k.min is not None else 0
            hi = k.max if k.max is not None else 2**32
            base = int(k.default) or max(1, lo)
            values = sorted({min(hi, max(lo, int(base * f))) for f in FACTORS} - {int(k.default)})
        single += [{k.name: v} for v in values if v != int(k.default)]
    if space is not None:
        unknown = sorted(set(space) - {k.name for k in tunable})
        if unknown:
            raise BadInput(f"space names unknown or untunable parameters: {', '.join(unknown)}",
                           "tunable: " + ", ".join(k.name for k in tunable))
    pairs = [a | b for a, b in itertools.combinations(single, 2) if not set(a) & set(b)]
    return single + pairs


def candidate_set(knobs: list[Parameter], n: int, space: dict[str, list[Any]] | None = None,
                  warm: list[dict[str, str]] = (), seed: int = 0) -> list[dict[str, int]]:
    """`n` configurations: the defaults first, then warm starts, then a seeded sample of moves that
    covers every knob before repeating one."""
    defaults = {k.name: int(k.default) for k in knobs if not k.sizes_map}
    out = [defaults]
    for w in warm:
        c = defaults | {k: int(v) for k, v in w.items() if k in defaults}
        if c not in out:
            out.append(c)
    moves = _moves(knobs, space)
    rng = random.Random(seed)
    singles = [m for m in moves if len(m) == 1]
    rng.shuffle(singles)
    singles.sort(key=lambda m: next(iter(m)))  # grouped per knob, shuffled within (stable sort)
    by_knob: dict[str, list[dict[str, int]]] = {}
    for m in singles:
        by_knob.setdefault(next(iter(m)), []).append(m)
    round_robin = [m for batch in itertools.zip_longest(*by_knob.values()) for m in batch if m]
    rest = [m for m in moves if len(m) > 1]
    rng.shuffle(rest)
    for m in round_robin + rest:
        if len(out) >= n:
            break
        c = defaults | m
        if c not in out:
            out.append(c)
    return out[:n]


def _label(params: dict[str, int], defaults: dict[str, int]) -> str:
    changed = {k: v for k, v in params.items() if defaults.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"


# ---------------------------------------------------------------- measuring

def _objective(layer2) -> list[float]:
    """Per paired round: mean over the workloads of log(speedup). Empty when nothing was measured."""
    per_round: list[list[float]] = []
    for w in layer2.workloads:
        for i, (b, c) in enumerate(zip(w.baseline, w.candidate)):
            if b > 0 and c > 0:
                s = math.log(b / c) if w.direction == "lower" else math.log(c / b)
                while len(per_round) <= i:
                    per_round.append([])
                per_round[i].append(s)
    n = len(layer2.workloads)
    return [statistics.fmean(r) for r in per_round if len(r) == n]


def _t(df: int) -> float:
    from ..validate.tquantile import t_quantile

    return t_quantile((1 + LEVEL) / 2, df)


def _interval(xs: list[float]) -> tuple[float, float, float] | None:
    if not xs:
        return None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return math.exp(m), 0.0, math.inf
    half = _t(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def compare(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Speedup of `a` over `b` from their per-round log speedups (each round normalised by its own
    baseline run), with a Welch t-interval. None when either has fewer than 2 rounds."""
    if len(a) < 2 or len(b) < 2:
        return None
    d = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return math.exp(d), math.exp(d), math.exp(d)
    df = (va + vb) ** 2 / ((va ** 2) / (len(a) - 1) + (vb ** 2) / (len(b) - 1))
    half = _t(max(1, int(df))) * se
    return math.exp(d), math.exp(d - half), math.exp(d + half)


def _pool(results: list, goals: list[Goal], workloads):
    """One Layer2Result from several runs of the same configuration: pairs pooled, gates recomputed."""
    from ..validate import gates

    last = results[-1]
    by_name: dict[str, tuple[list[float], list[float], list[str]]] = {}
    for res in results:
        for w in res.workloads:
            b, c, e = by_name.setdefault(w.name, ([], [], []))
            n = min(len(w.baseline), len(w.candidate))
            b += w.baseline[:n]
            c += w.candidate[:n]
            e += w.errors
    pooled = [gates.summarize(wl, *by_name.get(wl.name, ([], [], []))[:2],
                              errors=by_name.get(wl.name, ([], [], []))[2]) for wl in workloads]
    bad = next((res for res in results if not all(g.passed for g in res.correctness)), None)
    correctness = (bad or last).correctness
    perf = gates.performance_gates(pooled, workloads, goals) if bad is None else []
    passed, why = gates.verdict(correctness, perf)
    return last.model_copy(update={"workloads": pooled, "correctness": correctness, "performance": perf,
                                   "passed": passed, "failure_reason": why,
                                   "rounds": sum(r.rounds for r in results),
                                   "warnings": gates.noise_warnings(pooled)})


# ---------------------------------------------------------------- the search

def _target(name: str):
    """(knobs, submit keyword for the source) of a policy name or a candidate id."""
    if name.startswith("cand-"):
        c = get_candidate(name)
        if not c.knobs:
            raise BadInput(f"candidate {name} has no declared knobs to tune", "tune a policy or a "
                           "generated candidate")
        return c.knobs, {"source": candidate_source(c)}, c.provenance.parent_policy
    p = get_policy(name)
    if p.kind != "schedcp" or not p.parameters:
        raise BadInput(f"policy {name} has no parameters to tune" if p.kind == "schedcp" else
                       f"{name} is a catalogued scx scheduler", "tune a schedcp policy with parameters")
    return p.parameters, {"policy": name}, name


def previous_best(target: str, limit: int = 3) -> list[dict[str, str]]:
    """Best parameters of earlier tunings of `target` (newest first): the warm start."""
    return [t.best_params for t in store.list_records(KIND, TuneResult, ref=target, limit=limit)
            if t.best_params]


def tune(name: str, workloads: list[str] | None = None, goals: list[Goal] | None = None,
         budget_rounds: int = 12, budget_s: float | None = None, configs: int = 4,
         space: dict[str, list[Any]] | None = None, seed: int = 0, vm=None,
         progress: Progress | None = None, actor: str = "api") -> TuneResult:
    """Search `name`'s parameters (a policy, or a generated candidate cand-…) on the sandbox
    `workloads` (default hackbench) within `budget_rounds` paired rounds and `budget_s` seconds."""
    from ..candidates import check_goals_measurable
    from ..learn.feedback import record_validation_outcome
    from ..reports import get_report, save
    from ..sandbox.vm import VM
    from ..validate.runner import validate_in_sandbox
    from ..workloads import get_workloads

    say = progress or (lambda msg, frac: None)
    if not 2 <= configs <= 16:
        raise BadInput(f"configs={configs}: tune between 2 and 16 configurations", "default 4")
    if not 2 <= budget_rounds <= 200:
        raise BadInput(f"budget of {budget_rounds} rounds: give 2..200", "each round is one paired "
                       "baseline/candidate run of every workload (a few seconds under TCG)")
    if budget_s is not None and budget_s <= 0:
        raise BadInput("budget_s must be positive", "or leave it unset for a rounds-only budget")
    wls = get_workloads(workloads or ["hackbench"])
    goals = goals or []
    check_goals_measurable(goals, wls)
    knobs, how, parent = _target(name)
    defaults = {k.name: int(k.default) for k in knobs if not k.sizes_map}
    configs_ = candidate_set(knobs, configs, space, previous_best(name), seed)
    result = TuneResult(id=store.new_id("tune"), target=name, workloads=[w.name for w in wls], goals=goals,
                        budget_rounds=budget_rounds, budget_s=budget_s,
                        defaults={k: str(v) for k, v in defaults.items()})
    t0 = time.monotonic()
    out_of_time = lambda: budget_s is not None and time.monotonic() - t0 > budget_s  # noqa: E731
    own_vm = vm is None
    trials: list[Trial] = []
    runs: dict[int, list] = {}
    try:
        if own_vm:
            say("booting the sandbox VM", 0.0)
            vm = VM(full=True).start()
        # layer 1 for every configuration (same source: only the load differs; cached by params)
        for i, params in enumerate(configs_):
            say(f"layer 1: {_label(params, defaults)}", 0.05 * i / len(configs_))
            prov = Provenance(kind="tuned", parent_policy=parent,
                              parent_candidate=name if name.startswith("cand-") else None,
                              params={k: str(v) for k, v in params.items()}, tune_id=result.id)
            res = submit(prov, knobs=knobs, include_source=False, vm=vm, actor=actor, **how)
            t = Trial(candidate_id=res.candidate_id, report_id=res.report_id, params=prov.params,
                      label=_label(params, defaults))
            if res.verdict != "accepted":
                t.passed, t.broken, t.eliminated_at_rung = False, True, 0
                t.failure_reason = f"layer 1: {res.status}"
            trials.append(t)
        alive = [i for i, t in enumerate(trials) if not t.broken]
        # two rounds a configuration in rung 0 when the budget allows a second rung at four: one
        # round under TCG (+-50 % alone) eliminates on noise
        rounds, rung = (2 if budget_rounds >= 4 * len(alive) else 1), 0
        while alive and not out_of_time():
            left = budget_rounds - result.rounds_used
            r = min(rounds, left // len(alive))
            if r < 1:
                break
            for n, i in enumerate(alive):
                t = trials[i]
                say(f"rung {rung}: {t.label} ({r} round{'s' * (r > 1)})",
                    0.05 + 0.95 * result.rounds_used / budget_rounds)
                if not vm.alive:
                    vm = VM(full=True).start()
                    own_vm = True
                rep = get_report(t.report_id)
                l2 = validate_in_sandbox(open(rep.object_path, "rb").read(), ops_name=rep.ops_name or "",
                                         params=rep.params, goals=goals, workloads=wls, rounds=r,
                                         budget_s=0, stress_s=STRESS_S, vm=vm)
                runs.setdefault(i, []).append(l2)
                t.rounds += l2.rounds
                t.log_speedups += _objective(l2)
                result.rounds_used += r
                if not all(g.passed for g in l2.correctness):
                    t.passed, t.broken, t.eliminated_at_rung = False, True, rung
                    t.failure_reason = l2.failure_reason
            result.rungs = rung + 1
            alive = [i for i in alive if not trials[i].broken]
            if len(alive) <= 1:
                break
            # winner and defaults left: the rest of the budget goes to their comparison
            ranked = sorted(alive, key=lambda i: -statistics.fmean(trials[i].log_speedups or [-9.0]))
            keep = ranked[:max(1, math.ceil(len(ranked) / 2))]
            if 0 in alive and 0 not in keep:
                keep.append(0)  # the defaults are the reference: never dropped
            for i in alive:
                if i not in keep:
                    trials[i].eliminated_at_rung = rung
            if len(keep) <= 1:
                break  # the defaults beat every challenger: nothing left to compare
            alive, rounds, rung = keep, rounds * 2, rung + 1
    finally:
        if own_vm and vm is not None:
            vm.close()

    # every trial: pooled layer-2 result into its report, an outcome into the learning history
    for i, t in enumerate(trials):
        if i in runs:
            rep = get_report(t.report_id)
            rep.goals = goals
            rep.layer2 = _pool(runs[i], goals, wls)
            save(rep)
            record_validation_outcome(rep.id)
            if not t.broken:
                t.passed, t.failure_reason = rep.layer2.passed, rep.layer2.failure_reason
        iv = _interval(t.log_speedups)
        if iv:
            t.speedup, t.speedup_low, t.speedup_high = (round(x, 4) if math.isfinite(x) else x for x in iv)
    measured = [i for i, t in enumerate(trials) if t.log_speedups and not t.broken]
    finalists = [i for i in measured if trials[i].eliminated_at_rung is None] or measured
    if finalists:
        best = max(finalists, key=lambda i: statistics.fmean(trials[i].log_speedups))
        b = trials[best]
        result.best_params, result.best_candidate_id, result.best_report_id = \
            b.params, b.candidate_id, b.report_id
        if best == 0:
            result.verdict = "defaults"
        else:
            cmp = compare(b.log_speedups, trials[0].log_speedups) if trials[0].log_speedups else None
            if cmp:
                result.vs_defaults, result.vs_defaults_low, result.vs_defaults_high = \
                    (round(x, 4) for x in cmp)
                result.verdict = "better" if cmp[1] > 1.0 else "same"
            else:
                result.verdict = "same"
    result.trials = trials
    result.seconds = round(time.monotonic() - t0, 1)
    store.put(KIND, result, ref=name)
    store.audit(actor, "tune_policy", {"tune_id": result.id, "target": name,
                                       "best": result.best_params, "verdict": result.verdict})
    say(f"best: {_label({k: int(v) for k, v in result.best_params.items()}, defaults)} "
        f"({result.verdict})", 1.0)
    return result


# --- as a supervised job (schedcp_mcp.jobs): the CLI and MCP tool submit it and wait ----------------

from ..jobs import queue as _jobs  # noqa: E402
from ..operations import TuneRequest  # noqa: E402
from ..jobs.kinds import JobContext as _Ctx, register as _register  # noqa: E402


@_register("tune", timeout_s=7200, max_attempts=2, sandbox=True, request=TuneRequest)
def _tune_job(ctx: _Ctx) -> TuneResult:
    r: TuneRequest = ctx.request
    return tune(r.name, r.workloads, r.goals or None, r.budget_rounds, r.budget_s, r.configs, r.space, r.seed,
                progress=ctx.progress, actor=r.actor)


def tune_job(request: TuneRequest | None = None, *, lane: str = "high", complete_by_s: float | None = None,
             **fields: Any):
    """Queue a tuning run, the request or its fields as keywords (checked first: a bad request is
    refused before it waits in the queue)."""
    from ..workloads import get_workloads

    req = request or TuneRequest(**fields)
    if not 2 <= req.configs <= 16 or not 2 <= req.budget_rounds <= 200:
        raise BadInput(f"configs={req.configs}, budget_rounds={req.budget_rounds}: give 2..16 and 2..200")
    get_workloads(req.workloads or ["hackbench"])
    _target(req.name)
    return _jobs.submit("tune", req, lane=lane, actor=req.actor, complete_by_s=complete_by_s)


def tune_result(job) -> TuneResult:
    _jobs.result_or_raise(job)
    return job.result_as(TuneResult)
