"""Synthesized candidates and where they came from: the records, below the layers that read them.

Every synthesized scheduler (generated, revised, reconfigured, or a tuning trial) is a `Candidate`
record in the store (`kind="candidate"`, id `cand-…`) pointing at its layer-1 ValidationReport and
carrying its `Provenance`: the parent policy or candidate, the spec, the patch, the parameters. The
report carries the same provenance, and so do the learning history's outcomes and a contributed
policy's policy.json, so any scheduler can be traced back to how it was made. `synth/` makes them;
reports, learn and contribute only read them, so the models live here.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import store
from .policies import Parameter

KIND = "candidate"


class TaskClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str = Field(description="kthread, short_lived, comm or cgroup")
    pattern: str | None = Field(None, description="comm/cgroup only: exact name, or a prefix ending "
                                "in '*' (letters, digits, _ . : / + -; at most 15 characters)")
    treat: str = Field("boost", description="boost, background or local (local: kthread only)")
    slice_pct: int = Field(100, description="this class's slice in percent of the computed slice "
                           "(10..1000)")


class SchedulerSpec(BaseModel):
    """What `generate_scheduler` takes. Axes default to the simplest sound choice."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="scheduler (ops) name: lowercase letters, digits, _; 2-24 chars")
    description: str = Field("", description="what it is for, one line (goes into the header comment)")
    queue: str = Field("global", description="global, per_cpu, per_llc or per_numa")
    ordering: str = Field("vtime", description="fifo, vtime or deadline")
    cpu_select: str = Field("default", description="default, prev_sticky, llc_first, idle_core or "
                            "sync_waker")
    slice: str = Field("fixed", description="fixed, scaled or interactive")
    preempt: str = Field("none", description="none, kick_idle or wakeup")
    classes: list[TaskClass] = Field([], description="task classes, first match wins (at most 4)")
    queued_wakeup: bool = Field(False, description="SCX_OPS_ALLOW_QUEUED_WAKEUP: a wakeup of a task on "
                                "another CPU is queued to that CPU (an IPI) as the default scheduler "
                                "does (cpu_select builtin only)")
    params: dict[str, int | bool] = Field({}, description="knob values by name (see list_primitives); "
                                          "unset knobs take the primitive's default")



class Provenance(BaseModel):
    kind: Literal["generated", "revised", "reconfigured", "tuned"]
    parent_policy: str | None = Field(None, description="the repository policy it derives from")
    parent_candidate: str | None = Field(None, description="the candidate it derives from (cand-…)")
    spec: SchedulerSpec | None = Field(None, description="the spec it was generated from")
    patch: str | None = Field(None, description="the unified diff it was revised by")
    params: dict[str, str] = Field({}, description="the knob values it was built/loaded with")
    tune_id: str | None = Field(None, description="the tuning run that tried it (tune-…)")

    @property
    def patch_sha256(self) -> str | None:
        return hashlib.sha256(self.patch.encode()).hexdigest() if self.patch else None


class Candidate(BaseModel):
    id: str
    created_at: float = Field(default_factory=time.time)
    provenance: Provenance
    report_id: str
    source_sha256: str
    ops_name: str | None = None
    verdict: str
    knobs: list[Parameter] = Field([], description="its const volatile knobs with types and ranges")


def save_candidate(c: Candidate) -> None:
    p = c.provenance
    store.put(KIND, c, ref=p.parent_policy or p.parent_candidate or p.kind)


def get_candidate(candidate_id: str) -> Candidate:
    return store.require(KIND, candidate_id, Candidate, "candidate",
                         "make one with generate_scheduler / revise_policy / reconfigure_policy")


def list_candidates(limit: int = 50, parent: str | None = None) -> list[Candidate]:
    return store.list_records(KIND, Candidate, ref=parent, limit=limit)
