"""Benchmarks of layer 2 itself and of the policies, as tables that carry their intervals.

`schedcp bench policies`: every repository policy, and the kernel's own example schedulers
(`kernel:scx_simple`, compiled from the sandbox's linux-source tools/sched_ext on this machine, never
copied into the project), through layer 1 and layer 2. Each row is its own paired A/B inside one VM
boot, so its speedups and intervals are meaningful; absolute times are not (a qemu TCG guest on a
shared host). Writes <out_dir>/policies-ab.png, policies-ab.md and policies-ab.json.

`schedcp bench aa`: the default scheduler against itself (the interval a validation gets when nothing
differs). `schedcp bench stability`: one policy validated in N fresh boots, and how often a verdict
flipped between them.

The runs themselves are supervised jobs (`schedcp_mcp/bench/runs.py`: a validation per policy, per
fresh boot); this module measures A/A and renders what the runs measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import config
from ..errors import BadInput
from ..models import in_words, times
from ..repository.policies import list_policies
from ..validate import gates
from ..validate.runner import BUDGET_S
from ..validate.models import Layer2Result, WorkloadResult
from ..workloads import list_workloads

#: kernel example schedulers that verify and run under our loader (see DESIGN: scx_pair needs a sized
#: map, scx_userland its userspace half, scx_central is a bad fit for 2 vCPUs)
KERNEL_PEERS = ["kernel:scx_simple"]
KERNEL_PREFIX = "kernel:"

TCG_NOTE = ("Timings come from a qemu VM (TCG: no KVM here) on a shared 2-core host: absolute figures "
            "are distorted and only the ratios within one validation (same boot, interleaved rounds) "
            "are meaningful.")


def speedup(w: WorkloadResult) -> float | None:
    """> 1 = the candidate is better, whatever the metric's direction."""
    if w.ratio is None or w.ratio <= 0:
        return None
    return 1.0 / w.ratio if w.direction == "lower" else w.ratio


def _machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node() or 'host'}: {os.cpu_count()} CPUs ({cpu or 'unknown CPU'}), Linux {platform.release()}"


def policy_names(policies: list[str] | None = None) -> list[str]:
    """The policies `bench policies` compares: the given ones, else every repository policy with a
    source and the kernel's examples."""
    return policies or [p.name for p in list_policies() if p.kind == "schedcp" and p.source_text()] + KERNEL_PEERS


def peer_source(name: str) -> str | None:
    """The source of a kernel example scheduler (`kernel:scx_simple`); None for a repository policy."""
    if not name.startswith(KERNEL_PREFIX):
        return None
    src = config.sandbox_dir() / "sched_ext" / f"{name[len(KERNEL_PREFIX):]}.bpf.c"
    if not src.exists():
        raise BadInput(f"no kernel example {src.name} in {src.parent}",
                       hint="`schedcp sandbox build` extracts tools/sched_ext from linux-source")
    return src.read_text()


def report_policies(rows: list[dict], rounds: int = 3, out_dir: Path = Path("results"),
                    console: Console | None = None, budget_s: float | None = None,
                    cold_s: float | None = None, total_s: float = 0.0, stem: str = "policies-ab",
                    title: str = "Repository policies and kernel examples: sandbox A/B") -> list[dict]:
    """Rows of measured policies ({policy, layer1, result: Layer2Result | error, wall_s}, each its
    own validation): each one's interval table, the comparison, and its markdown, JSON and chart."""
    con = console or Console()
    budget = BUDGET_S if budget_s is None else budget_s
    measured = {w.name for r in rows if r.get("result") for w in r["result"].workloads}
    wl = [w.name for w in list_workloads() if (w.default and not measured) or w.name in measured]
    con.print(f"[dim]{TCG_NOTE}[/dim]")
    for i, row in enumerate(rows):
        con.print(f"[bold]{row['policy']}[/bold] ({i + 1}/{len(rows)})")
        res = row.get("result")
        if res is not None:
            con.print(interval_table(res.workloads, f"{row['policy']}: {res.rounds} paired rounds, "
                                     f"{'pass' if res.passed else 'fail'}"))

    _print_table(con, rows, wl)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = _markdown(rows, wl, rounds, budget, cold_s, total_s, title)
    (out_dir / f"{stem}.md").write_text(md)
    (out_dir / f"{stem}.json").write_text(json.dumps(
        [{k: (v.model_dump(mode="json") if isinstance(v, Layer2Result) else v) for k, v in r.items()} for r in rows],
        indent=1))
    png = out_dir / f"{stem}.png"
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        _chart(rows, wl, png)
    else:
        con.print("no chart: matplotlib is not installed (`pip install 'schedcp[charts]'`)")
    if cold_s is not None:
        con.print(f"one full validation (verify + validate, own VM boots): {cold_s:.0f} s")
    con.print(f"all {len(rows)} rows: {total_s:.0f} s; wrote {png}, {out_dir / (stem + '.md')}")
    con.print(f"[dim]{TCG_NOTE}[/dim]")
    return rows


