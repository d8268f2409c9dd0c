"""Diagnosis: from why a candidate lost (its report's evidence, validate.evidence) to what to change.

A small documented rule set (docs/optimize.md, "When a round fails"). Each rule compares the
candidate's side of a traced phase with the default scheduler's side of the same phase, in the same
boot, and fires only when the candidate is clearly worse on the figure the rule is about — so a
figure the default scheduler shares (a busy host, TCG) is not blamed on the policy:

    hog_wait      waits behind a CPU hog: the candidate's waits are longer than the default's, on
                  busy CPUs (no idle CPU beside them), CPU hogs were among those waited behind, and the
                  running tasks were switched out still runnable no more often per wait than under
                  the default (nobody preempted them for the woken task)
                  -> wakeup preemption (a policy's preemption knob; else the `hog`/`wakeup` primitive)
    idle_beside   idle CPUs while tasks waited: a task sat queued on an idle CPU (nobody kicked it)
                  or waited while another CPU idled
                  -> idle-CPU selection and kicks (direct dispatch to an idle CPU, `kick_idle`)
    sync_pingpong a pair that wakes each other (both ways, 20+ each) stays on one CPU for half or
                  more of its wakeups and each wakee waits longer than the default's mean wait
                  (the default wakes such a pair on two CPUs, by IPI from the idle task: its waker
                  shows as swapper, so its own pairs are not compared)
                  -> keep sync wakeups apart (`sync_apart`, a cpu_select that does not pull)
    starved       the candidate starved tasks the default scheduler did not (starvation phase)
                  -> aging / a bound on local priority (vtime credit, lane caps, no local queue)
    short_slices  a throughput workload lost with many more involuntary switches than the default
                  (1.3x, and at least a tenth of all its switches)
                  -> a longer slice

Every diagnosis carries the figures that fired it and one change: a `reconfigure_policy` change of a
repository policy's parameters, a `generate_scheduler` spec (for a policy that has no knob for it,
or a generated candidate whose spec is changed on one axis) or a `revise_policy` patch. Rules only
read stored figures; nothing here runs anything.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from .repository.policies import Policy, get_policy
from .repository.provenance import SchedulerSpec
from .validate.evidence import Evidence
from .validate.models import Layer2Result

Rule = Literal["hog_wait", "idle_beside", "sync_pingpong", "starved", "short_slices"]
RULES: tuple[Rule, ...] = ("starved", "hog_wait", "idle_beside", "sync_pingpong", "short_slices")

#: a candidate's figure counts as worse when it is at least WORSE times the default's, and at least
#: the rule's floor in absolute terms (a share of the waiting time, or ms)
WORSE = 1.5
IDLE_SHARE = 0.2      # of all waiting beside an idle CPU or queued on one
PINGPONG_SAME = 0.5   # of a ping-pong pair's wakeups on one CPU
PINGPONG_WAIT_MS = 0.02  # per wakeup
SLICE_INVOLUNTARY = 1.3  # times the default's involuntary switches (a throughput workload that lost)
SLICE_SHARE = 0.1  # ...and at least this share of all switches (pipe's few preemptions are not slices)
#: workloads whose figure is throughput: a loss there with more preemption reads as short slices
THROUGHPUT = {"hackbench", "cpu", "build", "pipe"}
MS = 1_000_000
#: the loss a starved task counts as: above any ratio a workload can lose by (ln 1000 = 6.9)
STARVED_LOSS = 99.0


class Change(BaseModel):
    """What to try next, in the words of the tool that makes it."""

    tool: Literal["reconfigure_policy", "generate_scheduler", "revise_policy"]
    policy: str | None = Field(None, description="reconfigure/revise: the repository policy")
    params: dict[str, str] = Field({}, description="reconfigure: parameters to set (the rest as before)")
    spec: SchedulerSpec | None = Field(None, description="generate: the scheduler spec")
    patch: str | None = Field(None, description="revise: a unified diff of the policy's source")

    @property
    def label(self) -> str:
        if self.tool == "reconfigure_policy":
            return f"{self.policy}[" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + "]"
        if self.tool == "generate_scheduler" and self.spec:
            s = self.spec
            return f"generate {s.name} ({s.queue}/{s.ordering}/{s.cpu_select}/{s.slice}/{s.preempt})"
        return f"revise {self.policy}"


class Diagnosis(BaseModel):
    rule: Rule
    phase: str = Field(description="the traced phase (a workload, or starvation) whose figures fired it")
    loss: float = Field(0.0, description="how badly the candidate lost there: ln(1/speedup) of the phase's "
                        "worst result (its tail included); a starved task counts as the worst")
    evidence: str = Field(description="the figures, candidate against the default scheduler")
    reason: str = Field(description="why the change should help")
    change: Change


def _pair(evs: list[Evidence], phase: str) -> tuple[Evidence | None, Evidence | None]:
    by = {e.side: e for e in evs if e.phase == phase and not e.error}
    return by.get("baseline"), by.get("candidate")


def _worse(c: float, b: float, floor: float) -> bool:
    return c >= floor and c >= WORSE * max(b, 1e-9)


def lost_phases(l2: Layer2Result) -> list[str]:
    """The workloads the candidate did not show unharmed (worse, undecided or failed), by base name."""
    out = []
    for w in l2.workloads:
        if w.verdict in ("worse", "undecided", "failed"):
            name = w.name.removesuffix("_tail")
            if name not in out:
                out.append(name)
    return out


def diagnose(l2: Layer2Result, policy: str | None, params: dict[str, str] | None = None,
             spec: SchedulerSpec | None = None) -> list[Diagnosis]:
    """What the evidence of a failed (or tied) validation says, rule by rule (RULES order), each with a
    change to `policy` (a repository policy run with `params`) or to `spec` (a generated candidate).
    Phases the candidate did not lose are read only by `starved`. Ordered by the loss behind each
    (the worst loss first, a starved task before any; a guard 20x worse before a target 1.5x worse),
    then by rule."""
    params = dict(params or {})
    pol = _policy(policy)
    lost = lost_phases(l2)
    out: list[Diagnosis] = []

    def add(rule: Rule, phase: str, ev: str, reason: str, change: Change | None) -> None:
        if change and not any(d.change == change for d in out):
            out.append(Diagnosis(rule=rule, phase=phase, evidence=ev, reason=reason, change=change,
                                 loss=_loss(l2, phase)))

    b, c = _pair(l2.evidence, "starvation")
    starved_gate = any(g.name == "no_starvation" and not g.passed for g in l2.correctness)
    if c and (starved_gate or len(c.waits.starved) > len(b.waits.starved if b else [])):
        names = ", ".join(f"{t.comm}[{t.pid}] {t.max_ms:.0f} ms x{t.long_waits}" for t in c.waits.starved[:3])
        add("starved", "starvation", f"starved {len(c.waits.starved)} vs {len(b.waits.starved) if b else '?'} "
            f"under the default ({names})",
            "one queue is served ahead of another without a bound: age the waiting (vtime credit) or cap "
            "the local priority", _aging(pol, params, spec))
    for phase in lost:
        b, c = _pair(l2.evidence, phase)
        if not c or not b:
            continue
        fb, fc = b.features(), c.features()
        idle_c = max(fc["idle_beside_share"], fc["behind_idle_share"])
        idle_b = max(fb["idle_beside_share"], fb["behind_idle_share"])
        longer = _worse(fc["mean_wait_ms"], fb["mean_wait_ms"], 0.05)
        inv_c = c.involuntary / max(c.waits.waits, 1)
        inv_b = b.involuntary / max(b.waits.waits, 1)
        if longer and idle_c < IDLE_SHARE and c.behind_hogs_ms > 0 and inv_c <= inv_b:
            hogs = ", ".join(f"{x.comm}[{x.pid}]" for x in c.blockers[:2])
            add("hog_wait", phase,
                f"mean wait {fc['mean_wait_ms']:.2f} ms vs {fb['mean_wait_ms']:.2f} ms (p99 <= {fc['p99_ms']:.3g} vs "
                f"{fb['p99_ms']:.3g} ms) with every CPU busy (idle beside {idle_c:.0%}); {fc['behind_hogs_share']:.0%} "
                f"ended behind CPU hogs (most behind {hogs}); running tasks switched out still runnable "
                f"{inv_c:.2f} per wait vs {inv_b:.2f}: the running task is not preempted for the woken one",
                "woken tasks queue behind running CPU hogs until their slice ends: let a short sleeper preempt a hog",
                _preempt(pol, params, spec))
        if idle_c >= IDLE_SHARE and _worse(idle_c * fc["wait_ms"], idle_b * fb["wait_ms"], 0) and longer:
            add("idle_beside", phase,
                f"{fc['behind_idle_share']:.0%} of the waiting queued on an idle CPU ({c.behind_idle} waits), "
                f"{fc['idle_beside_share']:.0%} while another CPU idled; default {fb['behind_idle_share']:.0%} / "
                f"{fb['idle_beside_share']:.0%}",
                "a CPU idles while work waits: dispatch a woken task straight to an idle CPU and kick idle CPUs "
                "when work is queued", _idle(pol, params, spec))
        if c.pingpong and fc["pingpong_same_cpu_share"] >= PINGPONG_SAME \
                and _worse(fc["pingpong_wait_ms"], fb["mean_wait_ms"], PINGPONG_WAIT_MS):
            p = c.pingpong[0]
            add("sync_pingpong", phase,
                f"{p.waker}<->{p.wakee}: {fc['pingpong_same_cpu_share']:.0%} of {p.wakeups} wakeups on one CPU "
                f"(the default's wakeups: {1 - fb['cross_cpu_share']:.0%} on one CPU, its pairs woken from idle by "
                f"IPI), {fc['pingpong_wait_ms']:.3f} ms wait per wakeup vs the default's mean wait "
                f"{fb['mean_wait_ms']:.3f} ms",
                "a synchronous wakee pulled onto its waker's CPU waits for the waker to finish: keep the pair "
                "on two CPUs while one idles", _apart(pol, params, spec))
        if phase in THROUGHPUT and fc["switches"] and fb["switches"] and fc["involuntary_share"] >= SLICE_SHARE \
                and c.involuntary >= SLICE_INVOLUNTARY * max(b.involuntary, 1) and c.involuntary >= 50:
            add("short_slices", phase,
                f"{c.involuntary} involuntary switches vs {b.involuntary} under the default "
                f"({fc['involuntary_share']:.0%} vs {fb['involuntary_share']:.0%} of switches)",
                "throughput lost to switching: tasks are cut off before their burst ends; a longer slice",
                _longer_slice(pol, params, spec))
    return sorted(out, key=lambda d: -d.loss)  # stable: rule order within one loss


def _loss(l2: Layer2Result, phase: str) -> float:
    """ln(1/speedup) of the phase's worst result (the workload or its tail); starvation: STARVED_LOSS."""
    if phase == "starvation":
        return STARVED_LOSS
    sp = [w.speedup for w in l2.workloads if w.name.removesuffix("_tail") == phase and w.speedup]
    return round(max((math.log(1 / x) for x in sp), default=0.0), 4)


