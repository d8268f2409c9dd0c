"""`schedcp bench verify`: how long layer 1 takes, cold, warm and cached.

- cold: a throwaway VM is started for one new object (what a first `schedcp verify` costs): restored
  from the image's saved idle-guest state (sandbox/vmstate.py), and — the baseline, measured in the
  same run, interleaved with it — booted as before the saved state existed;
- warm: a VM is already running and the object is new (what a long-lived sandbox VM buys);
- cached: the same source and parameters again (answered from SQLite, no compiler, no VM).

Each run uses a repository policy's source with a unique comment appended, so that nothing is
served from the cache unless we ask for it. Before measuring, a saved state is made when there is
none (a boot and a save, untimed: that is the first verify after an image build). Targets on a quiet
2-core TCG machine: cold ≤ 1.5 s, warm ≤ 0.5 s, cached ≤ 0.1 s. The machine's load average is part
of the result: a shared machine's figures say little without it.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .. import config
from ..errors import InfrastructureError
from ..sandbox.vm import VM
from ..verify.pipeline import verify_source

BENCH_POLICY = "fifo"
TARGETS = {"cold_s": 1.5, "warm_s": 0.5, "cached_s": 0.1}


def _source() -> str:
    path = config.policies_dir() / BENCH_POLICY / f"{BENCH_POLICY}.bpf.c"
    if not path.exists():
        raise InfrastructureError(f"benchmark source {path} is missing")
    return path.read_text()


@contextmanager
def _restore(on: bool) -> Iterator[None]:
    """Run the verify path with saved-state restores on (the default) or off (always boot)."""
    old = os.environ.get("SCHEDCP_VM_RESTORE")
    os.environ["SCHEDCP_VM_RESTORE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SCHEDCP_VM_RESTORE", None)
        else:
            os.environ["SCHEDCP_VM_RESTORE"] = old


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_verify(runs: int = 3, warm_runs: int = 3, say: Callable[[str], None] | None = None) -> dict:
    """Measure layer 1, print a line per measurement (or hand it to `say`), return the figures."""
    say = say or (lambda line: print(line, flush=True))
    base = _source()
    load_before = _loadavg()

    def fresh() -> str:
        return base + f"\n/* bench {secrets.token_hex(8)} */\n"

    # the saved state: made now when there is none (what the first verify of an image pays)
    with VM(restore=True) as prep:
        state = {"path": str(prep.state_path()), "made_in_this_run": prep.boot_path == "boot",
                 "note": prep.restore_note, "save_s": round(prep.state_save_s, 3)}
    try:
        state["bytes"] = os.path.getsize(state["path"])
    except OSError:
        state["bytes"] = 0
    if state["made_in_this_run"]:
        say(f"saved VM state: made now ({state['note'].lstrip('; ')})")

    # cold, restored and booted (the baseline), interleaved so that both see the same machine
    cold: dict[str, list[tuple[float, dict, str]]] = {"restore": [], "boot": []}
    for _ in range(runs):
        for mode in ("restore", "boot"):
            with _restore(mode == "restore"):
                t0 = time.monotonic()
                r = verify_source(fresh(), use_cache=False)
                dt = time.monotonic() - t0
            if r.verdict != "accepted":
                raise InfrastructureError(f"the benchmark policy {BENCH_POLICY} was not accepted: "
                                          + "; ".join(e.message for e in r.errors))
            path = "restore" if "vm_restore" in r.durations else "boot"
            cold[mode].append((dt, r.durations, path))

    def summary(rows: list[tuple[float, dict, str]]) -> dict:
        times = [t for t, _, _ in rows]
        med = sorted(rows, key=lambda x: x[0])[len(rows) // 2]
        d = med[1]
        return {"s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times],
                "paths": [p for _, _, p in rows], "start_s": round(d.get("vm_restore", d.get("vm_boot", 0.0)), 3),
                "compile_s": round(d.get("compile", 0.0), 3), "load_s": round(d.get("verifier", 0.0), 3),
                "durations": d}

    fast, slow = summary(cold["restore"]), summary(cold["boot"])
    fast_path = "restore" if all(p == "restore" for p in fast["paths"]) else "boot"
    say(f"cold   {fast['s']:6.2f} s  ({fast_path}: VM start {fast['start_s']:.2f} s, compile "
        f"{fast['compile_s']:.2f} s, load {fast['load_s']:.2f} s; median of {runs})")
    say(f"  baseline, booted: {slow['s']:6.2f} s  (VM boot {slow['start_s']:.2f} s, compile "
        f"{slow['compile_s']:.2f} s, load {slow['load_s']:.2f} s; median of {runs})")

    # warm: a VM already running, a new object each time; then cached: the same source again
    warm: list[float] = []
    warm_parts: list[dict] = []
    cached: list[float] = []
    with VM(restore=True) as vm:
        warm_path = vm.boot_path
        for _ in range(warm_runs):
            t0 = time.monotonic()
            r = verify_source(fresh(), vm=vm, use_cache=False)
            warm.append(time.monotonic() - t0)
            warm_parts.append(r.durations)
        src = fresh()
        verify_source(src, vm=vm)
        for _ in range(5):
            t0 = time.monotonic()
            r = verify_source(src, vm=vm)
            cached.append(time.monotonic() - t0)
            if not r.cached:
                raise InfrastructureError("a repeat verify missed the cache")
    warm_s = statistics.median(warm)
    warm_compile = statistics.median(p.get("compile", 0) for p in warm_parts)
    warm_load = statistics.median(p.get("verifier", 0) for p in warm_parts)
    say(f"warm   {warm_s:6.2f} s  (median of {warm_runs}; compile {warm_compile:.2f} s, load {warm_load:.2f} s)")
    cached_s = statistics.median(cached)
    say(f"cached {cached_s:6.3f} s  (median of {len(cached)})")
    load_after = _loadavg()
    say(f"restored cold verify: {slow['s'] / fast['s']:.1f}x faster than booted; load average "
        f"{' '.join(map(str, load_before))} before, {' '.join(map(str, load_after))} after")
    return {
        "cold_s": fast["s"], "cold_boot_path": fast_path, "cold": fast,
        "baseline_boot_s": slow["s"], "baseline": slow,
        "speedup": round(slow["s"] / fast["s"], 2) if fast["s"] else None,
        "warm_s": round(warm_s, 3), "warm_runs_s": [round(x, 3) for x in warm], "warm_boot_path": warm_path,
        "warm_compile_s": round(warm_compile, 3), "warm_load_s": round(warm_load, 3),
        "cached_s": round(cached_s, 4),
        "saved_state": state, "loadavg_before": load_before, "loadavg_after": load_after,
        "cpus": os.cpu_count(), "policy": BENCH_POLICY, "kernel_version": r.kernel_version,
        "targets": TARGETS,
    }
