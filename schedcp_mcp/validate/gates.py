"""Pass/fail for layer 2: correctness gates from what the guest showed, performance gates from goals.

Correctness (any failure fails the run): the VM answered, the candidate attached with the expected ops,
no runnable-task stall, no scheduler error exit, the scheduler stayed enabled while measured,
nr_rejected stayed 0, every stressor made progress, every workload ran, and the default scheduler came
back after unloading.

A workload's verdict comes from paired rounds: round i ran the workload under the default scheduler
and then under the candidate, back to back in the same boot. The per-round log ratios
log(candidate/baseline) get a Student t-interval (LEVEL) on their mean; exp() of it is the interval on
the candidate/baseline ratio (the geometric mean of the per-round ratios). Why t on paired log ratios:
pairing cancels the drift a shared host adds to both halves of a round, logs make "2x better" and "2x
worse" symmetric and turn the ratio into a mean, and with the 3-15 pairs a ~90 s budget allows the
t-interval keeps its coverage where a bootstrap over pairs comes out too narrow (it cannot see beyond
the few pairs it resamples). Expressed as a speedup (> 1 = candidate better, whatever the metric's
direction), the interval [low, high] gives the verdict (`classify`), symmetric around the margin:
better (low > 1+MARGIN: a gain beyond it), worse (high < 1/(1+MARGIN): harm beyond it), same (low >=
1/(1+MARGIN): no harm beyond the margin, no gain beyond it shown) or undecided. Why the margin on both
sides: a gain of a few per cent is below what this sandbox can vouch for (A/A runs put the default
scheduler 5-8 % off itself on hackbench in one run of three), and with "better" at low > 1 such gains
flipped between better and same from boot to boot (pipe 1.06x [1.00, 1.11], cpu 1.01x [1.00, 1.03]).

Performance gates compare the interval with a threshold on the speedup: pass when the whole interval
is at or above it, fail when it is all below, **undecided otherwise, which fails** (the candidate was
not shown to do no harm) and is what the runner's adaptive rounds try to settle within its budget.
Without goals, no workload may be worse than 1/(1+MARGIN) (equal schedulers pass once the interval is
narrower than the margin). Each goal (e.g. `p99_wakeup_latency_us lower 0.9`) is checked on every
workload that stands for its metric (`Workload.goal_metrics`): an improvement goal (0.9 = speedup
1.11) must be met by the interval's low end; a "do no harm" goal (target 1.0 or None) gets the margin.
With goals, a workload the goals do not cover may still not regress by more than SEVERE_REGRESSION,
and a guard workload (GUARD_RESULTS: wakeup and its tail, pipe, cpu) not by more than the margin.
"""

from __future__ import annotations

import math
import re
import statistics

from ..models import Goal, LoaderExit, MetricResult
from ..sandbox import scheduler
from . import starvation
from .tquantile import t_quantile
from .models import Gate, Observations, Spread, Workload, WorkloadResult

#: confidence level of the ratio intervals
LEVEL = 0.95
#: equivalence margin: within 1/(1+MARGIN) of the baseline is "no harm" (the A/A target is ±MARGIN)
MARGIN = 0.10
#: with goals, any workload worse than this factor (beyond noise) fails anyway
SEVERE_REGRESSION = 1.5
#: the guard set: a scheduler runs every task of the machine, so whatever it is validated for, these
#: may not get worse beyond the margin (an interactive task's wakeup wait and its tail, a pipe
#: hand-off, CPU-bound throughput) — with goals too, where an uncovered workload otherwise only may
#: not regress severely. `schedcp optimize` always measures them (workloads.GUARDS).
GUARD_RESULTS = ("wakeup", "wakeup_tail", "pipe", "cpu")
#: the names of performance gates begin with these (performance_gates); a failure whose gate name does
#: not is a correctness failure
PERFORMANCE_GATES = ("goal:", "guard:", "no_regression:", "no_severe_regression:")
#: an interval wider than ±NOISY makes a "same" or "better" weak evidence: the result warns
NOISY = 0.25
#: kernel log lines that mean the kernel itself is unhappy, whichever scheduler caused it
KERNEL_TROUBLE_RE = re.compile(r"BUG:|Oops:|WARNING: CPU|hung_task|soft lockup|rcu: INFO: rcu_\w+ self-detected stall|"
                               r"rcu: INFO: rcu_\w+ detected stalls")


# ---------------------------------------------------------------- statistics

def spread(samples: list[float]) -> Spread | None:
    if not samples:
        return None
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return Spread(median=med, min=lo, max=hi, rel_spread=(hi - lo) / med if med else 0.0)


