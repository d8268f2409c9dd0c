"""Layer 2: run a compiled sched_ext scheduler in one booted sandbox VM and judge it.

The sequence, all in the same boot (timings are only comparable within one boot):

    setup      ship schedcp-probe, the object and the workload scripts to /run/l2 in the guest
    warmup-0   each workload once under the default scheduler, not measured
    round 1    per workload, its baseline side and its candidate side back to back (round_plan):
               baseline-1 hackbench | load-1 | candidate-1 hackbench, pipe | unload-1 |
               baseline-1 pipe, cpu | load-2 | candidate-1 cpu, wakeup | ...
               load: the loader attaches the candidate in the background (`--run`, watchdog
               `--timeout-ms`); state must be `enabled` and root/ops the expected name
    stress     stress-ng cpu/fork/affinity/switch/sleep while sampling every second: sched_ext state,
               ops, nr_rejected, and how often each stress worker's threads were switched in
               (/proc/PID/task/*/schedstat; a worker not run once in 2 s is starving — CPU time
               in /proc/PID/stat has 10 ms granularity, too coarse for a ping-pong worker)
    round 2..  the same, each workload's two sides in the other order
    unload-N   SIGTERM to the loader; the default scheduler must be back (state `disabled`)
    kernel log sched_ext lines of dmesg

Why each workload's two sides back to back: this host's noise comes in episodes of seconds (a build
1.5-2x slower for 5-20 s while a user-space loop beside it kept its speed), and a pair whose halves ran
a whole side (~9 s) apart caught an episode in one half only; switching the scheduler costs ~0.45 s
(load ~0.3 s, unload ~0.15 s), one switch per workload per round. Why alternate (ABBA): whatever
running first or second does to a figure falls on both sides equally, and neighbouring workloads
share a side, so a round needs one switch per workload, not two.

Each step is one `vm.run` with a timeout; workloads are also bounded inside the guest (`timeout -s
KILL`), so a slow candidate fails its workload instead of the VM. A scheduler that dies (stall, error
exit) ends the measuring early and the run goes straight to the unload/collect steps. A VM that stops
answering is killed by `vm.run`; the result then says what timed out (or the kernel's Oops when the
guest crashed) and carries the console's sched_ext lines. A VM booted here is always powered off
before returning; a caller's VM is left running (and is dead if the candidate killed it).

A VM may serve several validations: each marks the kernel log at setup and reads only what follows,
and stops a loader an interrupted run left behind.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import statistics
import time
from typing import Callable

from ..errors import BadInput, InfrastructureError, SchedcpError
from ..models import Goal
from ..sandbox import neighbours, scheduler
from ..sandbox.program import Launcher, ObjectLauncher
from ..sandbox.vm import VM, GuestTimeout
from . import evidence, gates, starvation
from .models import Layer2Result, LoadAttempt, Observations, StateSample, StressSummary, Workload, WorkloadResult
from .workloads import PROBE_GUEST, ensure_probe, get_workloads, parse, parse_stress_ng_metrics

Progress = Callable[[str, float], None]

G = "/run/l2"
LIB = scheduler.PRELUDE + r"""
L=/run/l2
# builtins only (read, not cat): a fork costs tens of ms under TCG and would perturb what we measure
snap() {
	st=absent ops= rej=
	read -r st 2>/dev/null <$SX/state
	read -r ops 2>/dev/null <$SX/root/ops
	read -r rej 2>/dev/null <$SX/nr_rejected
	read up _ </proc/uptime
	echo "@@S $up $1 $st ${ops:--} ${rej:--1}"
}
"""

#: stress-ng mix: CPU hogs, fork/exit churn, affinity changes, context-switch ping-pong, sleep/wakeup
STRESSORS = "--cpu 2 --fork 2 --affinity 1 --switch 2 --sleep 1 --sleep-max 16"
SAMPLE_PERIOD_S = 1.0  # the target; the loop sleeps half of it, and scanning /proc takes the rest
#: a stress worker not switched in at all for this long (guest seconds) is starving
STALL_S = 2.0
KERNEL_LOG_RE = re.compile(r"(?i:sched_ext)|Kernel panic|RIP: |" + gates.KERNEL_TROUBLE_RE.pattern)
#: adaptive rounds stop here whatever the budget says
MAX_ROUNDS = 30
#: default time budget of one validation (boot to power-off), seconds. On this 2-core TCG host boot,
#: warm-up and the stress phase take ~17 s, the starvation phase ~25 s (both sides) and a full round
#: ~30 s (every workload 3-7 runs per side, one scheduler switch per workload), so three rounds end at
#: ~150-160 s; the rest buys rounds of only the workloads still open (a pipe-only round ~9 s). At 180 s
#: lean_preempt's five stability validations of 2026-12-07 06:47 ended after 3-4 rounds, four of them
#: with pipe undecided at 3-4 pairs (its pairs' log ratios spread ±0.05-0.2 from round to round): a
#: validation that cannot decide costs a whole new one, so the default buys the rounds.
BUDGET_S = 240.0
#: a policy's own counters: an ARRAY map named schedcp_stats whose one value is a struct of u64 fields
#: (bpftool prints it with field names from BTF); read before and after the candidate's measured runs
COUNTERS_MAP = "schedcp_stats"
COUNTERS_SNIPPET = ("echo '@@{tag}'; bpftool -j map dump name " + COUNTERS_MAP +
                    " 2>/dev/null; echo; echo '@@{tag}END'\n")


class _Run:
    """One validation's state: the VM, the facts collected so far, the timeline."""

    def __init__(self, vm, obj: bytes, ops_name: str, params: dict[str, str], workloads: list[Workload],
                 timeout_ms: int, progress: Progress, launcher: Launcher | None = None):
        self.vm, self.obj, self.ops_name, self.params = vm, obj, ops_name, params
        # how the candidate is shipped, started and stopped: the generic loader with a BPF object, or a
        # scheduler program with its own loader (sandbox.program)
        self.launcher = launcher or ObjectLauncher(obj, params, timeout_ms)
        self.workloads, self.timeout_ms, self.say = workloads, timeout_ms, progress
        self.obs = Observations(ops_name=ops_name)
        # per workload, per side (0 baseline, 1 candidate): round -> that round's figures (reps)
        self.samples: dict[str, tuple[dict[int, list[float]], dict[int, list[float]]]] = {
            w.name: ({}, {}) for w in workloads}
        # per workload, per secondary metric, per side: round -> that round's figures (reps)
        self.extra: dict[str, dict[str, tuple[dict[int, list[float]], dict[int, list[float]]]]] = {
            w.name: {} for w in workloads}
        self.counters: dict[str, int] = {}
        self.durations: dict[str, float] = {}
        self.nload = 0
        self.cost: dict[str, float] = {}  # per workload: the longest one side of it took, seconds
        self.marker: str | None = None
        self.rounds_done = 0

    # ---------------------------------------------------------------- plumbing

    def step(self, phase: str, body: str, timeout_s: float, files: dict[str, bytes] | None = None) -> str:
        t0 = time.monotonic()
        try:
            r = self.vm.run(LIB + body, files=files, timeout_s=timeout_s)
        except SchedcpError:
            raise
        except Exception as e:  # noqa: BLE001 — a garbled agent reply (seen once: not a gzip body)
            self.vm.kill()  # the channel is out of step: the VM cannot be used any more
            raise InfrastructureError(f"the guest agent's reply to {phase} was unreadable: "
                                      f"{type(e).__name__}: {e}") from e
        key = re.sub(r"-\d+$", "", phase)
        self.durations[key] = round(self.durations.get(key, 0.0) + time.monotonic() - t0, 3)
        out = r.stdout
        for m in re.finditer(r"^@@S (\S+) (\S+) (\S+) (\S+) (\S+)$", out, re.M):
            rej = int(m.group(5))
            self.obs.timeline.append(StateSample(t=float(m.group(1)), phase=m.group(2), state=m.group(3),
                                                 ops="" if m.group(4) == "-" else m.group(4),
                                                 nr_rejected=None if rej < 0 else rej))
        return out

    def enabled(self) -> bool:
        last = self.obs.timeline[-1] if self.obs.timeline else None
        return bool(last and last.state == "enabled" and last.ops == self.ops_name)

    # ---------------------------------------------------------------- steps

    def setup(self) -> None:
        # the probe and the tracer are always shipped: the starvation phase uses both
        files = {**self.launcher.files(), "schedcp-probe": ensure_probe().read_bytes(),
                 "rqw.bpf.o": starvation.ensure_tracer().read_bytes()}
        for w in self.workloads:
            files[f"w_{w.name}.sh"] = (f"PROBE={PROBE_GUEST}\n{w.command}\n").encode()
        self.marker = f"schedcp-l2: begin {secrets.token_hex(4)}"
        # the kernel log is shared by every validation in this boot: mark where ours starts (at error
        # level, so that it reaches the console too, for when the guest dies)
        # a scheduler left attached by an earlier, interrupted run in this VM would make our load fail
        self.step("setup", scheduler.stop_any_script() +
                  f"rm -rf {G}; mkdir -p {G} && cp * {G}/ && chmod +x {G}/* && "
                  f"echo '<3>{self.marker}' >/dev/kmsg; snap setup\n", timeout_s=60, files=files)

    def measure(self, side: str, rnd: int, only: list[Workload] | None = None) -> None:
        """Run the workloads (or `only` these) once per rep on one side of round `rnd`."""
        phase = f"{side}-{rnd}"
        wls = self.workloads if only is None else only
        body = [COUNTERS_SNIPPET.format(tag="C0")] if side == "candidate" else []
        traced = evidence.traced(rnd, side)
        for w in wls:
            body.append(f"snap {phase}\n")
            body.append("".join(f"echo '@@B {w.name}'\ntimeout -s KILL {int(w.timeout_s)} sh $L/w_{w.name}.sh 2>&1\n"
                                f"echo \"@@E {w.name} $?\"\n" for _ in range(1 if side == "warmup" else max(1, w.reps))))
        body.append(f"snap {phase}\n")
        # the evidence comes from one more run of each workload, traced and never a figure (its
        # markers are not @@B/@@E) and after the last snap (not in a workload's cost): the tracer
        # costs more where a scheduler switches more, so traced figures would bias the pair
        # (hackbench ran ~28 % slower traced, on a busy host)
        for w in wls if traced else ():
            body.append(evidence.wrap(w.name, f"echo '@@TB {w.name}'\ntimeout -s KILL {int(w.timeout_s)} "
                                      f"sh $L/w_{w.name}.sh >/dev/null 2>&1\necho \"@@TE {w.name} $?\"\n",
                                      f"{G}/rqw.bpf.o"))
        if side == "candidate":
            body.append(COUNTERS_SNIPPET.format(tag="C1"))
        n0 = len(self.obs.timeline)
        out = self.step(phase, "".join(body),
                        timeout_s=sum(w.timeout_s * (max(1, w.reps) + traced) for w in wls) + 60)
        snaps = self.obs.timeline[n0:]
        if side == "warmup":
            return  # figures discarded: see warm_up()
        if traced:
            self.obs.evidence += evidence.parse_wrapped(out, side)
        idx = 0 if side == "baseline" else 1  # "again": the A/A run's second baseline
        if side == "candidate":
            for k, v in _counter_delta(out).items():
                self.counters[k] = self.counters.get(k, 0) + v
        for i, w in enumerate(wls):
            if len(snaps) > i + 1:  # guest seconds this workload took (all reps): what one more costs
                self.cost[w.name] = max(self.cost.get(w.name, 0.0), snaps[i + 1].t - snaps[i].t)
            if side == "candidate" and not all(s.state == "enabled" and s.ops == self.ops_name
                                               for s in snaps[i:i + 2]):
                continue  # the candidate was not running for this whole run: not a candidate figure
            runs = re.findall(rf"^@@B {re.escape(w.name)}\n(.*?)^@@E {re.escape(w.name)} (\d+)$", out, re.M | re.S)
            if len(runs) < max(1, w.reps):
                self._werr(w, f"{phase}: no output (the run was cut short)")
                continue
            for text, rc in runs:
                rc = int(rc)
                if rc != 0:
                    why = "killed by the guest timeout ({:.0f} s)".format(w.timeout_s) if rc in (137, 124) else f"exit {rc}"
                    self._werr(w, f"{phase}: {why}: {text.strip()[-300:]}")
                    break
                try:
                    values = parse(w, text)
                except ValueError as e:
                    self._werr(w, f"{phase}: {e}")
                    break
                self.samples[w.name][idx].setdefault(rnd, []).append(values[w.metric])
                for k, v in values.items():
                    if k != w.metric:
                        self.extra[w.name].setdefault(k, ({}, {}))[idx].setdefault(rnd, []).append(v)

    def warm_up(self) -> None:
        """Each workload once (one rep) under the default scheduler, figures discarded. The first run of a
        workload in a fresh boot is cold (page cache, qemu's translation cache: stress-ng --cpu gave
        half its usual bogo ops/s), and as round 1's baseline it made one pair lie in the candidate's
        favour — in an A/A run that one pair was most of the ±25 % cpu interval."""
        self.measure("warmup", 0)

    def pairs(self, w: Workload, metric: str | None = None) -> tuple[list[float], list[float]]:
        """(baseline, candidate) figures of the rounds that have both sides, a round's reps reduced to
        one figure by `reduce_reps` — of the primary metric, or of a secondary one."""
        b, c = self.samples[w.name] if metric is None else self.extra[w.name].get(metric, ({}, {}))
        rounds = sorted(set(b) & set(c))
        return [reduce_reps(b[r]) for r in rounds], [reduce_reps(c[r]) for r in rounds]

    def results(self) -> list[WorkloadResult]:
        """Per workload its primary metric's result, and after it its tail metric's (a result of its own,
        `<name>_tail`, with its own interval and gate) when it has one."""
        out = []
        for w in self.workloads:
            flat = {k: ([x for r in sorted(b) for x in b[r]], [x for r in sorted(c) for x in c[r]])
                    for k, (b, c) in self.extra[w.name].items()}
            errors = self.obs.workload_errors.get(w.name)
            out.append(gates.summarize(w, *self.pairs(w), errors=errors, secondary=flat))
            if w.tail_metric:
                out.append(gates.summarize(tail_workload(w), *self.pairs(w, w.tail_metric), errors=errors))
        return out

    def _werr(self, w: Workload, msg: str) -> None:
        self.obs.workload_errors.setdefault(w.name, []).append(msg)

    def _files(self) -> scheduler.Files:
        return scheduler.Files(G, f"loader.{self.nload}")

    def load(self) -> bool:
        self.nload += 1
        n = self.nload
        out = self.step(f"load-{n}", self.launcher.start(G, self._files()) + f"snap load-{n}\n",
                        timeout_s=scheduler.START_WAIT_S + 60)
        started = self.launcher.parse_start(out)
        last = self.obs.timeline[-1] if self.obs.timeline else None
        entry = LoadAttempt(state=last.state if last else None, ops=last.ops if last else None)
        if started.error:
            ex = started.exit
            if ex:
                self.obs.loader_exits.append(ex)
            entry.error = started.error
            if ex and ex.stage in ("run", "done") and ex.root_ops == self.ops_name:
                # attached, then the kernel threw it out at once (stall/error): not an attach failure
                entry = LoadAttempt(state="enabled", ops=self.ops_name)
        self.obs.loads.append(entry)
        return entry.error is None and self.enabled()

    def stress(self, seconds: float) -> None:
        out = self.step("stress", f"""
snap stress
echo '@@EV0'; cat $SX/root/events 2>/dev/null; echo '@@EV0END'
stress-ng {STRESSORS} --timeout {int(seconds)} --metrics-brief >$L/stress.out 2>&1 &
spid=$!
while scx_alive $spid; do
	sleep {SAMPLE_PERIOD_S / 2}
	snap stress
	# shell builtins only (no fork per process): under TCG a fork costs tens of ms
	for d in /proc/[0-9]*; do
		read -r l 2>/dev/null <$d/stat || continue
		set -- $l
		[ "$4" = "$spid" ] || continue
		n=0
		for t in $d/task/*; do read -r a b c 2>/dev/null <$t/schedstat && n=$((n + c)); done
		echo "@@P ${{d#/proc/}} $2 $n"
	done
	echo '@@PEND'
done
wait $spid
echo "@@RC $?"
echo '@@EV1'; cat $SX/root/events 2>/dev/null; echo '@@EV1END'
cat $L/stress.out
""", timeout_s=seconds + 90)
        rc = re.search(r"^@@RC (\d+)$", out, re.M)
        st = StressSummary(duration_s=seconds, rc=int(rc.group(1)) if rc else None)
        st.stressors = {k: v["bogo_ops"] for k, v in parse_stress_ng_metrics(out).items()}
        # progress: per worker, (guest time, times its threads were switched in) at each sample
        series: dict[str, list[tuple[float, int]]] = {}
        for block in out.split("@@PEND")[:-1]:
            st.samples += 1
            t = re.findall(r"^@@S (\S+) ", block, re.M)
            if not t:
                continue
            for m in re.finditer(r"^@@P (\d+) \(?([^)\s]+)\)? (\d+)$", block, re.M):
                series.setdefault(f"{m.group(2)}[{m.group(1)}]", []).append((float(t[-1]), int(m.group(3))))
        st.workers = len(series)
        st.stalled_workers = [f"{w} (not run once in {gap:.1f} s)" for w, s in series.items()
                              if (gap := _longest_standstill(s)) >= STALL_S]
        ev0, ev1 = _events(out, "@@EV0"), _events(out, "@@EV1")
        st.events = {k: v - ev0.get(k, 0) for k, v in ev1.items() if v != ev0.get(k, 0)}
        self.obs.stress = st

    def starve(self, side: str) -> None:
        """The starvation phase (validate.starvation) on one side, the tracer attached throughout."""
        out = self.step(f"starve-{side}", starvation.phase_script(side, f"{G}/rqw.bpf.o", PROBE_GUEST),
                        timeout_s=starvation.DURATION_S + 90)
        self.obs.starvation.append(starvation.parse_phase(side, out))
        self.obs.evidence.append(evidence.parse("starvation", side, out, starvation.WINDOW_S))

    def unload(self) -> None:
        n = self.nload
        out = self.step(f"unload-{n}", self.launcher.stop(self._files()) + f"snap unload-{n}\n",
                        timeout_s=60)
        ex = self.launcher.parse_stop(out).exit
        if ex and not any(e.run_s == ex.run_s and e.uei == ex.uei for e in self.obs.loader_exits):
            self.obs.loader_exits.append(ex)
        last = self.obs.timeline[-1]
        self.obs.final_state, self.obs.final_ops = last.state, last.ops

    def kernel_log(self) -> None:
        out = self.step("kernel-log", "dmesg 2>/dev/null\n", timeout_s=30)
        self.obs.kernel_log = _kernel_lines(out, self.marker)