def _w(w) -> dict:
    return w.model_dump() if isinstance(w, WorkloadResult) else w


def fmt_interval(w) -> str:
    """`1.32x [1.21, 1.44] +`: speedup (> 1 = candidate better), its interval, the verdict's mark."""
    d = _w(w)
    if d.get("speedup") is None:
        return "n/a"
    mark = {"better": "+", "worse": "−", "same": "=", "undecided": "?"}.get(d["verdict"], "!")
    # one pair has an unbounded interval: inf, or null once it went through JSON (a job's result)
    lo, hi = d.get("speedup_low") or 0.0, d.get("speedup_high")
    hi_s = "inf" if hi is None or hi == float("inf") else times(hi)[:-1]
    # tiny factors keep their digits (0.00099x, not 0.00x): a scheduler 1000x worse must read so
    return f"{times(d['speedup'])} [{times(lo)[:-1] if lo else '0'}, {hi_s}] {mark}"


def interval_table(workloads: list, title: str) -> Table:
    """One row per workload: medians, speedup with its interval, rounds, verdict."""
    t = Table("workload", "metric", "baseline", "candidate", "vs default",
              f"[{gates.LEVEL:.0%} interval] verdict", "rounds", "verdict", title=f"{title}; vs default: > 1 = better")
    for w in workloads:
        d = _w(w)
        b, c = d.get("baseline_stats") or {}, d.get("candidate_stats") or {}
        t.add_row(d["name"], f"{d['metric']} ({d['unit']})", f"{b.get('median', float('nan')):.4g}",
                  f"{c.get('median', float('nan')):.4g}", in_words(d.get("speedup")), fmt_interval(d),
                  str(d.get("pairs", 0)), d["verdict"])
    return t


#: rounds of `schedcp bench aa`: enough pairs that the per-round noise, not the t quantile of a
#: few degrees of freedom, decides the interval
AA_ROUNDS = 10


