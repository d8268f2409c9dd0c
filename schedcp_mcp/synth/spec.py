"""A scheduler spec: one primitive per axis, task classes, knob values — checked before rendering.

`check_spec` returns every problem at once (unknown primitive, incompatible combination, out-of-range
or unknown parameter, a bad pattern), each naming the field and saying why and what to do, so an
agent can fix a spec in one go. `validate_spec` raises `SpecRefused` (a `BadInput`) carrying them.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import BadInput
from ..repository.policies import Parameter
from ..repository.provenance import SchedulerSpec, TaskClass  # noqa: F401 (the spec types, re-exported)
from . import primitives as prims

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,23}\Z")
#: comm / cgroup patterns are rendered into C: only these characters, so nothing can escape the string
PATTERN_RE = re.compile(r"^[A-Za-z0-9_.:/+-]{1,15}\*?\Z")

#: what lean_preempt (this repository's hackbench/build winner) is made of, as a spec
LEAN_SPEC: dict[str, Any] = {
    "name": "gen_lean", "description": "lean_preempt's mechanisms: builtin global FIFO, no "
    "select_cpu, hog wakeup preemption, queued wakeups",
    "queue": "builtin_global", "ordering": "fifo", "cpu_select": "builtin", "slice": "fixed",
    "preempt": "hog", "queued_wakeup": True, "params": {"slice_ns": 5000000},
}

EXAMPLE_SPEC: dict[str, Any] = {
    "name": "gen_latency",
    "description": "deadline EDF with guarded wakeup preemption for wakeup latency under CPU hogs",
    "queue": "global", "ordering": "deadline", "cpu_select": "default", "slice": "scaled",
    "preempt": "wakeup",
    "classes": [{"match": "kthread", "treat": "local"}],
    "params": {"slice_ns": 3000000, "preempt_min_ns": 500000},
}


class SpecProblem(BaseModel):
    field: str = Field(description="where in the spec, e.g. 'queue', 'params.slice_ns', 'classes[1]'")
    message: str = Field(description="what is wrong and what to do")


class SpecRefused(BadInput):
    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("scheduler spec refused: " + "; ".join(f"{p.field}: {p.message}" for p in problems),
                         "see list_primitives (schedcp primitives) for the choices, their knobs and ranges")


AXIS_FIELDS = ("queue", "ordering", "cpu_select", "slice", "preempt")


def chosen(spec: SchedulerSpec) -> list[prims.Primitive]:
    """The primitives a (valid) spec uses: one per axis, then one per distinct class match."""
    out = [prims.get(a, getattr(spec, a)) for a in AXIS_FIELDS]
    seen: list[str] = []
    for c in spec.classes:
        if c.match not in seen:
            seen.append(c.match)
            out.append(prims.get("task_class", c.match))
    return [p for p in out if p is not None]


def knob_params(spec: SchedulerSpec) -> list[Parameter]:
    """Every knob of the spec's scheduler with the spec's value as its default (in rendering order)."""
    out = list(prims.COMMON_PARAMS)
    for p in chosen(spec):
        out += [k for k in p.params if k.name not in {o.name for o in out}]
    if any(c.treat == "background" for c in spec.classes):
        out += prims.CLASS_PARAMS
    for i, c in enumerate(spec.classes):
        out.append(Parameter(name=f"class{i}_slice_pct", type="u32", default=c.slice_pct, min=10, max=1000,
                             description=f"slice of class {i} ({c.match}"
                             + (f" {c.pattern}" if c.pattern else "") + "), percent"))
    given = spec.params
    return [k.model_copy(update={"default": given[k.name]}) if k.name in given else k for k in out]


def _near(word: str, options: list[str]) -> str:
    m = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def check_spec(spec: SchedulerSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    bad = lambda field, msg: problems.append(SpecProblem(field=field, message=msg))  # noqa: E731

    if len(spec.description) > 400 or "*/" in spec.description or not spec.description.isprintable():
        bad("description", "one printable line of at most 400 characters, without '*/' (it goes into "
                           "the source's header comment)")
    if not NAME_RE.match(spec.name):
        bad("name", f"{spec.name!r} is not a scheduler name: 2-24 chars, lowercase letters, digits, "
                    "underscore, starting with a letter")
    for axis in AXIS_FIELDS:
        value, known = getattr(spec, axis), prims.names(axis)
        if value not in known:
            bad(axis, f"unknown {axis} primitive {value!r}{_near(value, known)}; known: {', '.join(known)}")
    if len(spec.classes) > prims.MAX_CLASSES:
        bad("classes", f"{len(spec.classes)} task classes; at most {prims.MAX_CLASSES}")
    class_names = prims.names("task_class")
    for i, c in enumerate(spec.classes):
        f = f"classes[{i}]"
        if c.match not in class_names:
            bad(f + ".match", f"unknown task class {c.match!r}{_near(c.match, class_names)}; "
                              f"known: {', '.join(class_names)}")
        if c.treat not in prims.CLASS_TREATMENTS:
            bad(f + ".treat", f"unknown treatment {c.treat!r}; known: {', '.join(prims.CLASS_TREATMENTS)}")
        if c.match in ("comm", "cgroup"):
            if not c.pattern or not PATTERN_RE.match(c.pattern):
                bad(f + ".pattern", f"{c.match} needs a pattern: 1-15 of letters, digits, _ . : / + -, "
                                    f"optionally ending in '*' (got {c.pattern!r})")
        elif c.pattern is not None:
            bad(f + ".pattern", f"a {c.match} class takes no pattern")
        if c.treat == "local" and c.match != "kthread":
            bad(f + ".treat", "treat 'local' is only for kthread classes: dispatching any other task "
                              "straight to its CPU skips the queue and can starve others")
        if c.treat == "background" and spec.ordering == "fifo":
            bad(f + ".treat", "background needs ordering vtime or deadline (a fifo queue has no key "
                              "to push a task back by); choose ordering vtime")
        if not 10 <= c.slice_pct <= 1000:
            bad(f + ".slice_pct", f"{c.slice_pct} is out of range 10..1000")
    dupes = {(c.match, c.pattern) for c in spec.classes
             if sum((d.match, d.pattern) == (c.match, c.pattern) for d in spec.classes) > 1}
    for m, pat in sorted(dupes, key=str):
        bad("classes", f"two classes match {m}{' ' + pat if pat else ''}: the second would never apply")

    # incompatible combinations
    if spec.preempt == "wakeup" and spec.ordering == "fifo":
        bad("preempt", "wakeup preemption compares the woken task's deadline/vtime with the running "
                       "task's, and fifo ordering has none; choose ordering vtime or deadline, or "
                       "preempt kick_idle")
    if spec.queue == "builtin_global" and spec.ordering != "fifo":
        bad("ordering", "the kernel's global queue (builtin_global) is FIFO only; choose ordering fifo "
                        "or queue global")
    if spec.queue == "builtin_global" and spec.slice == "scaled":
        bad("slice", "scaled slices count the queue, and the kernel's global queue cannot be counted "
                     "from BPF; choose queue global or slice fixed/interactive")
    if spec.queued_wakeup and spec.cpu_select != "builtin":
        bad("queued_wakeup", "queued wakeups are only offered with cpu_select builtin (no select_cpu "
                             "callback), the combination lean_preempt measured; with a select_cpu of "
                             "our own they were not measured")
    if problems:
        return problems  # the parameter checks below need known primitives

    # parameters: known to a chosen primitive, typed, in range; cross-parameter rules
    knobs = {k.name: k for k in knob_params(spec.model_copy(update={"params": {}}))}
    for name, value in spec.params.items():
        k = knobs.get(name)
        if k is None:
            owners = [f"{p.axis} {p.name}" for p in prims.PRIMITIVES if any(q.name == name for q in p.params)]
            bad(f"params.{name}", f"no chosen primitive has a knob {name!r}"
                + (f" (it belongs to {', '.join(owners)})" if owners else _near(name, list(knobs)))
                + f"; this spec's knobs: {', '.join(knobs)}")
            continue
        if k.type == "bool" and not isinstance(value, bool):
            bad(f"params.{name}", f"{name} is a bool: give true or false, not {value!r}")
            continue
        if k.type != "bool" and isinstance(value, bool):
            bad(f"params.{name}", f"{name} is a {k.type}: give a number, not {value!r}")
            continue
        try:
            k.check(value)
        except BadInput as e:
            bad(f"params.{name}", f"{e.message}: {e.hint}")
    if any(p.field.startswith("params.") for p in problems):
        return problems
    val = {k.name: int(k.default) for k in knob_params(spec)}
    if spec.slice == "scaled" and val["slice_min_ns"] > val["slice_ns"]:
        bad("params.slice_min_ns", f"slice_min_ns {val['slice_min_ns']} exceeds slice_ns {val['slice_ns']}")
    if spec.preempt == "wakeup" and val["preempt_min_ns"] >= val["slice_ns"]:
        bad("params.preempt_min_ns", f"preempt_min_ns {val['preempt_min_ns']} >= slice_ns {val['slice_ns']}: "
            "no task would ever have run long enough to be preempted")
    if spec.preempt == "kick_idle" and spec.queue == "per_cpu" and not val["steal"]:
        bad("preempt", "kick_idle wakes idle CPUs so that they take queued work; per-CPU queues with "
                       "steal off never let them: set steal true or preempt none")
    return problems


def validate_spec(data: SchedulerSpec | dict[str, Any]) -> SchedulerSpec:
    """A checked spec, or `SpecRefused` listing every problem (before anything is rendered)."""
    if isinstance(data, SchedulerSpec):
        spec = data
    else:
        if not isinstance(data, dict):
            raise SpecRefused([SpecProblem(field="spec", message="a spec is a JSON object")])
        try:
            spec = SchedulerSpec.model_validate(data)
        except ValidationError as e:
            raise SpecRefused([SpecProblem(
                field=".".join(map(str, err["loc"])) or "spec",
                message=("unknown field; spec fields: " + ", ".join(SchedulerSpec.model_fields)
                         if err["type"] == "extra_forbidden" else err["msg"]))
                for err in e.errors()]) from None
    problems = check_spec(spec)
    if problems:
        raise SpecRefused(problems)
    return spec


class Catalog(BaseModel):
    """What `list_primitives` returns: every primitive, the class treatments and shared knobs."""
    axes: list[str]
    primitives: list[prims.Primitive]
    common_params: list[Parameter]
    class_treatments: dict[str, str]
    class_params: list[Parameter]
    max_classes: int
    spec_example: SchedulerSpec


def catalog() -> Catalog:
    """The primitives (synth/primitives.py) with the example spec: what list_primitives answers."""
    return Catalog(axes=list(prims.AXES), primitives=prims.PRIMITIVES, common_params=prims.COMMON_PARAMS,
                   class_treatments=prims.CLASS_TREATMENTS, class_params=prims.CLASS_PARAMS,
                   max_classes=prims.MAX_CLASSES, spec_example=SchedulerSpec.model_validate(EXAMPLE_SPEC))