def round_plan(r: int, wls: list[Workload], sides: tuple[str, str]) -> list[tuple[str, list[Workload]]]:
    """Round `r` as steps (side, workloads): each workload's two sides back to back, its first side
    sides[0] when r + its position is odd, else sides[1] — so a workload alternates between rounds and
    neighbours share a side (A B | B A | A B ...), which one step measures."""
    steps: list[tuple[str, list[Workload]]] = []
    for i, w in enumerate(wls):
        pair = sides if (r + i) % 2 else (sides[1], sides[0])
        for side in pair:
            if steps and steps[-1][0] == side:
                steps[-1][1].append(w)
            else:
                steps.append((side, [w]))
    return steps


TAIL_SUFFIX = "_tail"


def tail_workload(w: Workload) -> Workload:
    """The result row of a workload's tail metric: judged like a workload of its own."""
    return w.model_copy(update={"name": w.name + TAIL_SUFFIX, "metric": w.tail_metric, "tail_metric": None,
                                "description": f"{w.name}: {w.tail_metric}, the tail of the same runs",
                                "goal_metrics": ["p99_wakeup_latency_us", w.tail_metric]})


def base_name(result_name: str) -> str:
    """The workload a result row belongs to (`wakeup_tail` -> `wakeup`)."""
    return result_name.removesuffix(TAIL_SUFFIX)


