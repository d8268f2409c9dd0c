"""A wheel (non-editable install) carries everything the package reads at run time: policies/,
templates/ and agents/ as package data, the guest sources, every subpackage (issue #24). The wheel is
really built (`pip wheel .`); running one in a fresh venv is measured in docs/install.md."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "schedcp_mcp").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_wheel_carries_policies_templates_agents_and_the_guest(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = tmp_path.glob("schedcp-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    policies = {d.name for d in (ROOT / "policies").iterdir() if (d / "policy.json").exists()}
    assert len(policies) >= 8
    for name in policies:
        assert f"schedcp_mcp/bundled/policies/{name}/policy.json" in names
    for rel in ("bundled/templates/scheduler.bpf.c.j2", "bundled/agents/planning.md",
                "bundled/agents/templates/subagent.md.j2", "bundled/claude/agents/schedcp-planning.md",
                "bundled/claude/commands/optimize.md", "sandbox/guest/loader.c", "sandbox/guest/agent.c",
                "repository/scx_catalog.json", "validate/probe.c", "validate/runqwait.bpf.c", "deploy/setclass.c"):
        assert f"schedcp_mcp/{rel}" in names, rel
    assert not [n for n in names if "__pycache__" in n or n.endswith(".bpf.o")]
