"""ValidationReport: the stored record of what layers 1 and 2 said about one artifact, and the
submitted sources it was made from.

The artifact is the compiled BPF object (content-addressed by its sha256) plus the parameters it is
loaded with; a deployment token is bound to exactly that (see deploy/tokens.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, computed_field

from . import config, store
from .errors import BadInput
from .models import Goal, IssuedToken
from .repository.policies import get_policy
from .repository.provenance import Provenance
from .validate.models import Layer2Result
from .verify.models import Layer1Report

KIND = "report"


class ValidationReport(BaseModel):
    id: str
    created_at: float = Field(default_factory=time.time)
    policy: str | None = Field(None, description="repository policy name, or None for a raw source")
    params: dict[str, str] = {}
    source_sha256: str
    object_sha256: str | None = None
    artifact_sha256: str | None = Field(
        None, description="sha256 over object sha256 + parameters: what a token is bound to")
    object_path: str | None = None
    ops_name: str | None = None
    target: str = "sandbox"
    profile_id: str | None = None
    goals: list[Goal] = []
    layer1: Layer1Report
    layer2: Layer2Result | None = Field(None, description="the sandbox run, once validated")
    candidate_id: str | None = Field(None, description="the synthesized candidate (cand-…) it checks")
    provenance: Provenance | None = Field(None, description="how the candidate was made (synth)")
    invalidated: bool = False
    invalidated_reason: str | None = None
    again_of: str | None = Field(None, description="the earlier report of the same layer 1 that this one "
                                 "measured again (each measurement is its own report)")

    def measured_again(self, new_id: str) -> "ValidationReport":
        """A fresh report for another layer-2 measurement of this one's layer 1, when this one has a
        layer 2 already: a measurement never overwrites an earlier one. (optimize's measure-again
        validated lean_preempt's cached layer-1 report a second time and the round-1 figures were
        gone from the store.) Invalidation is kept: measuring again does not undo a rollback."""
        if self.layer2 is None:
            return self
        return self.model_copy(update={"id": new_id, "created_at": time.time(), "layer2": None,
                                       "again_of": self.again_of or self.id})

    @property
    def passed_layer1(self) -> bool:
        return self.layer1.verdict == "accepted"

    @property
    def passed_layer2(self) -> bool:
        return bool(self.layer2 and self.layer2.passed)

    @computed_field(description="passed layers 1 and 2 and not invalidated: a token may be issued")
    @property
    def passed(self) -> bool:
        return self.passed_layer1 and self.passed_layer2 and not self.invalidated

    @computed_field(description="where the report stands, in words")
    @property
    def status(self) -> str:
        if self.invalidated:
            return f"invalidated: {self.invalidated_reason}"
        if not self.passed_layer1:
            return f"layer 1 {self.layer1.verdict} at {self.layer1.stage}"
        if self.layer2 is None:
            return "layer 1 accepted; not validated in the sandbox yet"
        return "passed layers 1 and 2" if self.passed_layer2 else \
            f"layer 2 failed: {self.layer2.failure_reason}"


class ValidationOutcome(BaseModel):
    """What a validation answers (CLI `validate --json` and the MCP tool alike): the report's
    verdict, both layers' results and, when it passed, a deployment token."""

    report_id: str
    passed: bool
    status: str
    token: str | None = Field(None, description="single-use deployment token when the report passed")
    layer1: Layer1Report
    layer2: Layer2Result | None
    _report: ValidationReport = PrivateAttr()

    @classmethod
    def of(cls, report: ValidationReport, token: IssuedToken | None) -> "ValidationOutcome":
        out = cls(report_id=report.id, passed=report.passed, status=report.status,
                  token=token.token if token else None, layer1=report.layer1, layer2=report.layer2)
        out._report = report
        return out

    @property
    def report(self) -> ValidationReport:
        return self._report