def reduce_reps(xs: list[float]) -> float:
    """One round's figure from its reps: the median of three or more (a run that the host disturbed —
    seen as stress-ng --cpu at half its usual rate about once in 40 runs — does not move it), else the
    geometric mean."""
    if len(xs) >= 3:
        return statistics.median(xs)
    if all(x > 0 for x in xs):
        return math.exp(statistics.fmean(math.log(x) for x in xs))
    return statistics.fmean(xs)


def _counters(text: str, tag: str) -> dict[str, int]:
    """Integer fields of the schedcp_stats map as bpftool -j printed them (formatted from BTF)."""
    m = re.search(rf"^@@{tag}$(.*?)^@@{tag}END$", text, re.M | re.S)
    try:
        rows = json.loads(m.group(1)) if m and m.group(1).strip() else []
    except json.JSONDecodeError:
        return {}
    out: dict[str, int] = {}
    for row in rows if isinstance(rows, list) else []:
        value = (row.get("formatted") or row).get("value") if isinstance(row, dict) else None
        for k, v in (value.items() if isinstance(value, dict) else ()):
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return out


def _counter_delta(text: str) -> dict[str, int]:
    before, after = _counters(text, "C0"), _counters(text, "C1")
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _longest_standstill(samples: list[tuple[float, int]]) -> float:
    """Longest time between two samples of a switch-in counter that did not move."""
    best = 0.0
    for i, (t0, n0) in enumerate(samples):
        for t1, n1 in samples[i + 1:]:
            if n1 != n0:
                break
            best = max(best, t1 - t0)
    return best


