"""Render a checked SchedulerSpec into BPF C with the jinja2 template in `templates/`.

The template decides the code; this module only derives the feature flags the template branches on
(which per-task state, which maps, which callbacks) and the header comment's text from the catalog,
so the header always states the spec, what each primitive does, and where it fails.
"""

from __future__ import annotations

import json
import textwrap
from functools import lru_cache

import jinja2
from pydantic import BaseModel

from .. import config
from ..errors import InfrastructureError
from ..repository.policies import Parameter
from . import primitives as prims
from .spec import SchedulerSpec, chosen, knob_params, validate_spec

TEMPLATE = "scheduler.bpf.c.j2"
WIDTH = 72


class Rendered(BaseModel):
    spec: SchedulerSpec
    source: str
    knobs: list[Parameter]

    @property
    def params(self) -> dict[str, str]:
        """The knob values as loader parameters (the same values the source has as defaults)."""
        return {k.name: str(int(k.default)) for k in self.knobs}


def _c_value(k: Parameter) -> str:
    if k.type == "bool":
        return "true" if k.default else "false"
    suffix = {"u64": "ULL", "s64": "LL", "u32": "U"}.get(k.type, "")
    return f"{int(k.default)}{suffix}"


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    root = config.templates_dir()
    if not (root / TEMPLATE).exists():
        raise InfrastructureError(f"scheduler template {root / TEMPLATE} is missing",
                                  "reinstall schedcp from its source tree")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["c_value"] = _c_value
    return env


def features(spec: SchedulerSpec) -> dict:
    classes = [{"index": i, "match": c.match, "pattern": c.pattern, "treat": c.treat,
                "prefix": bool(c.pattern and c.pattern.endswith("*")),
                "text": (c.pattern or "").rstrip("*")} for i, c in enumerate(spec.classes)]
    vtime = spec.ordering != "fifo"
    burst = spec.ordering == "deadline" or spec.slice == "interactive"
    young = any(c["match"] == "short_lived" for c in classes)
    domains = spec.queue in ("per_llc", "per_numa")
    return {
        "vtime": vtime, "burst": burst, "wake_freq": spec.ordering == "deadline", "young": young,
        "tctx": vtime or burst or young,
        "nr_cpus": spec.queue in ("per_cpu", "per_llc", "per_numa") or spec.cpu_select == "llc_first",
        "topo": domains or spec.cpu_select == "llc_first", "domains": domains,
        "llc_masks": spec.cpu_select == "llc_first",
        "classes": classes,
        "patterns": [c for c in classes if c["match"] in ("comm", "cgroup")],
        "cgroup": any(c["match"] == "cgroup" for c in classes),
        "local_classes": [c for c in classes if c["treat"] == "local"],
        "boost_classes": [c for c in classes if c["treat"] == "boost"],
        "kick": spec.preempt == "kick_idle" or spec.queue == "per_cpu",
        "init": spec.queue != "builtin_global" or domains or spec.cpu_select == "llc_first",
    }


def _wrap(text: str, indent: int = 0, hang: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH - indent, subsequent_indent=hang) or [""]


def header(spec: SchedulerSpec) -> dict:
    axes = []
    for axis in ("queue", "ordering", "cpu_select", "slice", "preempt"):
        p = prims.get(axis, getattr(spec, axis))
        axes.append((axis, _wrap(f"{p.name}: {p.what}", 13)))
    for i, c in enumerate(spec.classes):
        pat = f" {c.pattern!r}" if c.pattern else ""
        axes.append((f"class {i}", _wrap(f"{c.match}{pat} -> {c.treat}, slice {c.slice_pct}%: "
                                         f"{prims.CLASS_TREATMENTS[c.treat]}", 13)))
    works, fails = [], []
    for p in chosen(spec):
        works += _wrap(f"- {p.name}: {p.when}", 3, "  ")
        fails += _wrap(f"- {p.name}: {p.fails}", 3, "  ")
    body = spec.model_dump(mode="json", exclude_defaults=False)
    return {"description": _wrap(spec.description), "axes": axes, "works": works, "fails": fails,
            "spec_json": json.dumps(body, separators=(",", ":"), sort_keys=True)}


def render(spec: SchedulerSpec | dict) -> Rendered:
    """Check `spec` (refusing it before anything is rendered) and render its C source."""
    spec = validate_spec(spec)
    knobs = knob_params(spec)
    source = _env().get_template(TEMPLATE).render(s=spec, f=features(spec), knobs=knobs,
                                                  doc=header(spec))
    return Rendered(spec=spec, source=source, knobs=knobs)