def log_ratios(baseline: list[float], candidate: list[float]) -> list[float]:
    """log(candidate/baseline) of each paired round with both figures positive."""
    return [math.log(c / b) for b, c in zip(baseline, candidate) if b > 0 and c > 0]


def ratio_interval(baseline: list[float], candidate: list[float],
                   level: float = LEVEL) -> tuple[float, float, float] | None:
    """(ratio, low, high): candidate/baseline as the geometric mean of the per-round ratios, and its
    `level` t-interval. Round i's baseline and candidate ran back to back in the same boot, so each
    pair's log ratio cancels the drift both sides shared; the t-interval on their mean is honest with
    the few pairs a budget allows (a bootstrap needs more pairs than that to cover its nominal level).
    None without a positive pair; the interval is infinite with one pair."""
    d = log_ratios(baseline, candidate)
    if not d:
        return None
    m = statistics.fmean(d)
    if len(d) < 2:
        return math.exp(m), 0.0, math.inf
    half = _t_quantile((1 + level) / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def _t_quantile(p: float, df: int) -> float:
    return t_quantile(p, df)


def classify(low: float, high: float, margin: float = MARGIN) -> str:
    """better / same / worse / undecided from a speedup interval (> 1 = candidate better): better when
    the whole interval is above 1+margin (a gain beyond the margin), worse when it is all below
    1/(1+margin) (harm beyond the margin), same when its low end is within the margin (no harm beyond
    it, no gain beyond it shown), else undecided."""
    if low > 1.0 + margin:
        return "better"
    if high < 1.0 / (1.0 + margin):
        return "worse"
    if low >= 1.0 / (1.0 + margin):
        return "same"
    return "undecided"


def settled(r: WorkloadResult, margin: float = MARGIN) -> bool:
    """Whether more rounds could still change this workload's verdict class or leave it weak evidence:
    undecided never is; an interval wider than ±NOISY is not (in stability runs hackbench came out
    1.51x [1.00, 2.29], a hair from another class); and a "same" whose interval still reaches beyond
    +margin cannot yet tell "no change" from "a gain beyond the margin", so it is settled only once the
    interval lies within ±margin."""
    if r.verdict == "undecided" or (r.noise is not None and r.noise > NOISY):
        return False
    if r.verdict == "same":
        return r.speedup_high is not None and r.speedup_high <= 1.0 + margin
    return True


def summarize(w: Workload, baseline: list[float], candidate: list[float], errors: list[str] | None = None,
              secondary: dict[str, tuple[list[float], list[float]]] | None = None) -> WorkloadResult:
    """Paired rounds → ratio, confidence interval and verdict for one workload. `baseline[i]` and
    `candidate[i]` are round i's figures (pairs); medians and spreads are for reading only."""
    r = WorkloadResult(name=w.name, metric=w.metric, unit=w.unit, direction=w.direction,
                       baseline=baseline, candidate=candidate, errors=list(errors or []))
    r.baseline_stats, r.candidate_stats = spread(baseline), spread(candidate)
    for name, (b, c) in (secondary or {}).items():
        if b and c and statistics.median(b) > 0:
            mb, mc = statistics.median(b), statistics.median(c)
            direction = "higher" if name.endswith(("_per_s", "loops")) else "lower"
            r.secondary.append(MetricResult(metric=name, direction=direction, baseline=mb, candidate=mc,
                                            ratio=mc / mb))
    iv = ratio_interval(baseline, candidate)
    if r.errors or iv is None:
        r.verdict = "failed"
        return r
    r.pairs = min(len(baseline), len(candidate))
    r.ratio, r.ratio_low, r.ratio_high = iv
    lower = w.direction == "lower"
    r.speedup = 1 / r.ratio if lower else r.ratio
    r.speedup_low = (1 / r.ratio_high if r.ratio_high > 0 else math.inf) if lower else r.ratio_low
    r.speedup_high = (1 / r.ratio_low if r.ratio_low > 0 else math.inf) if lower else r.ratio_high
    r.improvement = r.speedup - 1
    r.noise = math.sqrt(r.ratio_high / r.ratio_low) - 1 if r.ratio_low > 0 and math.isfinite(r.ratio_high) \
        else math.inf
    r.verdict = classify(r.speedup_low, r.speedup_high)
    return r


# ---------------------------------------------------------------- correctness

def _uei_text(e: LoaderExit) -> str:
    return scheduler.exit_of(e).describe()


def correctness_gates(obs: Observations) -> list[Gate]:
    g: list[Gate] = []
    add = lambda name, ok, reason: g.append(Gate(name=name, passed=ok, reason=reason))  # noqa: E731

    add("vm_responsive", obs.hang is None,
        "the VM answered every step in time" if obs.hang is None else
        f"{obs.hang}; a scheduler that starves the guest's agent looks like this — check the stall and "
        "kernel log gates, or raise the step timeout if the machine is just slow")

    # stall: the kernel's own words first, then the loader's UEI
    stall_lines = [ln.strip() for ln in obs.kernel_log if "runnable task stall" in ln or "failed to run for" in ln]
    stall_exits = [e for e in obs.loader_exits if scheduler.is_stall(e.uei)]
    if stall_lines or stall_exits:
        why = " / ".join(stall_lines[:2]) if stall_lines else _uei_text(stall_exits[0])
        detail = f" ({_uei_text(stall_exits[0])})" if stall_lines and stall_exits else ""
        add("no_stall", False, f"the kernel's watchdog disabled the scheduler: {why}{detail}. A runnable "
            "task was not dispatched within timeout_ms: check that every enqueued task reaches a DSQ "
            "that dispatch() consumes (or SCX_DSQ_LOCAL/GLOBAL)")
    else:
        add("no_stall", True, "no runnable task stall")

    err_exits = [e for e in obs.loader_exits if scheduler.is_error(e.uei) and not scheduler.is_stall(e.uei)]
    err_lines = [ln for why, ln in scheduler.disabled_lines(obs.kernel_log)
                 if why not in scheduler.CLEAN_REASONS and scheduler.STALL_REASON not in why]
    if err_exits:
        add("no_error_exit", False, f"the scheduler exited with an error: {_uei_text(err_exits[0])}"
            + (f"; kernel: {err_lines[0].strip()}" if err_lines else ""))
    elif err_lines:
        add("no_error_exit", False, f"the kernel disabled the scheduler: {err_lines[0].strip()}")
    else:
        add("no_error_exit", True, "no error exit")

    # attached with the expected ops
    bad = [ld for ld in obs.loads if ld.error or ld.state != "enabled" or ld.ops != obs.ops_name]
    if not obs.loads:
        add("attached", False, "the candidate was never loaded (the run stopped before the first load)")
    elif bad:
        ld = bad[0]
        add("attached", False, f"load {obs.loads.index(ld) + 1}: "
            + (ld.error or f"sched_ext state was {ld.state!r} with ops {ld.ops!r}, "
               f"expected 'enabled' with {obs.ops_name!r}"))
    else:
        add("attached", True, f"{len(obs.loads)} load(s): state enabled, root/ops = {obs.ops_name}")

    # stayed enabled whenever the candidate was supposed to be running
    off = [s for s in obs.timeline if s.phase.startswith(("candidate", "stress", "starve-candidate"))
           and (s.state != "enabled" or s.ops != obs.ops_name)]
    add("stayed_enabled", not off,
        "enabled at every sample while the candidate was measured" if not off else
        f"at t={off[0].t:.1f}s ({off[0].phase}) sched_ext state was {off[0].state!r}, ops {off[0].ops!r}: "
        "the scheduler was disabled while it should have been running (see the stall/error gates and "
        "the kernel log)")

    rej = [s for s in obs.timeline if s.phase.startswith(("candidate", "stress", "starve-candidate")) and (s.nr_rejected or 0) > 0]
    add("nr_rejected_zero", not rej,
        "nr_rejected stayed 0" if not rej else
        f"nr_rejected = {rej[0].nr_rejected} at t={rej[0].t:.1f}s ({rej[0].phase}): the kernel refused "
        "to let the scheduler handle some tasks (e.g. SCHED_EXT tasks with disallowed settings)")

    st = obs.stress
    if st is None:
        add("stressors_progressed", False, "the stress phase did not run (an earlier step failed)")
    else:
        idle = [k for k, v in st.stressors.items() if v <= 0]
        if st.stalled_workers:
            add("stressors_progressed", False, f"stress workers made no progress for a whole sampling period: "
                f"{', '.join(st.stalled_workers[:6])} — tasks starve under this scheduler")
        elif idle or not st.stressors:
            add("stressors_progressed", False, "stressors completed no work: "
                + (", ".join(idle) if idle else f"stress-ng printed no metrics (exit {st.rc})"))
        elif st.rc not in (0, None):
            add("stressors_progressed", False, f"stress-ng exited with {st.rc}")
        else:
            add("stressors_progressed", True, f"{len(st.stressors)} stressors all progressed; {st.workers} workers "
                f"followed over {st.samples} samples in {st.duration_s:.1f}s")

    g.append(starvation_gate(obs.starvation))

    trouble = [ln for ln in obs.kernel_log if KERNEL_TROUBLE_RE.search(ln)]
    add("kernel_healthy", not trouble, "no kernel BUG/WARNING/lockup lines" if not trouble else
        f"the kernel complained: {trouble[0].strip()} — see the kernel log excerpt")

    errs = [f"{k}: {v[0]}" for k, v in obs.workload_errors.items() if v]
    add("workloads_ran", not errs, "every workload run exited 0 with parsable output" if not errs else
        f"workload failures: {'; '.join(errs[:3])}")

    if obs.final_state is None:
        add("default_restored", False, "the final unload was not reached")
    else:
        ok = obs.final_state == "disabled"
        add("default_restored", ok, "after unloading, sched_ext state is disabled (default scheduler back)" if ok
            else f"after unloading, sched_ext state is {obs.final_state!r} (ops {obs.final_ops!r})")
    return g


def starvation_gate(sides: list[starvation.WaitSummary]) -> Gate:
    """No task starved (validate.starvation: a wait of STARVE_MS or more, again and again) under the
    candidate in the starvation phase, beyond what the default scheduler did in the same phase; the
    reason names the tasks that were."""
    by = {s.side: s for s in sides}
    base, cand = by.get("baseline"), by.get("candidate")
    name = "no_starvation"
    if cand is None:
        return Gate(name=name, passed=False, reason="the starvation phase did not run under the candidate "
                    "(an earlier step failed)")
    if cand.error:
        return Gate(name=name, passed=False, reason=f"the run-queue wait tracer gave no figures under the "
                    f"candidate: {cand.error}")
    n_base = len(base.starved) if base and not base.error else 0
    ref = (f"the default scheduler starved {n_base} and waited at most {base.max_ms:.0f} ms in the same phase"
           if base and not base.error else "no figures from the default scheduler")
    # and a task the share rule let through that waited far longer than anything under the default
    floor = starvation.foreground_max_ms(base) if base and not base.error else None
    victims = cand.starved + [t for t in cand.worst if t not in cand.starved and starvation.starved(t, floor)]
    if len(victims) > n_base:
        who = "; ".join(starvation.describe(t) for t in victims[:4])
        return Gate(name=name, passed=False, reason=f"tasks starved: {who} — {ref}. A queue that is always "
                    "served first (a CPU's local DSQ refilled by wakeups, a priority DSQ) or a vtime/deadline "
                    "that keeps some tasks behind needs a bound: aging, a cap on consecutive picks, or one "
                    "ordered queue")
    note = f"; {len(victims)} starved, as many as under the default scheduler (a busy host)" \
        if victims else ""
    return Gate(name=name, passed=True, reason=f"no task starved: longest run-queue wait {cand.max_ms:.0f} ms "
                f"under the candidate, {cand.tasks} tasks traced ({ref}){note}")


# ---------------------------------------------------------------- performance

def _fmt(w: WorkloadResult) -> str:
    return (f"{w.name}: {w.metric} {w.speedup:.3f}x as good as baseline, {LEVEL:.0%} interval "
            f"[{w.speedup_low:.3f}, {w.speedup_high:.3f}] over {w.pairs} paired rounds "
            f"(candidate/baseline {w.ratio:.3f}; medians {w.candidate_stats.median:.4g} vs "
            f"{w.baseline_stats.median:.4g} {w.unit})")


def _gate(name: str, r: WorkloadResult, threshold: float, what: str) -> Gate:
    """Pass when the whole speedup interval is at or above `threshold`; fail when it is all below;
    otherwise undecided, which fails too (not shown to do no harm), and says how to decide it."""
    if r.speedup is None:
        return Gate(name=name, passed=False, kind="performance", decided=True, workload=r.name,
                    reason=f"{r.name}: not measured ({'; '.join(r.errors) or 'no samples'})")
    lo, hi = r.speedup_low, r.speedup_high
    if lo >= threshold:
        return Gate(name=name, passed=True, kind="performance", threshold=threshold, workload=r.name,
                    reason=f"{what}: interval low end {lo:.3f} >= {threshold:.3f}; {_fmt(r)}")
    if hi < threshold:
        return Gate(name=name, passed=False, kind="performance", threshold=threshold, workload=r.name,
                    reason=f"{what}: interval high end {hi:.3f} < {threshold:.3f}; {_fmt(r)}")
    return Gate(name=name, passed=False, kind="performance", threshold=threshold, decided=False,
                workload=r.name, reason=f"{what}: undecided, the interval [{lo:.3f}, {hi:.3f}] straddles {threshold:.3f}; "
                f"{_fmt(r)} — give the validation more time (--budget) or a quieter machine")


def performance_gates(results: list[WorkloadResult], workloads: list[Workload],
                      goals: list[Goal] | None) -> list[Gate]:
    """Thresholds are on the speedup (> 1 = candidate better, whatever the metric's direction)."""
    by_name = {w.name: w for w in workloads}
    no_harm = 1.0 / (1.0 + MARGIN)
    if not goals:
        return [_gate(f"no_regression:{r.name}", r, no_harm, f"no worse than baseline by more than {MARGIN:.0%}")
                for r in results]

    def covers(goal: Goal, r: WorkloadResult) -> bool:
        w = by_name.get(r.name)
        return goal.metric == r.metric or (w is not None and goal.metric in w.goal_metrics)

    out: list[Gate] = []
    covered: set[str] = set()
    for goal in goals:
        matched = [r for r in results if covers(goal, r)]
        if not matched:
            out.append(Gate(name=f"goal:{goal.metric}", passed=False, kind="performance",
                            reason=f"goal {goal.metric} is not measured by any workload in this run; include "
                            "a workload for it (`schedcp workloads` / list_workloads)"))
            continue
        t = 1.0 if goal.target_ratio is None else goal.target_ratio
        # candidate/baseline bound in the goal's direction → a bound on the speedup
        need = t if goal.direction == "higher" else (1.0 / t if t > 0 else math.inf)
        if need <= 1.0:
            need = min(need, no_harm)  # "do no harm": equal schedulers must pass, so allow the margin
        for r in matched:
            covered.add(r.name)
            out.append(_gate(f"goal:{goal.metric}@{r.name}", r, need,
                             f"goal {goal.metric} {'<=' if goal.direction == 'lower' else '>='} {t:g}"))
    for r in results:
        if r.name in covered:
            continue
        if r.name in GUARD_RESULTS:  # measured, or failed to measure: either way judged
            out.append(_gate(f"guard:{r.name}", r, no_harm, f"guard workload (the rest of the machine): no "
                             f"worse than the default scheduler by more than {MARGIN:.0%}"))
        elif r.speedup is not None:
            out.append(_gate(f"no_severe_regression:{r.name}", r, 1.0 / SEVERE_REGRESSION,
                             f"not more than {SEVERE_REGRESSION}x worse on a workload the goals do not cover"))
    return out


def harmed_guards(gates_: list[Gate]) -> list[str]:
    """The guard workloads a validation's performance gates found harmed (or could not show unharmed)."""
    return [g.workload for g in gates_ if not g.passed and g.workload in GUARD_RESULTS
            and (g.name.startswith(("guard:", "no_regression:")) or g.threshold is not None and g.threshold < 1)]


def harmed_only_guards(correctness: list[Gate], performance: list[Gate]) -> list[str]:
    """The guard workloads harmed when those are a validation's only failures: every correctness gate
    passed, every failed performance gate is a guard's, and a gate on another workload (the target)
    passed. Such a scheduler may run scoped (partial mode: only the chosen tasks on it, the rest of
    the machine on the default scheduler), never system-wide. Empty otherwise."""
    if not performance or not all(g.passed for g in correctness):
        return []
    failed = [g for g in performance if not g.passed]
    if not failed or any(g.workload not in GUARD_RESULTS for g in failed):
        return []
    if not any(g.passed and g.workload not in GUARD_RESULTS for g in performance):
        return []
    return list(dict.fromkeys(g.workload for g in failed))


def undecided(gates_: list[Gate]) -> list[str]:
    """Names of the performance gates more rounds could still decide."""
    return [g.name for g in gates_ if not g.decided]


def noise_warnings(results: list[WorkloadResult]) -> list[str]:
    """Workloads whose interval is so wide that a pass there is weak evidence."""
    return [f"{r.name}: interval ±{r.noise:.0%} after {r.pairs} rounds, so a regression up to that size "
            f"would not show here; give it more --budget or a quieter machine before trusting this "
            f"{r.verdict!r}"
            for r in results if r.noise is not None and r.noise > NOISY and r.verdict in ("same", "better")]


def verdict(correctness: list[Gate], performance: list[Gate]) -> tuple[bool, str | None]:
    """(passed, the first failed gate's reason) — correctness failures come first."""
    for gate in [*correctness, *performance]:
        if not gate.passed:
            return False, f"{gate.name}: {gate.reason}"
    return True, None
