"""The real Claude Code CLI connects to `schedcp serve` (user config and the project's .mcp.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


# --- the plugin: this repository is a marketplace with the schedcp plugin --------------------------

def test_plugin_validates():
    for target in (ROOT / "plugin", ROOT):  # the plugin, and the repository as a marketplace
        out = subprocess.run([CLAUDE, "plugin", "validate", str(target)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode == 0 and "Validation passed" in out.stdout + out.stderr, out


def test_plugin_installs_from_the_repository_marketplace_and_its_server_connects(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    added = claude(["plugin", "marketplace", "add", str(ROOT)], tmp_path, proj)
    assert "Successfully added marketplace: schedcp" in added, added
    installed = claude(["plugin", "install", "schedcp@schedcp"], tmp_path, proj)
    assert "Successfully installed plugin: schedcp@schedcp" in installed, installed
    details = claude(["plugin", "details", "schedcp"], tmp_path, proj)
    agents_line = next(line for line in details.splitlines() if "Agents (" in line)
    assert "Agents (4)" in agents_line, details
    for role in ("observation", "planning", "execution", "learning"):
        assert f"schedcp-{role}" in agents_line
    assert "MCP servers (1)" in details and "optimize" in details, details
    listing = claude(["mcp", "list"], tmp_path, proj)
    assert "plugin:schedcp:schedcp: schedcp serve - ✔ Connected" in listing, listing


def test_agents_install_then_claude_code_connects_the_project_server(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    env = {**os.environ, "HOME": str(tmp_path), "SCHEDCP_HOME": str(tmp_path / "schedcp")}
    r = subprocess.run([sys.executable, "-m", "schedcp_mcp", "agents", "install", "--dir", str(proj),
                        "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["written"]) == 6
    (proj / ".claude" / "settings.local.json").write_text(json.dumps(
        {"enableAllProjectMcpServers": True, "enabledMcpjsonServers": ["schedcp"]}))
    listing = claude(["mcp", "list"], tmp_path, proj)
    assert "schedcp: schedcp serve - ✔ Connected" in listing, listing


def test_agents_install_user_scope_registers_the_server_with_claude_code(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "SCHEDCP_HOME": str(tmp_path / "schedcp")}
    r = subprocess.run([sys.executable, "-m", "schedcp_mcp", "agents", "install", "--scope", "user",
                        "--json"], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "claude mcp add --scope user" in json.loads(r.stdout)["mcp"]
    assert len(list((tmp_path / ".claude" / "agents").glob("schedcp-*.md"))) == 4
    listing = claude(["mcp", "list"], tmp_path, proj)
    assert "schedcp: schedcp serve - ✔ Connected" in listing, listing


# --- what Claude Code puts in the model's context (a real turn against a stand-in Messages API) ----

def test_claude_code_shows_the_model_the_structured_summary_not_the_text(tmp_path):
    from fake_anthropic import Fake

    api = Fake("mcp__schedcp__get_policy", {"name": "fifo"})
    cfg = tmp_path / "mcp.json"
    cfg.write_text(json.dumps({"mcpServers": {"schedcp": {
        "type": "stdio", "command": sys.executable, "args": ["-m", "schedcp_mcp", "serve"],
        "env": {"PYTHONPATH": str(ROOT), "SCHEDCP_HOME": str(tmp_path / "schedcp"),
                "SCHEDCP_SANDBOX_DIR": os.environ["SCHEDCP_SANDBOX_DIR"],
                "SCHEDCP_SERVER_WORKERS": "0"}}}}))
    (tmp_path / "user").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "user"), "ANTHROPIC_BASE_URL": api.url,
           "ANTHROPIC_API_KEY": "sk-ant-offline-test", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           # wait for the server however loaded the machine (the first request offers the tools
           # of the servers connected by then)
           "MCP_CONNECT_TIMEOUT_MS": "120000", "MCP_TIMEOUT": "120000"}
    r = subprocess.run([CLAUDE, "-p", "show me the fifo policy", "--mcp-config", str(cfg),
                        "--strict-mcp-config", "--allowedTools", "mcp__schedcp__get_policy",
                        "--output-format", "json"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = api.tool_results()
    offered = [t.get("name") for _, b in api.requests for t in b.get("tools", [])]
    if "mcp__schedcp__get_policy" not in offered:  # seen on a loaded 2-core host: the turn went
        pytest.skip("Claude Code did not connect the schedcp server before its first request")
    assert len(results) == 1, r.stderr[-1500:]
    result = results[0]
    shown = result["content"]
    shown = shown if isinstance(shown, str) else "".join(b.get("text", "") for b in shown)
    data = json.loads(shown)  # the structured content, compact: not the text line beside it
    assert data["policy"]["name"] == "fifo" and "source_code" not in data
    assert "recorded outcome(s))" not in shown
    assert len(shown.encode()) <= 4096
    # and the definitions it sends the model: every schedcp tool, within the 40 kB budget
    offered = [t for _, body in api.requests for t in body.get("tools", [])
               if t.get("name", "").startswith("mcp__schedcp__")]
    first = {t["name"]: t for t in offered}
    assert "mcp__schedcp__issue_token" in first
    assert len(json.dumps(list(first.values())).encode()) <= 40_000