# ------------------------------------------------------------------------------------------------
# changes: per policy, the knob that does it; otherwise a generated scheduler with that primitive

def _policy(name: str | None) -> Policy | None:
    if not name:
        return None
    try:
        p = get_policy(name)
    except Exception:  # noqa: BLE001 — a report of a policy since removed: diagnose by spec only
        return None
    return p if p.kind == "schedcp" else None


def _knobs(pol: Policy | None) -> dict[str, object]:
    return {p.name: p for p in pol.parameters} if pol else {}


def _norm(knob, v) -> str:
    """A knob value as a plan writes it: bools as true/false (a report stores 1/0), ints as digits."""
    v = str(v).lower()
    if knob is not None and knob.type == "bool":
        return "true" if v in ("1", "true") else "false"
    return v


def _cur(pol: Policy | None, params: dict[str, str], name: str) -> str | None:
    k = _knobs(pol).get(name)
    if name in params:
        return _norm(k, params[name])
    return _norm(k, k.default) if k is not None else None


def _set(pol: Policy, params: dict[str, str], **new) -> Change | None:
    """A reconfigure change setting `new` (clamped to each knob's range), None when nothing changes."""
    knobs = _knobs(pol)
    changed = {}
    for k, v in new.items():
        p = knobs.get(k)
        if p is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        else:
            v = int(v)
            v = str(max(p.min if p.min is not None else v, min(p.max if p.max is not None else v, v)))
        if _cur(pol, params, k) != v:
            changed[k] = v
    if not changed:
        return None
    # the parameters that differ from the policy's defaults (a report stores every one, resolved)
    out = {k: _norm(knobs.get(k), v) for k, v in {**params, **changed}.items()}
    out = {k: v for k, v in out.items() if k not in knobs or v != _norm(knobs[k], knobs[k].default)}
    return Change(tool="reconfigure_policy", policy=pol.name, params=out)


