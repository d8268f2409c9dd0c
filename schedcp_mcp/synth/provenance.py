"""Candidates and where they came from.

Every synthesized scheduler (generated, revised, reconfigured, or a tuning trial) is a `Candidate`
record in the store (`kind="candidate"`, id `cand-…`) pointing at its layer-1 ValidationReport and
carrying its `Provenance`: the parent policy or candidate, the spec, the patch, the parameters. The
report carries the same provenance, and so do the learning history's outcomes and a contributed
policy's policy.json, so any scheduler can be traced back to how it was made.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from .. import store
from ..errors import NotFound
from ..repository.policies import Parameter
from ..verify.models import VerifyError

KIND = "candidate"
VERIFIER_LOG_CHARS = 6000


class Provenance(BaseModel):
    kind: Literal["generated", "revised", "reconfigured", "tuned"]
    parent_policy: str | None = Field(None, description="the repository policy it derives from")
    parent_candidate: str | None = Field(None, description="the candidate it derives from (cand-…)")
    spec: dict[str, Any] | None = Field(None, description="the SchedulerSpec it was generated from")
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


class SynthResult(BaseModel):
    """What generate / revise / reconfigure return: the candidate, its layer-1 verdict and, when it
    was rejected, the structured errors to fix (compiler line/column, verifier program/insn/line)."""
    candidate_id: str
    report_id: str
    verdict: str = Field(description="accepted / rejected / error (layer 1: compile + kernel verifier)")
    stage: str = Field(description="last layer-1 stage reached ('done' when accepted)")
    status: str
    ops_name: str | None = None
    params: dict[str, str] = {}
    knobs: list[Parameter] = []
    errors: list[VerifyError] = []
    warnings: list[VerifyError] = []
    verifier_log: str = Field("", description="tail of the kernel verifier log when it refused")
    source: str | None = Field(None, description="the candidate's C source (generated/revised)")
    provenance: Provenance
    next_step: str


def get_candidate(candidate_id: str) -> Candidate:
    c = store.get(KIND, candidate_id, Candidate)
    if c is None:
        recent = store.ids(KIND, 5)
        raise NotFound(f"no candidate {candidate_id!r}",
                       "recent: " + ", ".join(recent) if recent else
                       "make one with generate_scheduler / revise_policy / reconfigure_policy")
    return c


def list_candidates(limit: int = 50, parent: str | None = None) -> list[Candidate]:
    return store.list_records(KIND, Candidate, ref=parent, limit=limit)


def candidate_source(c: Candidate) -> str:
    from ..candidates import source_for
    from ..reports import get_report

    return source_for(get_report(c.report_id))


def submit(prov: Provenance, *, source: str | None = None, policy: str | None = None,
           knobs: list[Parameter] | None = None, include_source: bool = True, **kw) -> SynthResult:
    """Layer 1 for a synthesized candidate; stores the Candidate and its report with provenance."""
    from .. import candidates

    cid = store.new_id("cand")
    r = candidates.submit(source=source, policy=policy, params=prov.params or None, provenance=prov,
                          candidate_id=cid, **kw)
    c = Candidate(id=cid, provenance=prov, report_id=r.id, source_sha256=r.source_sha256,
                  ops_name=r.ops_name, verdict=r.layer1.verdict, knobs=knobs or [])
    store.put(KIND, c, ref=prov.parent_policy or prov.parent_candidate or prov.kind)
    l1 = r.layer1
    if l1.accepted:
        nxt = (f"validate it in the sandbox: validate_scheduler(report_id={r.id!r}) / "
               f"`schedcp validate --report {r.id}`")
    elif l1.verdict == "error":
        nxt = "the check could not finish (see errors); try again, the sandbox may be overloaded"
    else:
        nxt = ("fix the errors (compiler: line/column; verifier: program, instruction, source line) and "
               "submit again (revise_policy with a patch against this candidate)")
    return SynthResult(candidate_id=cid, report_id=r.id, verdict=l1.verdict, stage=l1.stage,
                       status=r.status, ops_name=r.ops_name, params=r.params, knobs=c.knobs,
                       errors=l1.errors, warnings=l1.warnings,
                       verifier_log=l1.verifier_log[-VERIFIER_LOG_CHARS:] if not l1.accepted else "",
                       source=source if include_source else None, provenance=prov, next_step=nxt)