def rounds_for(sd: float, margin: float = gates.MARGIN, cap: int = 99) -> int | None:
    """The fewest paired rounds whose t-interval half-width is within ±margin at this per-pair
    standard deviation of the log ratio (None beyond `cap`)."""
    target = math.log(1 + margin)
    for n in range(2, cap + 1):
        if gates._t_quantile((1 + gates.LEVEL) / 2, n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None


def bench_aa(rounds: int = AA_ROUNDS, budget_s: float | None = 0.0, workloads: list[str] | None = None,
             quiet: bool = False, console: Console | None = None, progress=None) -> dict:
    """Default vs default in one boot; every workload's interval should lie within ±MARGIN. Also
    prints the per-pair noise (sd of the log ratios) and the rounds a validation needs to resolve
    ±MARGIN at that noise. Runs exactly `rounds` rounds by default (budget 0)."""
    from ..validate.runner import BUDGET_S, aa_in_sandbox

    con = console or Console(quiet=quiet)
    budget = BUDGET_S if budget_s is None else budget_s
    results, n, secs, starve, host = aa_in_sandbox(workloads, rounds=rounds, budget_s=budget,
                                             progress=progress or (lambda m, f: con.print(f"  [dim]{m}[/dim]")))
    lo_ok, hi_ok = 1 / (1 + gates.MARGIN), 1 + gates.MARGIN
    rows = []
    for r in results:
        within = r.speedup is not None and r.speedup_low >= lo_ok and r.speedup_high <= hi_ok
        d = gates.log_ratios(r.baseline, r.candidate)
        sd = statistics.stdev(d) if len(d) > 1 else None
        rows.append({"workload": r.name, "metric": r.metric, "pairs": r.pairs, "ratio": r.ratio, "pair_sd": sd,
                     "rounds_for_margin": rounds_for(sd) if sd is not None else None,
                     "ratio_low": r.ratio_low, "ratio_high": r.ratio_high, "half_width": r.noise,
                     "within_margin": within, "errors": r.errors, "a": r.baseline, "a_again": r.candidate})
    t = Table("workload", "metric", "A'/A ratio", f"{gates.LEVEL:.0%} interval", "± half-width", "rounds",
              f"within ±{gates.MARGIN:.0%}", "pair sd", f"rounds for ±{gates.MARGIN:.0%}",
              title=f"A/A: default scheduler vs itself, one boot, {n} paired rounds, {secs:.0f} s")
    t.columns[0].no_wrap, t.columns[0].min_width = True, max(len(r.name) for r in results) if results else 9
    for r, row in zip(results, rows):
        if r.ratio is None:
            t.add_row(r.name, r.metric, "n/a", "n/a", "n/a", str(r.pairs), "no: " + "; ".join(r.errors)[:60], "", "")
            continue
        t.add_row(r.name, r.metric, f"{r.ratio:.3f}", f"[{r.ratio_low:.3f}, {r.ratio_high:.3f}]",
                  f"±{r.noise:.1%}", str(r.pairs), "yes" if row["within_margin"] else "NO",
                  f"{row['pair_sd']:.3f}" if row["pair_sd"] is not None else "n/a",
                  str(row["rounds_for_margin"] or "> 99"))
    con.print(t)
    gate = gates.starvation_gate(starve)
    con.print(f"starvation gate, default vs default: {'pass' if gate.passed else 'FALSE ALARM'} — {gate.reason}")
    for side in starve:
        con.print(f"  {side.line()}")
    con.print(f"host: other processes used {host.others_cpu:.2f} of {host.cpus} CPUs while this measured")
    if host.warning():
        con.print(f"[yellow]warning[/yellow] {host.warning()}")
    return {"rounds": n, "seconds": round(secs, 1), "budget_s": budget, "margin": gates.MARGIN,
            "host": host.model_dump(),
            "level": gates.LEVEL, "workloads": rows, "within_margin": all(x["within_margin"] for x in rows),
            "starvation": {"passed": gate.passed, "reason": gate.reason,
                           "sides": [x.model_dump(exclude={"worst"}) for x in starve]}}


def starve_cell(res: Layer2Result) -> str:
    """The starvation phase of one validation in a few words: the candidate's longest run-queue wait and
    its starved tasks (the default scheduler's beside it), or the watchdog's stall."""
    stall = next((g for g in res.correctness if g.name == "no_stall" and not g.passed), None)
    if stall:
        return "STALL (watchdog)"
    by = {s.side: s for s in res.starvation}
    c, b = by.get("candidate"), by.get("baseline")
    if c is None or c.error:
        return "not measured"
    base = f" (default {b.max_ms:.0f} ms, {len(b.starved)})" if b and not b.error else ""
    return f"{c.max_ms:.0f} ms, {len(c.starved)} starved{base}"


def count_flips(verdicts: dict[str, list[str]], passes: list[bool]) -> tuple[list[str], int]:
    """(workloads whose verdict differed between runs, flips): one flip per such workload, plus one
    when pass/fail differed."""
    flipped = [n for n, v in verdicts.items() if len(set(v)) > 1]
    return flipped, len(flipped) + (len(set(passes)) > 1)


def count_contradictions(verdicts: dict[str, list[str]], passes: list[bool]) -> tuple[list[str], int]:
    """The flips whose verdicts cannot both be true: a workload one run found worse (harm beyond the
    margin) and another same or better (no such harm), plus a pass/fail that differed. better ↔ same is
    a flip but not a contradiction: "same" claims no harm beyond the margin, not the absence of a gain,
    and a workload whose true gain is a few per cent (pipe under lean_preempt: 1.02-1.10x) lands on
    either side of 1.0 from run to run at any affordable interval width."""
    bad = [n for n, v in verdicts.items() if "worse" in v and {"same", "better"} & set(v)]
    return bad, len(bad) + (len(set(passes)) > 1)


def bench_stability(policy: str, measured: list[Layer2Result], rounds: int = 3, budget_s: float | None = None,
                    out_dir: Path | None = None, quiet: bool = False, console: Console | None = None) -> dict:
    """One policy validated in fresh VM boots (`measured`: one validation each): per run the pass/fail
    and every workload's verdict; a flip is a workload whose verdict is not the same in every run (or
    a pass/fail that differs)."""
    con = console or Console(quiet=quiet)
    budget = BUDGET_S if budget_s is None else budget_s
    runs = len(measured)
    results: list[Layer2Result] = []
    for i in range(runs):
        con.print(f"[bold]run {i + 1}/{runs}[/bold]: {policy} in a fresh boot")
        res = measured[i]
        results.append(res)
        con.print(interval_table(res.workloads, f"run {i + 1}: {res.rounds} paired rounds, "
                                 f"{'pass' if res.passed else 'fail: ' + (res.failure_reason or '')[:80]}"))
    names = [w.name for w in results[0].workloads]
    verdicts = {n: [next((w.verdict for w in r.workloads if w.name == n), "missing") for r in results]
                for n in names}
    passes = [r.passed for r in results]
    flipped, flips = count_flips(verdicts, passes)
    _, contradictions = count_contradictions(verdicts, passes)
    t = Table("workload", *[f"run {i + 1}" for i in range(runs)], "flipped",
              title=f"stability of {policy}: {runs} fresh boots")
    for n in names:
        t.add_row(n, *[fmt_interval(next(w for w in r.workloads if w.name == n)) for r in results],
                  "YES" if n in flipped else "no")
    t.add_row("starvation", *[starve_cell(r) for r in results], "")
    t.add_row("verdict", *["pass" if p else "fail" for p in passes], "YES" if len(set(passes)) > 1 else "no")
    con.print(t)
    rate = flips / (len(names) + 1)
    summary = (f"flips: {flips} of {len(names) + 1} verdicts (flip rate {rate:.0%}); contradictions "
               f"(worse in one run, same or better in another; or pass/fail): {contradictions}")
    con.print(summary)
    out = {"policy": policy, "runs": runs, "passes": passes, "verdicts": verdicts, "flipped": flipped,
           "flips": flips, "flip_rate": rate, "contradictions": contradictions,
           "results": [{"passed": r.passed, "rounds": r.rounds, "failure_reason": r.failure_reason,
                        "workloads": [{k: w.model_dump()[k] for k in ("name", "speedup", "speedup_low",
                                                                      "speedup_high", "pairs", "verdict")}
                                      for w in r.workloads], "counters": r.counters,
                        "starvation": starve_cell(r),
                        "total_s": r.durations.get("total")} for r in results]}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"stability-{policy.replace(':', '_')}"
        stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
        lines = [f"# Stability of {policy}: {runs} fresh boots", "",
                 f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}",
                 f"- machine: {_machine()}", f"- budget {budget:g} s per validation, at least {rounds} rounds", "",
                 "| workload | " + " | ".join(f"run {i + 1}" for i in range(runs)) + " | flipped |",
                 "|---|" + "---|" * runs + "---|"]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(fmt_interval(next(w for w in r.workloads if w.name == n))
                                                  for r in results) + f" | {'YES' if n in flipped else 'no'} |")
        lines.append("| starvation | " + " | ".join(starve_cell(r) for r in results) + " | |")
        lines.append("| verdict | " + " | ".join("pass" if p else "fail" for p in passes)
                     + f" | {'YES' if len(set(passes)) > 1 else 'no'} |")
        lines += ["", summary, ""]
        stem.with_suffix(".md").write_text("\n".join(lines))
    return out


