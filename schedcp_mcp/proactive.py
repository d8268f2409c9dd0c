"""Proactive optimize cycles: a condition on the machine starts `schedcp optimize`.

The conditions are the callbacks' (learn.callbacks.Condition): the CPU's pressure (PSI `some
avg10`) above a threshold, a deployment's latest reward below one, or the machine's behaviour no
longer like a stored profile. A condition starts a cycle on its rising edge (false -> true), as a
callback fires. What bounds the cycles, since each one boots VMs for minutes:
- a budget per cycle (the optimize request's own `budget_s`),
- a minimum interval between two cycles (a condition that flaps does not start one per flap),
- a maximum number of cycles, and how long to watch at all.

A cycle never deploys to the host: its target is the sandbox (the staging VM) or `host`, which
stops before deploying and prints the human's `schedcp deploy --token` command, as optimize always
does. Every cycle is stored (kind `watch_cycle`) with what triggered it and how it ended.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from pydantic import BaseModel, Field

from . import store
from .learn.callbacks import Condition, measure
from .optimize import OptimizeReport, OptimizeRequest

KIND = "watch_cycle"


class WatchRequest(BaseModel):
    conditions: list[Condition] = Field(min_length=1, description="a cycle starts when any rises")
    optimize: OptimizeRequest
    min_interval_s: float = Field(3600.0, ge=0, description="seconds from one cycle's start to the next's")
    max_cycles: int = Field(1, ge=1, le=100)
    interval_s: float = Field(5.0, gt=0, description="seconds between two evaluations")
    duration_s: float | None = Field(None, gt=0, description="stop watching after this long (None: until max_cycles)")


class Cycle(BaseModel):
    id: str
    created_at: float = Field(description="when the cycle started")
    ended_at: float | None = None
    trigger: str = Field(description="which condition rose, its value and threshold")
    exit_code: int | None = Field(None, description="optimize's: 0 a winner, 1 none, 2 bad input or machine")
    winner: str | None = None
    why: str = ""
    report_path: str | None = None


class WatchResult(BaseModel):
    cycles: list[Cycle] = []
    evaluations: int = 0
    stopped: str = ""


RunOptimize = Callable[[OptimizeRequest], Awaitable[OptimizeReport]]


def _describe(c: Condition, value: float | None) -> str:
    on = c.deployment_id or c.profile_id
    return f"{c.kind}{f' ({on})' if on else ''}: {value if value is None else round(value, 3)} vs threshold {c.threshold:g}"


async def watch(req: WatchRequest, run_optimize: RunOptimize, say=lambda m: None,
                sleep=None) -> WatchResult:
    """Evaluate the conditions every `interval_s`; on a rising edge, when the last cycle started at
    least `min_interval_s` ago, run one optimize cycle (awaited: cycles never overlap)."""
    import anyio

    sleep = sleep or anyio.sleep
    out, last_state = WatchResult(), [False] * len(req.conditions)
    t0, last_start = time.monotonic(), None
    while True:
        if len(out.cycles) >= req.max_cycles:
            out.stopped = f"{req.max_cycles} cycle(s) run"
            return out
        if req.duration_s is not None and time.monotonic() - t0 >= req.duration_s:
            out.stopped = f"watched {req.duration_s:g} s"
            return out
        out.evaluations += 1
        rose = None
        for i, c in enumerate(req.conditions):
            value, holds, _ = measure(c)
            if holds and not last_state[i] and rose is None:
                rose = _describe(c, value)
            last_state[i] = holds
        if rose and last_start is not None and time.monotonic() - last_start < req.min_interval_s:
            say(f"{rose}: rose, but the last cycle started {time.monotonic() - last_start:.0f} s ago "
                f"(minimum interval {req.min_interval_s:g} s): not starting one")
        elif rose:
            last_start = time.monotonic()
            out.cycles.append(await _cycle(req.optimize, rose, run_optimize, say))
            continue  # the cycle took minutes: evaluate again at once
        await sleep(req.interval_s)


async def _cycle(req: OptimizeRequest, trigger: str, run_optimize: RunOptimize, say) -> Cycle:
    cyc = Cycle(id=store.new_id("cyc"), created_at=time.time(), trigger=trigger)
    store.put(KIND, cyc)
    say(f"cycle {cyc.id}: {trigger}: optimize {', '.join(req.workloads) or 'the command'} "
        f"(budget {req.budget_s:g} s, target {req.target})")
    try:
        rep = await run_optimize(req)
        cyc.exit_code, cyc.winner, cyc.why, cyc.report_path = rep.exit_code, rep.winner, rep.why, rep.json_path
    except Exception as e:  # noqa: BLE001 — a cycle that failed is recorded; the watch goes on
        from .errors import SchedcpError

        cyc.exit_code = 2
        cyc.why = e.message if isinstance(e, SchedcpError) else f"{type(e).__name__}: {e}"
    cyc.ended_at = time.time()
    store.put(KIND, cyc)
    say(f"cycle {cyc.id}: exit {cyc.exit_code}: {cyc.why}")
    return cyc


def list_cycles(limit: int = 50) -> list[Cycle]:
    return store.list_records(KIND, Cycle, limit=limit)
