"""What a process that runs jobs loads: every layer's job kinds, and the records a fleet job carries.

The job infrastructure (`jobs/`: queue, pools, fleet, carry) sits below the domain and knows none of
it. The modules that own work register their kinds when imported (`@kinds.register`), the sandbox
registers what a job leaves running (its VMs), and this module registers the records a job may
make on a fleet worker, with how each crosses machines. The CLI, the server and fleet workers
import it at startup; fleet workers are started on it: `celery -A schedcp_mcp.worker worker`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import candidates  # noqa: F401 — kinds verify, validate, verify_program
from .bench import runs as _bench_runs  # noqa: F401 — the sandbox benchmarks' kinds
from .errors import BadInput
from .jobs import campaigns  # noqa: F401 — kind campaign
from .jobs import carry, kinds
from .jobs.models import Job
from .learn.history import Outcome
from .reports import KIND as REPORT, ValidationReport, artifact_hash, save_source, stored_object, stored_source
from .repository.policies import get_policy
from .repository.provenance import Candidate
from .sandbox import vm as _vm  # noqa: F401 — a job's VMs end with the job (kinds.on_release)
from .synth.tune import TuneResult  # and kind tune
from .verify.pipeline import _save_object, object_store


def __getattr__(name: str):
    """`celery -A schedcp_mcp.worker worker` finds the fleet's Celery app here (loaded on demand:
    Celery is the `fleet` extra)."""
    if name in ("app", "celery"):
        from .jobs.fleet import app

        return app
    raise AttributeError(name)


# --- a report, as it crosses machines ------------------------------------------------------------------

def _report_files(d: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The compiled object and the source a report refers to, from this machine's stores."""
    obj, src = stored_object(d.get("object_sha256")), stored_source(d.get("source_sha256"))
    return ({d["object_sha256"]: obj} if obj is not None else {}), \
        ({d["source_sha256"]: src} if src is not None else {})


def _report_localized(d: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """A report sent to a worker points at the worker's copy of its object."""
    local = paths.get(d.get("object_sha256") or "")
    d["object_path"] = local
    if isinstance(d.get("layer1"), dict):
        d["layer1"]["object_path"] = local
    return d


def _expected_source(job: Job, index: int) -> tuple[str | None, str | None, dict[str, str] | None]:
    """What a verify/validate job was asked to check: (source sha256, policy, parameters), as far as
    its request says (None where it leaves it to a record it was sent)."""
    req = kinds.get(job.kind).parse(job.inputs)  # a VerifyRequest or a ValidateRequest
    policies = getattr(req, "policies", None)
    if policies and index >= len(policies):
        raise carry.Refused(f"job {job.id} verified {len(policies)} policies: no report {index} was given")
    policy = policies[index] if policies else req.policy
    if policy:
        p = get_policy(policy)
        text = p.source_text() or ""
        return hashlib.sha256(text.encode()).hexdigest(), policy, p.loader_params(req.params)
    if req.source:
        return hashlib.sha256(req.source.encode()).hexdigest(), None, dict(req.params)
    return None, None, None


def _report_derived(d: dict[str, Any], existing: dict[str, Any] | None, job: Job,
                    issued: int | None) -> ValidationReport:
    """A report from a worker as this store will keep it: one the job was sent keeps everything but
    its sandbox verdict (layer 2, goals, profile); a new one must be of the source, policy and
    parameters the job asked for, its object and source present here (re-hashed), its paths this
    store's own and its artifact hash recomputed."""
    r = ValidationReport.model_validate(d)
    if existing is not None:
        mine = ValidationReport.model_validate_json(existing["data"])
        return mine.model_copy(update={"layer2": r.layer2, "goals": r.goals,
                                       "profile_id": mine.profile_id or r.profile_id})
    if issued is not None:
        try:
            sha, policy, params = _expected_source(job, issued)
        except BadInput as e:  # the job's own request does not parse: nothing to check a report against
            raise carry.Refused(f"report {r.id}: {e.message}") from None
        if sha is not None and (r.source_sha256, r.policy, r.params) != (sha, policy, params):
            raise carry.Refused(f"report {r.id} is not of the source, policy and parameters job {job.id} sent")
    if stored_source(r.source_sha256) is None and not r.policy:
        raise carry.Refused(f"report {r.id} names a source that was not sent with it")
    path = None
    if r.object_sha256:
        if stored_object(r.object_sha256) is None:
            raise carry.Refused(f"report {r.id} names an object that was not sent with it")
        path = str(object_store() / f"{r.object_sha256}.bpf.o")
    if r.layer1.source_sha256 != r.source_sha256 or r.layer1.object_sha256 != r.object_sha256:
        raise carry.Refused(f"report {r.id}: its layer-1 record names another artifact")
    layer1 = r.layer1.model_copy(update={"object_path": path})
    return r.model_copy(update={
        "object_path": path, "layer1": layer1, "invalidated": False, "invalidated_reason": None,
        "artifact_sha256": artifact_hash(r.object_sha256, r.params) if r.object_sha256 else None})


carry.register_files(carry.FileStore(save_object=lambda data: _save_object(data)[1], save_source=save_source))
carry.register_record(REPORT, carry.RecordType(ValidationReport, files=_report_files, localize=_report_localized,
                                               derive=_report_derived, ref=lambda m: m.policy))
carry.register_record("outcome", carry.RecordType(Outcome))
carry.register_record("tune", carry.RecordType(TuneResult))
carry.register_record("candidate", carry.RecordType(Candidate))