def _slice(pol: Policy | None, params: dict[str, str], spec: SchedulerSpec | None) -> int:
    if spec is not None:
        return int(spec.params.get("slice_ns", 5 * MS))
    cur = _cur(pol, params, "slice_ns")
    return int(cur) if cur and cur.isdigit() else 5 * MS


def _spec(base: SchedulerSpec | None, pol: Policy | None, pparams: dict[str, str], suffix: str,
          **axes) -> Change | None:
    """A generated scheduler: `base` (a generated candidate's spec) with `axes` changed, or for a
    repository policy without the knob a spec in its spirit (fifo stays fifo) with them."""
    if base is not None:
        spec = base.model_copy(update={"name": (base.name[:20] + "_" + suffix[:3])[:24], **axes})
    else:
        fifo = pol is not None and pol.name == "fifo"
        fields = {"queue": "builtin_global" if fifo else "global", "ordering": "fifo" if fifo else "vtime",
                  "params": {"slice_ns": min(_slice(pol, pparams, None), 20 * MS)}, **axes}
        spec = SchedulerSpec(name=f"{(pol.name if pol else 'gen')[:16]}_{suffix}"[:24],
                             description=f"{pol.name if pol else 'a candidate'} changed by diagnosis: {suffix}",
                             **fields)
    if spec.ordering == "fifo" and spec.preempt == "wakeup":
        spec = spec.model_copy(update={"preempt": "hog"})  # fifo has no deadline to compare: the hog guard
    from .synth.spec import check_spec, knob_params

    known = {k.name for k in knob_params(spec.model_copy(update={"params": {}}))}
    spec = spec.model_copy(update={"params": {k: v for k, v in spec.params.items() if k in known}})
    if check_spec(spec):
        return None  # not a scheduler generate_scheduler would make: no change from this rule
    return Change(tool="generate_scheduler", spec=spec)


