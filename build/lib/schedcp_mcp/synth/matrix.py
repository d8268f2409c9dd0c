"""A representative matrix of primitive combinations: every pair of choices on any two axes appears
in at least one spec (greedy pairwise covering over all valid combinations), so a template change
that breaks any two primitives together shows up in `schedcp bench synth` and its VM test; plus the
two documented specs (the catalog's example and lean_preempt's mechanisms)."""

from __future__ import annotations

import itertools
from functools import lru_cache

from . import primitives as prims
from .spec import EXAMPLE_SPEC, LEAN_SPEC, SchedulerSpec, TaskClass, check_spec

#: task-class sets the matrix draws from (a class axis with a few representative mixes)
CLASS_SETS: dict[str, list[TaskClass]] = {
    "none": [],
    "kthread_local": [TaskClass(match="kthread", treat="local")],
    "young_boost": [TaskClass(match="short_lived", treat="boost", slice_pct=50)],
    "comm_cgroup": [TaskClass(match="comm", pattern="stress-ng*", treat="boost"),
                    TaskClass(match="cgroup", pattern="build*", treat="boost", slice_pct=200)],
    "mixed_bg": [TaskClass(match="kthread", treat="local"),
                 TaskClass(match="comm", pattern="hackbench", treat="background", slice_pct=300),
                 TaskClass(match="short_lived", treat="boost")],
}
AXES = ("queue", "ordering", "cpu_select", "slice", "preempt", "classes")


def _choices() -> dict[str, list[str]]:
    out = {a: prims.names(a) for a in AXES[:-1]}
    out["classes"] = list(CLASS_SETS)
    return out


def _spec(combo: dict[str, str], i: int) -> SchedulerSpec:
    params: dict[str, int | bool] = {}
    if combo["queue"] in ("per_llc", "per_numa") and i % 2:
        params["cpus_per_domain"] = 1  # two emulated domains on a 2-CPU VM: exercises stealing
    return SchedulerSpec(name=f"m{i:02d}_{combo['queue'][:6]}_{combo['ordering'][:5]}",
                         queue=combo["queue"], ordering=combo["ordering"], cpu_select=combo["cpu_select"],
                         slice=combo["slice"], preempt=combo["preempt"],
                         classes=CLASS_SETS[combo["classes"]], params=params,
                         queued_wakeup=combo["cpu_select"] == "builtin" and i % 2 == 0,
                         description="matrix: " + ", ".join(f"{a}={combo[a]}" for a in AXES))


@lru_cache(maxsize=1)
def matrix() -> tuple[SchedulerSpec, ...]:
    """Valid specs covering every pair of choices of two axes (deterministic)."""
    ch = _choices()
    valid = []
    for values in itertools.product(*(ch[a] for a in AXES)):
        combo = dict(zip(AXES, values))
        if not check_spec(_spec(combo, 0)):
            valid.append(combo)
    pairs = lambda c: {(a, c[a], b, c[b]) for a, b in itertools.combinations(AXES, 2)}  # noqa: E731
    uncovered = set().union(*(pairs(c) for c in valid))
    picked: list[dict[str, str]] = []
    while uncovered:
        best = max(valid, key=lambda c: len(pairs(c) & uncovered))
        picked.append(best)
        uncovered -= pairs(best)
    refs = [SchedulerSpec.model_validate(x) for x in (EXAMPLE_SPEC, LEAN_SPEC)]  # the documented ones
    return tuple([_spec(c, i) for i, c in enumerate(picked)] + refs)
