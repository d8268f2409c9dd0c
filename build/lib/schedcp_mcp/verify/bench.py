"""`schedcp bench verify`: how long layer 1 takes, cold, warm and cached.

- cold: a throwaway VM is booted for one new object (what a first `schedcp verify` costs);
- warm: a VM is already running and the object is new (what a long-lived sandbox VM buys);
- cached: the same source and parameters again (answered from SQLite, no compiler, no VM).

Each run uses a repository policy's source with a unique comment appended, so that nothing is
served from the cache unless we ask for it. Targets on a 2-core TCG machine: cold ≤ 5 s, warm ≤ 1 s,
cached ≤ 0.1 s.
"""

from __future__ import annotations

import secrets
import statistics
import time
from typing import Callable

from .. import config
from ..errors import InfrastructureError
from ..sandbox.vm import VM
from .pipeline import verify_source

BENCH_POLICY = "fifo"


def _source() -> str:
    path = config.policies_dir() / BENCH_POLICY / f"{BENCH_POLICY}.bpf.c"
    if not path.exists():
        raise InfrastructureError(f"benchmark source {path} is missing")
    return path.read_text()


def bench_verify(warm_runs: int = 3, say: Callable[[str], None] | None = None) -> dict:
    """Measure layer 1, print a line per measurement (or hand it to `say`), return the figures."""
    say = say or (lambda line: print(line, flush=True))
    base = _source()

    def fresh() -> str:
        return base + f"\n/* bench {secrets.token_hex(8)} */\n"

    # cold: boot + compile + checks + load, end to end
    t0 = time.monotonic()
    cold = verify_source(fresh(), use_cache=False)
    cold_s = time.monotonic() - t0
    if cold.verdict != "accepted":
        raise InfrastructureError(f"the benchmark policy {BENCH_POLICY} was not accepted: "
                                  + "; ".join(e.message for e in cold.errors))
    boot_s = cold.durations.get("vm_boot", 0.0)
    say(f"cold   {cold_s:6.2f} s  (VM boot {boot_s:.2f} s, compile {cold.durations.get('compile', 0):.2f} s, "
        f"load {cold.durations.get('verifier', 0):.2f} s)")

    # warm: a VM already running, a new object each time; then cached: the same source again
    warm: list[float] = []
    warm_parts: list[dict] = []
    cached: list[float] = []
    with VM() as vm:
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
    say(f"warm   {warm_s:6.2f} s  (median of {warm_runs}; compile "
        f"{statistics.median(p.get('compile', 0) for p in warm_parts):.2f} s, load "
        f"{statistics.median(p.get('verifier', 0) for p in warm_parts):.2f} s)")
    cached_s = statistics.median(cached)
    say(f"cached {cached_s:6.3f} s  (median of {len(cached)})")
    share = boot_s / cold_s if cold_s else 0.0
    say(f"boot share of the cold verify: {share:.0%}")
    return {
        "cold_s": round(cold_s, 3), "cold_vm_boot_s": round(boot_s, 3),
        "cold_durations": cold.durations, "warm_s": round(warm_s, 3),
        "warm_runs_s": [round(x, 3) for x in warm], "cached_s": round(cached_s, 4),
        "boot_share": round(share, 3), "policy": BENCH_POLICY, "kernel_version": cold.kernel_version,
        "targets": {"cold_s": 5.0, "warm_s": 1.0, "cached_s": 0.1},
    }