def _preempt(pol, params, spec) -> Change | None:
    if spec is not None:
        if spec.preempt == "wakeup":
            cur = int(spec.params.get("preempt_min_ns", 500_000))
            return _spec(spec, pol, params, "pmin", params={**spec.params, "preempt_min_ns": max(cur // 2, 100_000)})
        if spec.preempt == "hog":
            cur = int(spec.params.get("hog_burst_ns", 4 * MS))
            return _spec(spec, pol, params, "hburst", params={**spec.params, "hog_burst_ns": cur // 2})
        return _spec(spec, pol, params, "preempt", preempt="hog" if spec.ordering == "fifo" else "wakeup")
    k = _knobs(pol)
    if "preempt" in k and _cur(pol, params, "preempt") == "false":
        return _set(pol, params, preempt=True)
    if "hog_burst_ns" in k:  # lean_preempt: preempt smaller hogs sooner
        return _set(pol, params, preempt=True, hog_burst_ns=int(_cur(pol, params, "hog_burst_ns")) // 2)
    if "preempt_min_ns" in k:
        return _set(pol, params, preempt=True, preempt_min_ns=int(_cur(pol, params, "preempt_min_ns")) // 2)
    return _spec(None, pol, params, "preempt", preempt="hog" if pol and pol.name == "fifo" else "wakeup")


def _idle(pol, params, spec) -> Change | None:
    if spec is not None:
        if spec.preempt == "none":
            return _spec(spec, pol, params, "kick", preempt="kick_idle")
        if spec.cpu_select not in ("default", "builtin"):
            return _spec(spec, pol, params, "idle", cpu_select="default")
        return None
    if "direct_dispatch" in _knobs(pol) and _cur(pol, params, "direct_dispatch") == "false":
        return _set(pol, params, direct_dispatch=True)
    if "migrate_on_wakeup" in _knobs(pol) and _cur(pol, params, "migrate_on_wakeup") == "false":
        return _set(pol, params, migrate_on_wakeup=True)
    if "sync_apart" in _knobs(pol) and _cur(pol, params, "sync_apart") == "false":
        return _set(pol, params, sync_apart=True)
    return _spec(None, pol, params, "kick", preempt="kick_idle", cpu_select="default")


def _apart(pol, params, spec) -> Change | None:
    if spec is not None:
        if spec.cpu_select == "sync_waker":
            return _spec(spec, pol, params, "apart", cpu_select="default")
        return _spec(spec, pol, params, "apart", cpu_select="prev_sticky")
    if "sync_apart" in _knobs(pol):
        return _set(pol, params, sync_apart=True)
    if "migrate_on_wakeup" in _knobs(pol):
        return _set(pol, params, migrate_on_wakeup=True)
    return _spec(None, pol, params, "apart", cpu_select="prev_sticky")


def _aging(pol, params, spec) -> Change | None:
    if spec is not None:
        if spec.ordering == "fifo" or spec.queue == "per_cpu":
            return _spec(spec, pol, params, "aged", ordering="vtime", queue="global",
                         preempt="wakeup" if spec.preempt == "hog" else spec.preempt)
        return None
    k = _knobs(pol)
    if "lane_max" in k:  # lean_preempt: fewer tasks through the fast lane per window, a shorter local queue
        return _set(pol, params, lane_max=max(1, int(_cur(pol, params, "lane_max")) // 4), local_max=1)
    if "max_credit_ns" in k:
        return _set(pol, params, max_credit_ns=int(_cur(pol, params, "max_credit_ns")) // 4)
    if "lag_ns" in k:
        return _set(pol, params, lag_ns=int(_cur(pol, params, "lag_ns")) // 4)
    return _spec(None, pol, params, "aged", ordering="vtime", queue="global")


def _longer_slice(pol, params, spec) -> Change | None:
    cur = _slice(pol, params, spec)
    if spec is not None:
        return _spec(spec, pol, params, "slice", params={**spec.params, "slice_ns": min(cur * 2, 100 * MS)})
    if "slice_ns" in _knobs(pol):
        return _set(pol, params, slice_ns=cur * 2)
    return None


def evidence_lines(l2: Layer2Result) -> list[str]:
    """Every traced phase of a report, candidate and default side by side (validate.evidence)."""
    from .validate.evidence import summary_lines

    out: list[str] = []
    for ph in dict.fromkeys(e.phase for e in l2.evidence):
        by = {e.side: e for e in l2.evidence if e.phase == ph}
        out += summary_lines(by.get("baseline"), by.get("candidate"))
    if l2.counters:
        out.append("policy counters: " + ", ".join(f"{k} {v}" for k, v in sorted(l2.counters.items())))
    return out


def brief(l2: Layer2Result, lost: list[str] | None = None) -> list[str]:
    """What lost, in a line per lost phase: the candidate's side only (the re-planning chain)."""
    lost = lost if lost is not None else lost_phases(l2)
    out = []
    for ph in [*lost, "starvation"]:
        _, c = _pair(l2.evidence, ph)
        if c:
            out.append(f"{ph}: " + c.line().split(": ", 1)[1])
    return out
