"""What crosses machines with a fleet job (jobs/fleet.py), both ways.

A fleet worker on another machine has its own $SCHEDCP_HOME. A job's inputs and its dependencies'
results refer to records by id (the report a validate node validates, the profile whose goals
apply), and what a job makes is recorded in the store of the machine that ran it (the report, the
learning-history outcome). So the coordinator sends the records a job refers to along with the job,
and the worker sends back every record the job wrote; the files a report refers to (its compiled
object, its source) travel with it. The coordinator's store stays the record of what ran, so
`schedcp reports`, `feedback`, `token` and `deploy` work there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, Field

from .. import store
from ..errors import SchedcpError

#: a record id (`rep-1a2b3c4d5e`; a job's several reports `rep-1a2b3c4d5e-0`)
RECORD_ID = re.compile(r"^[a-z]+-[0-9a-f]{10}(-\d+)?$")


MAX_RECORDS, MAX_FILES, MAX_BLOB = 1000, 200, 8 << 20  # a job's records and files; bytes of one


class Bundle(BaseModel):
    records: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_RECORDS,
                                          description="store.put_raw columns")
    objects: dict[str, Annotated[str, Field(max_length=MAX_BLOB)]] = Field(
        default_factory=dict, max_length=MAX_FILES, description="sha256 -> compiled object, base64")
    sources: dict[str, Annotated[str, Field(max_length=MAX_BLOB)]] = Field(
        default_factory=dict, max_length=MAX_FILES, description="sha256 -> submitted source text")

    def __bool__(self) -> bool:
        return bool(self.records)


def _ids(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        if RECORD_ID.match(value):
            out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _ids(v, out)
    elif isinstance(value, list):
        for v in value:
            _ids(v, out)


def referred(*values: Any, depth: int = 2) -> Bundle:
    """The records that `values` refer to by id, and those that these refer to (a report's
    profile), `depth` levels deep, with their files."""
    found: dict[str, dict[str, Any]] = {}
    frontier: set[str] = set()
    for v in values:
        _ids(v, frontier)
    for _ in range(depth):
        nxt: set[str] = set()
        for rid in sorted(frontier - found.keys()):
            row = store.get_raw(rid)
            if row is not None:
                found[rid] = row
                _ids(json.loads(row["data"]), nxt)
        frontier = nxt
    return with_files(list(found.values()))


def with_files(rows: list[dict[str, Any]]) -> Bundle:
    """Records, and the object and source files their reports refer to (those this machine has),
    read from this machine's own stores by content hash: never from a path a record names."""
    from ..reports import KIND, stored_object, stored_source

    b = Bundle(records=rows)
    for r in rows:
        if r["kind"] != KIND:
            continue
        d = json.loads(r["data"])
        obj = stored_object(d.get("object_sha256"))
        if obj is not None:
            b.objects[d["object_sha256"]] = base64.b64encode(obj).decode()
        src = stored_source(d.get("source_sha256"))
        if src is not None:
            b.sources[d["source_sha256"]] = src
    return b


def _save_files(b: Bundle) -> dict[str, str]:
    """Objects and sources into this machine's content-addressed stores, each under the hash of its
    own bytes (a mislabelled one is refused). Returns sha -> local object path."""
    from ..reports import save_source
    from ..verify.pipeline import _save_object

    blobs = {}
    for sha, blob in b.objects.items():
        data = base64.b64decode(blob, validate=True)
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refused(f"an object labelled {sha[:12]} hashes to something else")
        blobs[sha] = data
    for sha, text in b.sources.items():
        if hashlib.sha256(text.encode()).hexdigest() != sha:
            raise Refused(f"a source labelled {sha[:12]} hashes to something else")
    paths = {sha: _save_object(data)[1] for sha, data in blobs.items()}
    for text in b.sources.values():
        save_source(text)
    return paths


def unpack(b: Bundle | dict[str, Any] | None) -> list[str]:
    """On a fleet worker: record what the (authenticated) coordinator sent with a job (files first,
    so a report never points at a file that is not there yet); a report's object path becomes this
    machine's copy. Returns the record ids."""
    from ..reports import KIND

    if not b:
        return []
    b = Bundle.model_validate(b) if isinstance(b, dict) else b
    paths = _save_files(b)
    for r in b.records:
        data = r["data"]
        if r["kind"] == KIND:
            d = json.loads(data)
            local = paths.get(d.get("object_sha256") or "")
            d["object_path"] = local
            if isinstance(d.get("layer1"), dict):
                d["layer1"]["object_path"] = local
            data = json.dumps(d)
        store.put_raw(r["kind"], r["id"], r["created_at"], r["ref"], data)
    return [r["id"] for r in b.records]


# --- the coordinator's side: what a worker sends back is checked, then re-derived ----------------------

class Refused(SchedcpError):
    """What a fleet worker sent back cannot be taken (nothing of it is stored)."""


#: the record kinds a job may make on a worker (any other kind coming back is refused), and their
#: models, loaded by name like the job kinds (`kinds.KIND_MODULES`): they sit above this layer
RECORD_MODELS = {"report": "schedcp_mcp.reports:ValidationReport", "outcome": "schedcp_mcp.learn.history:Outcome",
                 "tune": "schedcp_mcp.synth.tune:TuneResult",
                 "candidate": "schedcp_mcp.repository.provenance:Candidate"}


