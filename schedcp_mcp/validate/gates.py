"""Pass/fail for layer 2: correctness gates from what the guest showed, performance gates from goals.

Correctness (any failure fails the run): the VM answered, the candidate attached with the expected ops,
no runnable-task stall, no scheduler error exit, the scheduler stayed enabled while measured,
nr_rejected stayed 0, every stressor made progress, every workload ran, and the default scheduler came
back after unloading.

A workload's verdict (better/same/worse) compares the medians against the run's noise, and also calls
it when the baseline's and candidate's ranges do not overlap at all (3+ runs a side).

Performance: each goal (e.g. `p99_wakeup_latency_us lower 0.9`) is checked on every workload that
stands for its metric (`Workload.goal_metrics`), in the goal's direction: a `throughput` goal (higher)
on a time-based workload compares baseline/candidate. A "do no harm" goal (target 1.0, or None) allows
the run's measured noise, otherwise equal schedulers would fail half the time; an improvement goal
(e.g. 0.9) must be met by the medians. Without goals, no workload may be worse than the baseline
beyond its noise. With goals, a workload the goals do not cover may still not regress by more than
SEVERE_REGRESSION (a scheduler that halves throughput elsewhere is not a success).
"""

from __future__ import annotations

import re
import statistics

from ..models import Goal, LoaderExit, MetricResult
from ..sandbox import scheduler
from .models import Gate, Observations, Spread, Workload, WorkloadResult

#: minimum relative noise assumed even when the samples agree closely (3 samples understate spread)
NOISE_FLOOR = 0.03
#: with goals, any workload worse than this factor (beyond noise) fails anyway
SEVERE_REGRESSION = 1.5
#: above this relative noise a "same" verdict says little: the result warns (it does not fail,
#: since on a 2-core TCG host ±30-100% is common and every run would fail)
NOISY = 0.5
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


def summarize(w: Workload, baseline: list[float], candidate: list[float], errors: list[str] | None = None,
              secondary: dict[str, tuple[list[float], list[float]]] | None = None) -> WorkloadResult:
    """Medians, ratio, noise and a better/same/worse verdict for one workload."""
    r = WorkloadResult(name=w.name, metric=w.metric, unit=w.unit, direction=w.direction,
                       baseline=baseline, candidate=candidate, errors=list(errors or []))
    r.baseline_stats, r.candidate_stats = spread(baseline), spread(candidate)
    for name, (b, c) in (secondary or {}).items():
        if b and c and statistics.median(b) > 0:
            mb, mc = statistics.median(b), statistics.median(c)
            direction = "higher" if name.endswith(("_per_s", "loops")) else "lower"
            r.secondary.append(MetricResult(metric=name, direction=direction, baseline=mb, candidate=mc,
                                            ratio=mc / mb))
    if r.errors or r.baseline_stats is None or r.candidate_stats is None or r.baseline_stats.median <= 0:
        r.verdict = "failed"
        return r
    r.ratio = r.candidate_stats.median / r.baseline_stats.median
    r.improvement = (1 - r.ratio) if w.direction == "lower" else (r.ratio - 1)
    r.noise = max(r.baseline_stats.rel_spread, r.candidate_stats.rel_spread, NOISE_FLOOR)
    # better/worse: the medians differ by more than the noise, or (with at least 3 runs a side) every
    # candidate run beat every baseline run or lost to it — a disjoint-ranges test, robust to the one
    # wild sample a shared TCG host produces, where the spread-based noise is too pessimistic
    disjoint = len(baseline) >= 3 and len(candidate) >= 3 and (max(candidate) < min(baseline)
                                                                  or min(candidate) > max(baseline))
    cand_lower = r.candidate_stats.median < r.baseline_stats.median
    if r.improvement > r.noise or (disjoint and cand_lower == (w.direction == "lower")):
        r.verdict = "better"
    elif r.improvement < -r.noise or (disjoint and cand_lower != (w.direction == "lower")):
        r.verdict = "worse"
    else:
        r.verdict = "same"
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
    off = [s for s in obs.timeline if s.phase.startswith(("candidate", "stress"))
           and (s.state != "enabled" or s.ops != obs.ops_name)]
    add("stayed_enabled", not off,
        "enabled at every sample while the candidate was measured" if not off else
        f"at t={off[0].t:.1f}s ({off[0].phase}) sched_ext state was {off[0].state!r}, ops {off[0].ops!r}: "
        "the scheduler was disabled while it should have been running (see the stall/error gates and "
        "the kernel log)")

    rej = [s for s in obs.timeline if s.phase.startswith(("candidate", "stress")) and (s.nr_rejected or 0) > 0]
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