def _events(text: str, marker: str) -> dict[str, int]:
    m = re.search(rf"^{marker}$(.*?)^{marker}END$", text, re.M | re.S)
    out = {}
    for line in (m.group(1) if m else "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _kernel_lines(text: str, marker: str | None = None, limit: int = 80) -> list[str]:
    """The sched_ext and kernel-trouble lines after this validation's marker."""
    if marker and marker in text:
        text = text[text.rindex(marker) + len(marker):]
    lines = [ln.rstrip() for ln in text.splitlines() if KERNEL_LOG_RE.search(ln)]
    if len(lines) <= limit:
        return lines
    # a validation loads and unloads the candidate once per workload and round (dozens of routine
    # enabled/unregistered lines): keep the first `limit` other lines — where trouble starts — and the tail
    other = [i for i, ln in enumerate(lines) if not _routine(ln)][:limit]
    return [lines[i] for i in sorted(set(other) | set(range(len(lines) - limit, len(lines))))]


def _routine(line: str) -> bool:
    """A scheduler enabled, or disabled for a reason that is not its fault (scheduler.CLEAN_REASONS)."""
    m = scheduler.DISABLED_RE.search(line)
    return bool(m[2] in scheduler.CLEAN_REASONS if m else re.search(r'BPF scheduler "[^"]*" enabled', line))


def validate_in_sandbox(object_bytes: bytes, *, ops_name: str, params: dict[str, str] | None = None,
                        goals: list[Goal] | None = None, workloads: list[str] | list[Workload] | None = None,
                        rounds: int = 3, budget_s: float | None = BUDGET_S, stress_s: float = 6.0,
                        timeout_ms: int = 3000, vm=None, progress: Progress | None = None,
                        crash_retries: int = 1, launcher: Launcher | None = None) -> Layer2Result:
    """Stress, check and A/B-benchmark a compiled scheduler in one sandbox VM boot.

    `object_bytes` is a layer-1-accepted BPF object whose struct_ops name is `ops_name`; `params` are
    loader `--param` values; `goals` become performance gates (without goals: no workload worse than
    baseline beyond its noise); `workloads` are names from `list_workloads()` (default: all);
    `vm` is a running full sandbox VM to use (default: boot one and power it off afterwards).
    `launcher` starts and stops the candidate (default: the generic loader with `object_bytes`;
    `sandbox.program.ProgramLauncher` for a scheduler program with its own loader).

    Rounds are adaptive: at least `rounds`, then more while some performance gate is undecided (its
    interval straddles its threshold) and another round fits in `budget_s` (counted from the start,
    boot included; at most MAX_ROUNDS). `budget_s` None or 0 runs exactly `rounds` rounds.
    Infrastructure failures (no image, VM does not boot) raise InfrastructureError; everything the
    candidate did wrong, including hanging or crashing the VM, comes back as a failed Layer2Result.

    When the guest kernel crashes, the whole run is repeated `crash_retries` times in a fresh VM
    before the crash counts against the candidate: under qemu TCG the 7.2 guest kernel sometimes oopses
    (int3 while patching static keys) as any scheduler is enabled, a fault of the emulation, not of
    the scheduler. A scheduler that really crashes the kernel crashes it again. Earlier crashes are
    listed in `Layer2Result.retried_after`.
    """
    say = progress or (lambda msg, frac: None)
    if rounds < 1 or rounds > MAX_ROUNDS:
        raise BadInput(f"rounds must be 1..{MAX_ROUNDS}, not {rounds}")
    if budget_s is not None and not 0 <= budget_s <= 3600:
        raise BadInput(f"budget must be 0..3600 s, not {budget_s}", hint="0 runs exactly --rounds rounds")
    if not object_bytes:
        raise BadInput("empty BPF object")
    wl = [w if isinstance(w, Workload) else None for w in (workloads or [])]
    wls = [w for w in wl if w is not None] or get_workloads([w for w in (workloads or []) if isinstance(w, str)])
    params = {k: str(v) for k, v in (params or {}).items()}
    t_start = time.monotonic()
    if any("$PROBE" in w.command for w in wls):
        ensure_probe()  # compile before booting: a toolchain problem should not cost a boot
    crashes: list[str] = []
    while True:
        res = _validate_once(object_bytes, ops_name, params, goals, wls, rounds, budget_s or 0.0, stress_s,
                             timeout_ms, vm, say, launcher)
        crashed = res.failure_reason is not None and "the guest kernel crashed" in res.failure_reason
        if not crashed or len(crashes) >= crash_retries:
            break
        crashes.append(res.failure_reason)
        say(f"the guest kernel crashed; repeating the run in a fresh VM ({len(crashes)}/{crash_retries})", 0.0)
        vm = None  # the caller's VM (if any) is dead: boot our own
    res.retried_after = crashes
    res.durations["total"] = round(time.monotonic() - t_start, 3)
    return res


def _validate_once(object_bytes: bytes, ops_name: str, params: dict[str, str], goals: list[Goal] | None,
                   wls: list[Workload], rounds: int, budget_s: float, stress_s: float, timeout_ms: int,
                   vm, say: Progress, launcher: Launcher | None = None) -> Layer2Result:
    t_start = time.monotonic()
    own_vm = vm is None
    if own_vm:
        say("booting the sandbox VM", 0.0)
        t0 = time.monotonic()
        vm = VM(full=True).start()
        boot_s = time.monotonic() - t0
    else:
        if not getattr(vm, "full", True):
            raise BadInput("layer 2 needs the full sandbox image (VM(full=True)): the small one has no workloads")
        boot_s = 0.0
    run = _Run(vm, object_bytes, ops_name, params, wls, timeout_ms, say, launcher)
    watch = neighbours.Watch()  # from here to the end of the measurement: who else used the CPUs
    if boot_s:
        run.durations["boot"] = round(boot_s, 3)
    expected_s = budget_s or 0.0

    def tick(msg: str) -> None:
        elapsed = time.monotonic() - t_start
        say(msg, min(0.99, elapsed / max(expected_s, elapsed + 10.0)))

    loaded = False  # the candidate is attached (between a load and its unload)
    try:
        tick("setting up the guest")
        run.setup()
        tick("warm-up: each workload once (not measured)")
        run.warm_up()
        overhead_s = 0.0  # per workload, a round's cost beyond its workloads' own (load, unload, replies)
        only: list[Workload] | None = None  # after the minimum rounds: the workloads still undecided

        def switch_to(side: str) -> bool:
            """Put `side`'s scheduler in charge; False when the candidate failed to start."""
            nonlocal loaded
            if side == "candidate" and not loaded:
                tick(f"round {r}: loading {ops_name}")
                loaded = True  # even a failed start leaves a loader for unload() to stop and read
                return run.load()
            if side == "baseline" and loaded:
                run.unload()
                loaded = False
            return True

        r, dead = 0, False
        while r < MAX_ROUNDS:
            r += 1
            t_round = time.monotonic()
            for side, group in round_plan(r, only or run.workloads, ("baseline", "candidate")):
                if not switch_to(side):
                    dead = True
                    break
                names = ", ".join(w.name for w in group)
                tick(f"round {r}: {names} under {'the default scheduler' if side == 'baseline' else ops_name}")
                run.measure(side, r, group)
                if side == "candidate" and not run.enabled():
                    dead = True
                    break
            if dead:
                break
            run.rounds_done = r
            if r == 1:  # after the first round: its pairs still run back to back
                tick("starvation phase: per-task run-queue waits under the default scheduler, then the candidate")
                t_stress = time.monotonic()
                switch_to("baseline")
                run.starve("baseline")
                if not switch_to("candidate"):
                    break
                run.starve("candidate")
                if not run.enabled():
                    break
                tick(f"stress + correctness ({stress_s:g} s)")
                run.stress(stress_s)
                t_round += time.monotonic() - t_stress
                if not run.enabled():
                    break
            overhead_s = max(overhead_s, _overhead(run, only, time.monotonic() - t_round))
            if r >= rounds:
                only = _next_round(run, goals, budget_s, t_start, overhead_s)
                if not only:
                    break
        tick("unloading, checking the default scheduler is back")
        if loaded:
            run.unload()
        run.kernel_log()
    except InfrastructureError as e:  # GuestTimeout included: vm.run has killed the VM
        if not isinstance(e, GuestTimeout) and vm.alive:
            raise
        run.obs.kernel_log = _kernel_lines(vm.console(), getattr(run, "marker", None))
        run.obs.hang = _hang_reason(e, run)
        if loaded:  # it died with the candidate attached: an earlier unload's state is not the final one
            run.obs.final_state = run.obs.final_ops = None
    finally:
        host = watch.stop(getattr(vm, "pid", None))
        if own_vm:
            vm.close()
    run.durations["total"] = round(time.monotonic() - t_start, 3)

    results = run.results()
    cg = gates.correctness_gates(run.obs)
    pg = gates.performance_gates(results, wls, goals) if all(g.passed for g in cg) else []
    passed, why = gates.verdict(cg, pg)
    say("passed" if passed else f"failed: {why}", 1.0)
    return Layer2Result(passed=passed, failure_reason=why, ops_name=ops_name, params=params, correctness=cg,
                        performance=pg, workloads=results, timeline=run.obs.timeline,
                        kernel_log=run.obs.kernel_log, stress=run.obs.stress, starvation=run.obs.starvation,
                        evidence=run.obs.evidence,
                        loader_exits=run.obs.loader_exits,
                        rounds=run.rounds_done, budget_s=budget_s or None, counters=run.counters,
                        host=host, warnings=gates.noise_warnings(results) + [w for w in [host.warning()] if w],
                        durations=run.durations, kernel_version=getattr(vm, "kernel_version", None) or None)


#: what the end of a validation (unload, kernel log, power-off) costs after the last round, seconds
TAIL_S = 6.0


def _overhead(run: _Run, only: list[Workload] | None, round_s: float) -> float:
    """What a round took beyond its workloads' own time (both sides), per workload in it: a round
    switches the scheduler once per workload and asks the guest twice per workload, so a round of one
    workload costs a fifth of a full round's overhead, not all of it (charged the full round's ~8 s,
    a pipe-only round looked twice its real ~8 s, and lean_preempt's validations stopped with pipe
    undecided and 10-25 s of their budget unspent)."""
    wls = only or run.workloads
    return max(0.0, round_s - 2 * sum(run.cost.get(w.name, 0.0) for w in wls)) / max(1, len(wls))


def _next_round(run: _Run, goals: list[Goal] | None, budget_s: float, t_start: float,
                overhead_s: float) -> list[Workload]:
    """The workloads another round measures: those whose performance gate is still undecided; once none
    is, and if every gate passed, those whose verdict is not settled (gates.settled: a "same" that may
    still be a gain, or an interval wider than ±NOISY), when a
    round of just those fits in the budget; empty = stop. Settled workloads are not run again, so the
    budget goes where the interval is still open (a round of only `build` costs a third of a full one)."""
    if not budget_s:
        return []
    results = run.results()
    pg = gates.performance_gates(results, run.workloads, goals)
    open_ = {base_name(g.workload) for g in pg if not g.decided and g.workload}
    if not open_ and all(g.passed for g in pg):  # undecided gates first; a failed candidate needs no more
        open_ = {base_name(r.name) for r in results if not gates.settled(r)}
    wls = [w for w in run.workloads if w.name in open_]
    if not wls:
        return []
    cost = overhead_s * len(wls) + 2 * sum(run.cost.get(w.name, w.timeout_s) for w in wls)
    fits = time.monotonic() - t_start + cost + TAIL_S <= budget_s
    if fits:
        run.say(f"after {run.rounds_done} rounds not settled: {', '.join(w.name for w in wls)}; one more round of "
                f"{'those' if len(wls) > 1 else 'it'}", min(0.99, (time.monotonic() - t_start) / budget_s))
    return wls if fits else []


def _current_phase(run: _Run) -> str:
    return f"after {run.obs.timeline[-1].phase}" if run.obs.timeline else "during setup"


def _hang_reason(e: InfrastructureError, run: _Run) -> str:
    """What the VM's death looked like, in the kernel's words when it crashed."""
    crash = [ln.strip() for ln in run.obs.kernel_log if re.search(r"Oops|BUG:|Kernel panic|RIP: |Sched_ext:", ln)]
    where = _current_phase(run)
    if crash:
        return f"the guest kernel crashed ({where}): " + " / ".join(dict.fromkeys(crash[:4]))
    return f"{e.message} ({where})"


def aa_in_sandbox(workloads: list[str] | None = None, *, rounds: int = 3, budget_s: float | None = BUDGET_S,
                  vm=None, progress: Progress | None = None) -> tuple[list[WorkloadResult], int, float]:
    """The default scheduler against itself in one boot, in paired rounds as a validation runs them:
    the interval each workload gets when nothing differs is the smallest difference a validation can
    see. Same stopping rule as a validation (no goals); after round 1 the starvation phase runs twice
    under the default scheduler (the second as the gate's "candidate"). Returns (results, rounds,
    seconds, the two starvation sides, what else used the host's CPUs meanwhile)."""
    say = progress or (lambda msg, frac: None)
    wls = get_workloads(workloads)
    if any("$PROBE" in w.command for w in wls):
        ensure_probe()
    t_start = time.monotonic()
    own_vm = vm is None
    if own_vm:
        from ..sandbox.vm import VM

        say("booting the sandbox VM", 0.0)
        vm = VM(full=True).start()
    run = _Run(vm, b"\0", "", {}, wls, 3000, say)
    watch = neighbours.Watch()
    try:
        run.setup()
        say("warm-up: each workload once (not measured)", 0.0)
        run.warm_up()
        r, overhead_s, only = 0, 0.0, None
        while r < MAX_ROUNDS:
            r += 1
            t_round = time.monotonic()
            say(f"round {r}: each workload under the default scheduler (A), and again (A')",
                min(0.99, (t_round - t_start) / (budget_s or 60)))
            for side, group in round_plan(r, only or run.workloads, ("baseline", "again")):
                run.measure(side, r, group)
            run.rounds_done = r
            if r == 1:  # the starvation phase twice under the default scheduler: the gate's false alarms
                say("starvation phase: the default scheduler, twice", min(0.99, (time.monotonic() - t_start) /
                                                                            (budget_s or 60)))
                run.starve("baseline")
                run.starve("candidate")
            overhead_s = max(overhead_s, _overhead(run, only, time.monotonic() - t_round))
            if r >= rounds:
                only = _next_round(run, None, budget_s or 0.0, t_start, overhead_s)
                if not only:
                    break
    finally:
        host = watch.stop(getattr(vm, "pid", None))
        if own_vm:
            vm.close()
    return run.results(), run.rounds_done, time.monotonic() - t_start, run.obs.starvation, host


def validate_layer1(report, **kw) -> Layer2Result:
    """Layer 2 for an accepted Layer1Report (its stored object, ops name and parameters)."""
    if not report.accepted or not report.object_path:
        raise BadInput("layer 2 needs a scheduler that passed layer 1",
                       hint=f"layer 1 said {report.verdict} at {report.stage}")
    from pathlib import Path

    obj = Path(report.object_path)
    if not obj.exists():
        raise InfrastructureError(f"the compiled object {obj} is gone", hint="verify the scheduler again")
    return validate_in_sandbox(obj.read_bytes(), ops_name=report.ops_name or "", params=report.params, **kw)
