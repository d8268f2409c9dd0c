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
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .. import store

#: a record id (`rep-1a2b3c4d5e`; a job's several reports `rep-1a2b3c4d5e-0`)
RECORD_ID = re.compile(r"^[a-z]+-[0-9a-f]{10}(-\d+)?$")


class Bundle(BaseModel):
    records: list[dict[str, Any]] = Field(default_factory=list, description="store.put_raw columns")
    objects: dict[str, str] = Field(default_factory=dict, description="sha256 -> compiled object, base64")
    sources: dict[str, str] = Field(default_factory=dict, description="sha256 -> submitted source text")

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
    """Records, and the object and source files their reports refer to (those this machine has)."""
    from ..reports import KIND, sources_dir

    b = Bundle(records=rows)
    for r in rows:
        if r["kind"] != KIND:
            continue
        d = json.loads(r["data"])
        obj = Path(d["object_path"]) if d.get("object_path") else None
        if obj is not None and d.get("object_sha256") and obj.exists():
            b.objects[d["object_sha256"]] = base64.b64encode(obj.read_bytes()).decode()
        src = sources_dir() / f"{d.get('source_sha256')}.bpf.c"
        if d.get("source_sha256") and src.exists():
            b.sources[d["source_sha256"]] = src.read_text()
    return b


def unpack(b: Bundle | dict[str, Any] | None) -> list[str]:
    """Record a bundle in this machine's store (files first, so a report never points at a file that
    is not there yet); a report's object path becomes this machine's copy. Returns the record ids."""
    from ..reports import KIND, save_source
    from ..verify.pipeline import _save_object

    if not b:
        return []
    b = Bundle.model_validate(b) if isinstance(b, dict) else b
    paths = {sha: _save_object(base64.b64decode(blob))[1] for sha, blob in b.objects.items()}
    for text in b.sources.values():
        save_source(text)
    for r in b.records:
        data = r["data"]
        if r["kind"] == KIND:
            d = json.loads(data)
            local = paths.get(d.get("object_sha256") or "")
            if local:
                d["object_path"] = local
                if isinstance(d.get("layer1"), dict):
                    d["layer1"]["object_path"] = local
                data = json.dumps(d)
        store.put_raw(r["kind"], r["id"], r["created_at"], r["ref"], data)
    return [r["id"] for r in b.records]