# ---------------------------------------------------------------- performance

def _goal_ratio(goal: Goal, w: WorkloadResult) -> float:
    """candidate/baseline expressed in the goal's direction (a higher-is-better goal on a time metric
    compares baseline/candidate: half the time = twice the throughput)."""
    assert w.ratio is not None
    return w.ratio if goal.direction == w.direction else 1.0 / w.ratio


def _fmt(w: WorkloadResult) -> str:
    b, c = w.baseline_stats, w.candidate_stats
    return (f"{w.name}: {w.metric} candidate {c.median:.4g} vs baseline {b.median:.4g} {w.unit} "
            f"(ratio {w.ratio:.3f}, noise ±{w.noise:.1%})")


def performance_gates(results: list[WorkloadResult], workloads: list[Workload],
                      goals: list[Goal] | None) -> list[Gate]:
    by_name = {w.name: w for w in workloads}
    gates: list[Gate] = []
    add = lambda name, ok, reason: gates.append(Gate(name=name, passed=ok, reason=reason, kind="performance"))  # noqa: E731

    def covers(goal: Goal, r: WorkloadResult) -> bool:
        w = by_name.get(r.name)
        return goal.metric == r.metric or (w is not None and goal.metric in w.goal_metrics)

    if not goals:
        for r in results:
            if r.ratio is None:
                add(f"no_regression:{r.name}", False, f"{r.name}: not measured ({'; '.join(r.errors) or 'no samples'})")
            else:
                add(f"no_regression:{r.name}", r.verdict != "worse",
                    _fmt(r) + (" — worse than baseline beyond its noise" if r.verdict == "worse" else ""))
        return gates

    covered: set[str] = set()
    for goal in goals:
        matched = [r for r in results if covers(goal, r)]
        target = goal.target_ratio
        if not matched:
            add(f"goal:{goal.metric}", False, f"goal {goal.metric} is not measured by any workload in this run; "
                f"include a workload for it (`schedcp workloads` / list_workloads)")
            continue
        for r in matched:
            covered.add(r.name)
            name = f"goal:{goal.metric}@{r.name}"
            if r.ratio is None:
                add(name, False, f"{r.name}: not measured ({'; '.join(r.errors) or 'no samples'})")
                continue
            gr = _goal_ratio(goal, r)
            op = "<=" if goal.direction == "lower" else ">="
            no_harm = target is None or (target >= 1.0 if goal.direction == "lower" else target <= 1.0)
            t = 1.0 if target is None else target
            bound = t * (1 + r.noise) if goal.direction == "lower" and no_harm else \
                t * (1 - r.noise) if no_harm else t
            ok = gr <= bound if goal.direction == "lower" else gr >= bound
            tol = f" (target {t:g} with noise tolerance → {bound:.3f})" if no_harm else f" (target {t:g})"
            add(name, ok, f"{goal.metric} ratio {gr:.3f} {op if ok else ('>' if op == '<=' else '<')} "
                f"{bound:.3f}{tol}; {_fmt(r)}")
    for r in results:
        if r.name in covered or r.ratio is None or r.improvement is None:
            continue
        worse_by = r.ratio if r.direction == "lower" else (1.0 / r.ratio if r.ratio > 0 else float("inf"))
        ok = worse_by <= SEVERE_REGRESSION * (1 + r.noise)
        add(f"no_severe_regression:{r.name}", ok,
            _fmt(r) + ("" if ok else f" — more than {SEVERE_REGRESSION}x worse on a workload the goals do not cover"))
    return gates


def noise_warnings(results: list[WorkloadResult]) -> list[str]:
    """Workloads whose noise hides regressions of the size the gates tolerate: a pass there is weak
    evidence, and whoever holds the token should know it."""
    return [f"{r.name}: noise ±{r.noise:.0%}, so a regression up to that size would not show here; "
            f"repeat with more --rounds or on a quieter machine before trusting this {r.verdict!r}"
            for r in results if r.noise is not None and r.noise > NOISY and r.verdict in ("same", "better")]


def verdict(correctness: list[Gate], performance: list[Gate]) -> tuple[bool, str | None]:
    """(passed, the first failed gate's reason) — correctness failures come first."""
    for gate in [*correctness, *performance]:
        if not gate.passed:
            return False, f"{gate.name}: {gate.reason}"
    return True, None
