"""Generate a scheduler from a spec: check the spec (refused before rendering), render it, and run
layer 1 at once (compile + the real kernel verifier), so an agent gets the source, a candidate id
and structured compile/verifier errors in one call."""

from __future__ import annotations

from typing import Any

from .provenance import Provenance, SynthResult, submit
from .render import render
from .spec import SchedulerSpec


def generate(spec: SchedulerSpec | dict[str, Any], **kw) -> SynthResult:
    """`kw` go to layer 1 (target, vm, use_cache, progress, actor, profile_id)."""
    r = render(spec)
    prov = Provenance(kind="generated", spec=r.spec, params=r.params)
    return submit(prov, source=r.source, knobs=r.knobs, **kw)
