"""The real Claude Code CLI connects to `schedcp serve` (user config and the project's .mcp.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="Claude Code CLI not installed "
                                                       "(setup.sh installs it with npm)")


def claude(args: list[str], home: Path, cwd: Path) -> str:
    env = {**os.environ, "HOME": str(home), "SCHEDCP_HOME": str(home / "schedcp")}
    r = subprocess.run([CLAUDE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr


def test_claude_mcp_add_then_list_shows_connected(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    out = claude(["mcp", "add", "schedcp", "--", "schedcp", "serve"], tmp_path, proj)
    assert "schedcp" in out
    listing = claude(["mcp", "list"], tmp_path, proj)
    assert "schedcp" in listing and "Connected" in listing, listing


def test_project_mcp_json_connects_once_approved(tmp_path):
    proj = tmp_path / "p"
    (proj / ".claude").mkdir(parents=True)
    shutil.copy(ROOT / ".mcp.json", proj / ".mcp.json")
    (proj / ".claude" / "settings.local.json").write_text(json.dumps(
        {"enableAllProjectMcpServers": True, "enabledMcpjsonServers": ["schedcp"]}))
    subprocess.run(["git", "init", "-q", str(proj)], check=True)  # Claude Code's project root
    listing = claude(["mcp", "list"], tmp_path, proj)
    assert "schedcp" in listing and "Connected" in listing, listing