def _models() -> dict[str, type[BaseModel]]:
    import importlib

    return {k: getattr(importlib.import_module(v.split(":")[0]), v.split(":")[1]) for k, v in RECORD_MODELS.items()}


#: the kinds whose record ids the coordinator fixes in advance (`<prefix>-<job id>[-n]`)
ISSUED_IDS = ("verify", "validate")


def _issued(rid: str, job) -> int | None:
    """The index of a record id this job was given (`rep-<job>`, `rep-<job>-3`, `out-<job>`), or None."""
    m = re.fullmatch(r"(rep|out)-" + re.escape(job.id.split("-", 1)[1]) + r"(?:-(\d+))?", rid)
    return None if m is None else int(m.group(2) or 0)


def _expected_source(job, index: int) -> tuple[str | None, str | None, dict[str, str] | None]:
    """What a verify/validate job was asked to check: (source sha256, policy, parameters), as far as
    its inputs say (None where they leave it to a record it was sent)."""
    from ..repository.policies import get_policy

    i = job.inputs
    policy = (i.get("policies") or [None] * (index + 1))[index] if i.get("policies") else i.get("policy")
    if policy:
        p = get_policy(policy)
        text = p.source_text() or ""
        return hashlib.sha256(text.encode()).hexdigest(), policy, p.loader_params(i.get("params") or {})
    if i.get("source"):
        return (hashlib.sha256(i["source"].encode()).hexdigest(), None,
                {k: str(v) for k, v in (i.get("params") or {}).items()})
    return None, None, None


def _report(d: dict[str, Any], existing: dict[str, Any] | None, job, paths: dict[str, str], rid: str):
    """A report from a worker as this store will keep it: one the job was sent keeps everything but
    its sandbox verdict (layer 2, goals, profile); a new one must be of the source, policy and
    parameters the job asked for, its object and source present here (re-hashed), its paths this
    store's own and its artifact hash recomputed."""
    from ..reports import ValidationReport, artifact_hash, stored_object, stored_source
    from ..verify.pipeline import object_store

    r = ValidationReport.model_validate(d)
    if existing is not None:
        mine = ValidationReport.model_validate_json(existing["data"])
        return mine.model_copy(update={"layer2": r.layer2, "goals": r.goals,
                                       "profile_id": mine.profile_id or r.profile_id})
    if job.kind in ISSUED_IDS:
        sha, policy, params = _expected_source(job, _issued(rid, job) or 0)
        if sha is not None and (r.source_sha256, r.policy, r.params) != (sha, policy, params):
            raise Refused(f"report {rid} is not of the source, policy and parameters job {job.id} sent")
    if stored_source(r.source_sha256) is None and not r.policy:
        raise Refused(f"report {rid} names a source that was not sent with it")
    path = None
    if r.object_sha256:
        if stored_object(r.object_sha256) is None:
            raise Refused(f"report {rid} names an object that was not sent with it")
        path = str(object_store() / f"{r.object_sha256}.bpf.o")
    if r.layer1.source_sha256 != r.source_sha256 or r.layer1.object_sha256 != r.object_sha256:
        raise Refused(f"report {rid}: its layer-1 record names another artifact")
    layer1 = r.layer1.model_copy(update={"object_path": path})
    return r.model_copy(update={
        "object_path": path, "layer1": layer1, "invalidated": False, "invalidated_reason": None,
        "artifact_sha256": artifact_hash(r.object_sha256, r.params) if r.object_sha256 else None})


def accept(b: Bundle | dict[str, Any] | None, job, sent: set[str]) -> list[str]:
    """On the coordinator: take the records a worker sent back for `job`, trusting none of them.
    Only the kinds jobs make; a record that exists here only if it was sent with this job (others
    are never overwritten); for verify/validate only the ids the coordinator issued; files re-hashed
    and kept in this store; reports re-derived (`_report`). All or nothing: on any refusal nothing
    is stored and `Refused` says why. Returns the record ids."""
    if not b:
        return []
    b = Bundle.model_validate(b) if isinstance(b, dict) else b
    models = _models()
    with store.transaction():
        paths = _save_files(b)  # content-addressed: harmless even if the records are refused
        rows = []
        for r in b.records:
            kind, rid = r.get("kind"), r.get("id")
            if kind not in models or not isinstance(rid, str) or not RECORD_ID.match(rid):
                raise Refused(f"a {kind!r} record {rid!r} is not something a job makes")
            existing = store.get_raw(rid)
            if existing is not None and (rid not in sent or existing["kind"] != kind):
                raise Refused(f"record {rid} exists here and was not sent with job {job.id}: not overwritten")
            if existing is None and job.kind in ISSUED_IDS and _issued(rid, job) is None:
                raise Refused(f"record {rid} is not an id job {job.id} was given")
            try:
                d = json.loads(r["data"])
                if not isinstance(d, dict) or d.get("id") != rid:
                    raise Refused(f"record {rid}: its data names another id")
                m = _report(d, existing, job, paths, rid) if kind == "report" else models[kind].model_validate(d)
            except (ValueError, TypeError, KeyError) as e:
                raise Refused(f"record {rid} is not a valid {kind}: {str(e)[:200]}") from None
            created = existing["created_at"] if existing else float(m.created_at)
            ref = m.policy if kind == "report" else (r.get("ref") if isinstance(r.get("ref"), str) else None)
            rows.append((kind, rid, created, ref, m.model_dump_json()))
        for row in rows:
            store.put_raw(*row)
    return [row[1] for row in rows]
