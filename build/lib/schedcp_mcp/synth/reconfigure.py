"""Reconfigure a repository policy: new knob values, checked against its policy.json (type, range,
known name) and injected by the loader as `const volatile` rodata — the source is never edited, so
the compiled object is the cached one and only the load differs."""

from __future__ import annotations

from typing import Any

from ..errors import BadInput
from ..repository.policies import get_policy
from .provenance import Provenance, SynthResult, submit


def reconfigure(name: str, params: dict[str, Any], **kw) -> SynthResult:
    p = get_policy(name)
    if p.kind != "schedcp":
        raise BadInput(f"{name} is a catalogued scx scheduler, not a schedcp policy",
                       "scx schedulers are configured with their own command-line flags")
    if not params:
        raise BadInput("no parameters given", "parameters of " + name + ": "
                       + (", ".join(f"{q.name} ({q.type})" for q in p.parameters) or "none"))
    resolved = p.resolve_params(params)  # BadInput names the parameter, the value and the range
    prov = Provenance(kind="reconfigured", parent_policy=name,
                      params={k: str(v) for k, v in resolved.items()})
    return submit(prov, policy=name, knobs=p.parameters, include_source=False, **kw)