def artifact_hash(object_sha256: str, params: dict[str, Any], program_args: list[str] | None = None) -> str:
    """What a token binds: the object's (or a scheduler program's) bytes, its parameters and, for a
    program, its arguments."""
    d: dict[str, Any] = {"object": object_sha256, "params": {k: str(v) for k, v in sorted(params.items())}}
    if program_args is not None:
        d["program_args"] = list(program_args)
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def new_report(layer1: Layer1Report, *, policy: str | None, params: dict[str, Any],
               profile_id: str | None = None, goals: list[Goal] | None = None,
               provenance: Provenance | None = None, candidate_id: str | None = None,
               report_id: str | None = None) -> ValidationReport:
    """`report_id`: a fixed id (a job's rerun rewrites its own report instead of adding one)."""
    r = ValidationReport(
        id=report_id or store.new_id("rep"), policy=policy, params={k: str(v) for k, v in params.items()},
        source_sha256=layer1.source_sha256, object_sha256=layer1.object_sha256,
        artifact_sha256=artifact_hash(layer1.object_sha256, params, layer1.program_args)
        if layer1.object_sha256 else None,
        object_path=layer1.object_path, ops_name=layer1.ops_name, target=layer1.target,
        profile_id=profile_id, goals=goals or [], layer1=layer1, provenance=provenance,
        candidate_id=candidate_id)
    save(r)
    return r


def save(r: ValidationReport) -> None:
    store.put(KIND, r, ref=r.policy)


def get_report(report_id: str) -> ValidationReport:
    return store.require(KIND, report_id, ValidationReport, "validation report",
                         "submit a scheduler first (submit_scheduler / schedcp verify)")


def what(r: ValidationReport | None) -> str:
    """What a report (or a deployment of it) is, in a word for a table: the policy's name, else
    `program NAME` for a scheduler program, else `source` (submitted source or a generated one, or a
    report no longer stored)."""
    if r is not None and r.policy:
        return r.policy
    if r is not None and r.layer1.program_args is not None:
        return f"program {r.layer1.program_name or '?'}"
    return "source"


def deployed_what(policy: str | None, report_id: str) -> str:
    """`what` for a deployment: its policy, else what its report says it is (one lookup)."""
    return policy or what(store.get(KIND, report_id, ValidationReport))


def list_reports(limit: int = 20) -> list[ValidationReport]:
    return store.list_records(KIND, ValidationReport, limit=limit)


def invalidate(report_id: str, reason: str, actor: str = "operator") -> ValidationReport:
    r = get_report(report_id)
    r.invalidated, r.invalidated_reason = True, reason
    save(r)
    store.audit(actor, "invalidate_report", {"report_id": report_id, "reason": reason},
                r.artifact_sha256)
    return r


# --- submitted sources, content-addressed, so a report can be contributed later --------------------

def sources_dir() -> Path:
    p = config.home() / "sources"
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_source(source: str) -> str:
    sha = hashlib.sha256(source.encode()).hexdigest()
    path = sources_dir() / f"{sha}.bpf.c"
    if not path.exists():
        config.write_private(path, source.encode())  # never through a symlink planted there
    return sha


def stored_source(sha: str | None) -> str | None:
    """A submitted source from this store by its hash, only if its bytes still hash to it."""
    if not sha or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return None
    try:
        text = (sources_dir() / f"{sha}.bpf.c").read_text()
    except OSError:
        return None
    return text if hashlib.sha256(text.encode()).hexdigest() == sha else None


def stored_object(sha: str | None) -> bytes | None:
    """A compiled object from this store by its hash (never from a path a record names), only if
    its bytes still hash to it."""
    from .verify.pipeline import stored_bytes

    return stored_bytes(sha, ".bpf.o")


def source_for(report: ValidationReport) -> str:
    path = sources_dir() / f"{report.source_sha256}.bpf.c"
    if path.exists():
        return path.read_text()
    if report.policy:
        text = get_policy(report.policy).source_text()
        if text and hashlib.sha256(text.encode()).hexdigest() == report.source_sha256:
            return text
    raise BadInput(f"the source of report {report.id} is no longer stored",
                   "submit the scheduler again")
