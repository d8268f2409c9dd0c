"""`schedcp bench policies`: every repository policy through layer 1 and layer 2, as a table and a chart.

Each policy's figures are its own A/B inside one VM boot (baseline and candidate interleaved), so a
ratio is meaningful; absolute times are not (a qemu TCG guest on a shared host). Ratios of different
policies come from different validations and are only roughly comparable: same boot, but not the
same rounds.

Writes <out_dir>/policies-ab.png (speedup per workload and policy), policies-ab.md (the table, the
machine, the date, the wall times) and policies-ab.json (every Layer2Result).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import SchedcpError
from ..repository.policies import list_policies
from ..sandbox.vm import VM
from ..verify.pipeline import verify_policy
from .runner import validate_layer1
from .models import Layer2Result, WorkloadResult
from .workloads import list_workloads

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


def bench_policies(rounds: int = 3, out_dir: Path = Path("results"), policies: list[str] | None = None,
                   console: Console | None = None) -> list[dict]:

    con = console or Console()
    names = policies or [p.name for p in list_policies() if p.kind == "schedcp" and p.source_text()]
    wl = [w.name for w in list_workloads()]
    rows: list[dict] = []
    cold_s: float | None = None
    vm = None
    t_all = time.monotonic()
    con.print(f"[dim]{TCG_NOTE}[/dim]")
    try:
        for i, name in enumerate(names):
            row: dict = {"policy": name}
            rows.append(row)
            con.print(f"[bold]{name}[/bold] ({i + 1}/{len(names)})")
            try:
                if i > 0 and (vm is None or not vm.alive):
                    if vm is not None:
                        vm.close(graceful=False)
                    vm = VM(full=True).start()
                t0 = time.monotonic()
                l1 = verify_policy(name, vm=vm)  # the first one boots its own small VM
                row["layer1"] = l1.verdict
                if not l1.accepted:
                    row["error"] = f"layer 1 {l1.verdict} at {l1.stage}: " + "; ".join(e.message for e in l1.errors[:2])
                    continue
                res = validate_layer1(l1, rounds=rounds, vm=vm,
                                      progress=lambda m, f: con.print(f"  [dim]{f:4.0%} {m}[/dim]"))
                wall = time.monotonic() - t0
                if i == 0:
                    cold_s = wall  # verify (own boot) + validate (own boot): what one `schedcp validate` costs
                row.update(result=res, wall_s=wall)
            except SchedcpError as e:
                row["error"] = str(e)
            if i == 0 and vm is None:
                vm = VM(full=True).start()  # the rest share one running VM
    finally:
        if vm is not None:
            vm.close()
    total_s = time.monotonic() - t_all

    _print_table(con, rows, wl)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = _markdown(rows, wl, rounds, cold_s, total_s)
    (out_dir / "policies-ab.md").write_text(md)
    (out_dir / "policies-ab.json").write_text(json.dumps(
        [{k: (v.model_dump(mode="json") if isinstance(v, Layer2Result) else v) for k, v in r.items()} for r in rows],
        indent=1))
    png = out_dir / "policies-ab.png"
    _chart(rows, wl, png)
    if cold_s is not None:
        con.print(f"one full validation (verify + validate, {rounds} rounds, own VM boots): {cold_s:.0f} s")
    con.print(f"all {len(rows)} policies: {total_s:.0f} s; wrote {png}, {out_dir / 'policies-ab.md'}")
    con.print(f"[dim]{TCG_NOTE}[/dim]")
    return rows


def _cell(res: Layer2Result | None, name: str) -> str:
    if res is None:
        return "–"
    w = next((x for x in res.workloads if x.name == name), None)
    if w is None or w.ratio is None:
        return "n/a"
    mark = {"better": "+", "worse": "−", "same": "="}.get(w.verdict, "?")
    return f"{w.ratio:.2f} {mark}"


def _status(row: dict) -> str:
    res: Layer2Result | None = row.get("result")
    if res is None:
        return "error: " + row.get("error", "?")
    if res.passed:
        return "pass"
    return "fail: " + (res.failure_reason or "")[:160]


def _print_table(con: Console, rows: list[dict], wl: list[str]) -> None:
    t = Table(title="candidate / baseline median (+ better, − worse, = within noise)")
    t.add_column("policy")
    for n in wl:
        t.add_column(n, justify="right")
    t.add_column("verdict")
    for r in rows:
        t.add_row(r["policy"], *[_cell(r.get("result"), n) for n in wl], _status(r)[:70])
    con.print(t)


def _markdown(rows: list[dict], wl: list[str], rounds: int, cold_s: float | None, total_s: float) -> str:
    metrics = {w.name: w for w in list_workloads()}
    res0 = next((r["result"] for r in rows if r.get("result")), None)
    lines = [
        "# Repository policies: sandbox A/B",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- machine: {_machine()}",
        f"- sandbox kernel: {res0.kernel_version if res0 else '?'}; {rounds} interleaved rounds per policy",
        f"- one full validation (layer 1 + layer 2, own VM boots): {cold_s:.0f} s" if cold_s else
        "- one full validation: not measured",
        f"- all policies: {total_s:.0f} s",
        "",
        f"> {TCG_NOTE}",
        "",
        "Cells are candidate/baseline medians (+ better, − worse, = within the run's noise). Metrics: "
        + "; ".join(f"{n} = {metrics[n].metric} ({metrics[n].direction} is better)" for n in wl) + ".",
        "",
        "| policy | " + " | ".join(wl) + " | verdict |",
        "|---|" + "---:|" * len(wl) + "---|",
    ]
    for r in rows:
        status = _status(r).replace("|", "\\|")
        lines.append(f"| {r['policy']} | " + " | ".join(_cell(r.get("result"), n) for n in wl) + f" | {status} |")
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
            k = 1 + (w.noise or 0)  # ×/÷ the run's relative noise: symmetric on the log axis
            errs.append((s - s / k, s * k - s))
        yerr = [[e[0] for e in errs], [e[1] for e in errs]]
        ax.bar(xs, ys, width, yerr=yerr, capsize=2, label=r["policy"] + ("" if res.passed else " (failed)"))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(wl)), wl)
    ax.set_yscale("log")
    ax.set_ylabel("speedup vs default scheduler (>1 = better)\nbars: ×/÷ (1 + noise)")
    ax.set_title("sched_ext policies in the sandbox VM (same-boot A/B; TCG: ratios only)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