def _cell(res: Layer2Result | None, name: str) -> str:
    if res is None:
        return "–"
    w = next((x for x in res.workloads if x.name == name), None)
    return "n/a" if w is None else fmt_interval(w)


def _status(row: dict) -> str:
    res: Layer2Result | None = row.get("result")
    if res is None:
        return "error: " + row.get("error", "?")
    if res.passed:
        return "pass"
    return "fail: " + (res.failure_reason or "")[:160]


def _print_table(con: Console, rows: list[dict], wl: list[str]) -> None:
    t = Table(title=f"speedup vs the default scheduler [{gates.LEVEL:.0%} interval] "
                    "(+ better, = same, − worse, ? undecided)")
    t.add_column("policy")
    for n in wl:
        t.add_column(n, justify="right")
    t.add_column("rounds", justify="right")
    t.add_column("verdict")
    for r in rows:
        res = r.get("result")
        t.add_row(r["policy"], *[_cell(res, n) for n in wl], str(res.rounds) if res else "-", _status(r)[:60])
    con.print(t)


def _markdown(rows: list[dict], wl: list[str], rounds: int, budget_s: float, cold_s: float | None,
              total_s: float, title: str = "Repository policies and kernel examples: sandbox A/B") -> str:
    metrics = {w.name: w for w in list_workloads()}
    res0 = next((r["result"] for r in rows if r.get("result")), None)
    lines = [
        f"# {title}",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- machine: {_machine()}",
        f"- sandbox kernel: {res0.kernel_version if res0 else '?'}; " + (
            f"at least {rounds} paired rounds per policy, more while a workload is undecided, within {budget_s:g} s "
            "per validation" if budget_s else f"exactly {rounds} paired rounds per policy (budget 0)"),
        f"- one full validation (layer 1 + layer 2, own VM boots): {cold_s:.0f} s" if cold_s else
        "- one full validation: not measured",
        f"- all policies: {total_s:.0f} s",
        "",
        f"> {TCG_NOTE}",
        "",
        f"Cells: speedup vs the default scheduler (> 1 = better), its {gates.LEVEL:.0%} t-interval over "
        f"paired rounds, and the verdict (+ better: the interval above {1 + gates.MARGIN:g}, = same: no harm "
        f"beyond {gates.MARGIN:.0%}, − worse: the interval below 1/{1 + gates.MARGIN:g}, ? undecided). Metrics: "
        + "; ".join(f"{n} = {metrics[n].metric} ({metrics[n].direction} is better)" for n in wl) + ".",
        "",
        "| policy | " + " | ".join(wl) + " | rounds | verdict |",
        "|---|" + "---:|" * len(wl) + "---:|---|",
    ]
    for r in rows:
        status = _status(r).replace("|", "\\|")
        res = r.get("result")
        lines.append(f"| {r['policy']} | " + " | ".join(_cell(res, n) for n in wl)
                     + f" | {res.rounds if res else '-'} | {status} |")
    counted = [(r["policy"], r["result"].counters) for r in rows if r.get("result") and r["result"].counters]
    if counted:
        lines += ["", "Policy counters over the candidate's measured runs:", ""]
        lines += [f"- {p}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for p, c in counted]
    lines.append("")
    return "\n".join(lines)


def _chart(rows: list[dict], wl: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("result")]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(wl) + 2), 4.5))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        res: Layer2Result = r["result"]
        by = {w.name: w for w in res.workloads}
        xs, ys, errs = [], [], []
        for j, n in enumerate(wl):
            w = by.get(n)
            s = speedup(w) if w else None
            if s is None:
                continue
            xs.append(j + (i - (len(ok) - 1) / 2) * width)
            ys.append(s)
            # unbounded (one pair): inf, or None once the result went through JSON
            hi = w.speedup_high if w.speedup_high not in (None, float("inf")) else s * 10
            errs.append((s - (w.speedup_low or 0.0), hi - s))
        yerr = [[e[0] for e in errs], [e[1] for e in errs]]
        ax.bar(xs, ys, width, yerr=yerr, capsize=2, label=r["policy"] + ("" if res.passed else " (failed)"))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(wl)), wl)
    ax.set_yscale("log")
    ax.set_ylabel("speedup vs default scheduler (>1 = better)\nbars: 95% interval")
    ax.set_title("sched_ext policies in the sandbox VM (same-boot A/B; TCG: ratios only)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
