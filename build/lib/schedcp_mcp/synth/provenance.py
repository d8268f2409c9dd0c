"""The one way a synthesized candidate enters layer 1: submit it with its provenance, store the
Candidate record (repository/provenance.py) and answer with a SynthResult an agent can act on."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .. import store
from ..repository.policies import Parameter
from ..repository.provenance import Candidate, Provenance, get_candidate, save_candidate  # noqa: F401
from ..verify.models import VerifyError
VERIFIER_LOG_CHARS = 6000


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


def candidate_source(c: Candidate) -> str:
    from ..reports import get_report, source_for

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
    save_candidate(c)
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

