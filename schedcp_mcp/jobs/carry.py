"""What crosses machines with a fleet job (jobs/fleet.py), both ways.

A fleet worker on another machine has its own $SCHEDCP_HOME. A job's inputs and its dependencies'
results refer to records by id (the report a validate node validates, the profile whose goals
apply), and what a job makes is recorded in the store of the machine that ran it (the report, the
learning-history outcome). So the coordinator sends the records a job refers to along with the job,
and the worker sends back every record the job wrote; the files a report refers to (its compiled
object, its source) travel with it. The coordinator's store stays the record of what ran, so
`schedcp reports`, `feedback`, `token` and `deploy` work there.

This module knows no kind of record: the layers that own them register each (`RecordType`: its
model, its files, how it is re-derived on the coordinator) and this machine's file stores, at
startup (schedcp_mcp.worker).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import BaseModel, Field

from .. import store
from ..errors import SchedcpError
from . import kinds
from .models import Job

#: a record id (`rep-1a2b3c4d5e`; a job's several reports `rep-1a2b3c4d5e-0`)
RECORD_ID = re.compile(r"^[a-z]+-[0-9a-f]{10}(-\d+)?$")


MAX_RECORDS, MAX_FILES, MAX_BLOB = 1000, 200, 8 << 20  # a job's records and files; bytes of one


@dataclass(frozen=True)
class RecordType:
    """One kind of record a job may make on a worker, as the module that owns it registers it (any
    other kind coming back is refused). `files(data)`: the (objects sha -> bytes, sources sha ->
    text) it refers to that this machine has; `localize(data, paths)`: on a worker, the record
    pointing at this machine's copies of its objects; `derive(data, existing row, job, issued index)`:
    on the coordinator, the record as this store keeps it, checked (raises Refused); `ref(model)`:
    its store ref."""
    model: type[BaseModel]
    files: Callable[[dict[str, Any]], tuple[dict[str, bytes], dict[str, str]]] | None = None
    localize: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] | None = None
    derive: Callable[[dict[str, Any], dict[str, Any] | None, Job, int | None], BaseModel] | None = None
    ref: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class FileStore:
    """This machine's content-addressed object and source stores (objects: returns the local path)."""
    save_object: Callable[[bytes], str]
    save_source: Callable[[str], Any]


_TYPES: dict[str, RecordType] = {}
_FILES: FileStore | None = None


def register_record(kind: str, t: RecordType) -> None:
    _TYPES[kind] = t


def register_files(files: FileStore) -> None:
    global _FILES
    _FILES = files


def record_kinds() -> list[str]:
    return sorted(_TYPES)


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
    """Records, and the object and source files they refer to (those this machine has), read from
    this machine's own stores by content hash (`RecordType.files`): never from a path a record names."""
    b = Bundle(records=rows)
    for r in rows:
        t = _TYPES.get(r["kind"])
        if t is None or t.files is None:
            continue
        objects, sources = t.files(json.loads(r["data"]))
        b.objects.update({sha: base64.b64encode(obj).decode() for sha, obj in objects.items()})
        b.sources.update(sources)
    return b


def _save_files(b: Bundle) -> dict[str, str]:
    """Objects and sources into this machine's content-addressed stores, each under the hash of its
    own bytes (a mislabelled one is refused). Returns sha -> local object path."""
    blobs = {}
    for sha, blob in b.objects.items():
        data = base64.b64decode(blob, validate=True)
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refused(f"an object labelled {sha[:12]} hashes to something else")
        blobs[sha] = data
    for sha, text in b.sources.items():
        if hashlib.sha256(text.encode()).hexdigest() != sha:
            raise Refused(f"a source labelled {sha[:12]} hashes to something else")
    if (blobs or b.sources) and _FILES is None:
        raise Refused("this process keeps no files (no file store registered)")
    paths = {sha: _FILES.save_object(data) for sha, data in blobs.items()}
    for text in b.sources.values():
        _FILES.save_source(text)
    return paths


def unpack(b: Bundle | dict[str, Any] | None) -> list[str]:
    """On a fleet worker: record what the (authenticated) coordinator sent with a job (files first,
    so a report never points at a file that is not there yet); a report's object path becomes this
    machine's copy. Returns the record ids."""
    if not b:
        return []
    b = Bundle.model_validate(b) if isinstance(b, dict) else b
    paths = _save_files(b)
    for r in b.records:
        data = r["data"]
        t = _TYPES.get(r["kind"])
        if t is not None and t.localize is not None:
            data = json.dumps(t.localize(json.loads(data), paths))
        store.put_raw(r["kind"], r["id"], r["created_at"], r["ref"], data)
    return [r["id"] for r in b.records]


# --- the coordinator's side: what a worker sends back is checked, then re-derived ----------------------

class Refused(SchedcpError):
    """What a fleet worker sent back cannot be taken (nothing of it is stored)."""


def _issued(rid: str, job: Job) -> int | None:
    """The index of a record id the coordinator gave this job (`rep-<job>`, `rep-<job>-3`,
    `out-<job>`: the kind's `issues_ids` prefixes), or None."""
    prefixes = kinds.get(job.kind).issues_ids
    m = re.fullmatch(f"({'|'.join(map(re.escape, prefixes))})-" + re.escape(job.id.split("-", 1)[1])
                     + r"(?:-(\d+))?", rid) if prefixes else None
    return None if m is None else int(m.group(2) or 0)


def accept(b: Bundle | dict[str, Any] | None, job: Job, sent: set[str]) -> list[str]:
    """On the coordinator: take the records a worker sent back for `job`, trusting none of them.
    Only the kinds jobs make; a record that exists here only if it was sent with this job (others
    are never overwritten); for the kinds that are given their ids (verify/validate) only those ids;
    files re-hashed and kept in this store; records re-derived where their type says how (a report:
    `RecordType.derive`). All or nothing: on any refusal nothing
    is stored and `Refused` says why. Returns the record ids."""
    if not b:
        return []
    b = Bundle.model_validate(b) if isinstance(b, dict) else b
    issues = bool(kinds.get(job.kind).issues_ids)
    with store.transaction():
        _save_files(b)  # content-addressed: harmless even if the records are refused
        rows = []
        for r in b.records:
            kind, rid = r.get("kind"), r.get("id")
            t = _TYPES.get(kind)
            if t is None or not isinstance(rid, str) or not RECORD_ID.match(rid):
                raise Refused(f"a {kind!r} record {rid!r} is not something a job makes")
            existing = store.get_raw(rid)
            if existing is not None and (rid not in sent or existing["kind"] != kind):
                raise Refused(f"record {rid} exists here and was not sent with job {job.id}: not overwritten")
            if existing is None and issues and _issued(rid, job) is None:
                raise Refused(f"record {rid} is not an id job {job.id} was given")
            try:
                d = json.loads(r["data"])
                if not isinstance(d, dict) or d.get("id") != rid:
                    raise Refused(f"record {rid}: its data names another id")
                m = t.derive(d, existing, job, _issued(rid, job)) if t.derive else t.model.model_validate(d)
            except (ValueError, TypeError, KeyError) as e:
                raise Refused(f"record {rid} is not a valid {kind}: {str(e)[:200]}") from None
            created = existing["created_at"] if existing else float(m.created_at)
            ref = t.ref(m) if t.ref else (r.get("ref") if isinstance(r.get("ref"), str) else None)
            rows.append((kind, rid, created, ref, m.model_dump_json()))
        for row in rows:
            store.put_raw(*row)
    return [row[1] for row in rows]
