"""The architecture holds: layers import only downwards, and every MCP tool's output schema is a
real model (what an agent reads is what it gets)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_layers_import_only_downwards():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: `pip install -e '.[test]'` installs import-linter")
    p = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def _untyped(schema, defs: dict, path: str = "") -> list[str]:
    """Paths in a JSON schema that accept anything (a field typed Any, or a bare dict/list)."""
    if not isinstance(schema, dict):
        return []
    keys = set(schema) - {"title", "description", "default", "examples"}
    if not keys:
        return [path or "<root>"]
    out = []
    if "$ref" in schema:
        return []
    for k in ("anyOf", "oneOf", "allOf"):
        for i, s in enumerate(schema.get(k, [])):
            out += _untyped(s, defs, f"{path}|{i}")
    for name, s in (schema.get("properties") or {}).items():
        out += _untyped(s, defs, f"{path}.{name}")
    if schema.get("type") == "array":
        if "prefixItems" in schema:  # a tuple
            for i, s in enumerate(schema["prefixItems"]):
                out += _untyped(s, defs, f"{path}[{i}]")
        else:
            out += _untyped(schema.get("items", {}), defs, f"{path}[]")
    if schema.get("type") == "object" and "properties" not in schema:
        extra = schema.get("additionalProperties")
        out += [f"{path}{{}}"] if extra in (None, True) else _untyped(extra, defs, f"{path}{{}}")
    return out


def test_every_tool_returns_a_typed_model():
    from schedcp_mcp import server

    tools = anyio.run(server.server.list_tools)
    assert len(tools) >= 20
    # output schemas only where the shape is small and fixed (#25: they were 90 % of tools/list);
    # where one is published, every field is typed
    assert {t.name for t in tools if t.output_schema} == {"issue_token", "cancel_job"}
    loose = {}
    for t in tools:
        if not t.output_schema:
            continue
        schema = t.output_schema
        defs = schema.get("$defs", {})
        bad = _untyped(schema, defs) + [f"$defs.{n}{p}" for n, d in defs.items() for p in _untyped(d, defs)]
        if bad:
            loose[t.name] = bad
    assert not loose, f"output fields typed as 'anything': {loose}"
