"""The four subagent definitions, the /optimize command and the plugin files: generated from
agents/*.md and the server's real tool list, never stale, never naming a tool that does not exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schedcp_mcp import agents
from schedcp_mcp.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
CLAUDE_TOOLS = {"Read", "Grep", "Glob"}  # the only non-MCP tools a role may have (all read-only)
DEFINITIONS = sorted((ROOT / ".claude" / "agents").glob("*.md")) + \
    sorted((ROOT / "plugin" / "agents").glob("*.md"))


def test_generated_files_are_up_to_date():
    stale = agents.drift()
    assert not stale, ("generated agent/plugin files are stale; run `schedcp agents generate` and "
                       "commit the result:\n" + "\n".join(stale.values())[:4000])


def test_every_server_tool_has_a_role():
    missing = agents.unassigned_tools()
    assert not missing, (f"MCP tools no agent may use: {missing}. Add each to the `tools:` list of "
                         "the role that needs it in agents/<role>.md, then `schedcp agents generate`")


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_definition_parses_and_names_only_real_tools(path):
    meta = agents.parse_agent(path)
    assert set(meta) == {"name", "description", "tools", "model"}
    assert meta["name"] == path.stem and meta["name"].startswith("schedcp-")
    assert len(meta["description"]) > 80 and "Use it" in meta["description"]
    assert meta["model"] in {"sonnet", "opus", "haiku", "inherit"}
    prefix = agents.PLUGIN_PREFIX if path.parent.parent.name == "plugin" else agents.PROJECT_PREFIX
    real = set(agents.server_tools())
    tools = [t.strip() for t in meta["tools"].split(",")]
    mcp = [t.removeprefix(prefix) for t in tools if t.startswith("mcp__")]
    assert all(t.startswith(prefix) for t in tools if t.startswith("mcp__"))
    assert mcp and set(mcp) <= real, set(mcp) - real
    assert set(tools) - {prefix + t for t in mcp} <= CLAUDE_TOOLS
    # the prose names no schedcp tool the server lacks either
    body = path.read_text().split("\n---\n", 1)[1]
    planned = {n for r in agents.load_roles() for n in r.tools}
    named = set(re.findall(r"`(?:mcp__\w+?__)?([a-z_]+)(?:\(|`)", body))
    assert not (named & planned) - real


def test_only_execution_may_deploy_or_roll_back():
    for role in agents.ROLES:
        allowed = agents.allowlist(role)
        if role in agents.DEPLOYING_ROLES:
            assert agents.DEPLOY_TOOLS <= allowed
        else:
            assert not allowed & agents.DEPLOY_TOOLS, role


def test_stages_hand_over_by_id():
    """Each role's tools let it produce what the next one reads: profile -> plan -> report/deployment."""
    a = {r: agents.allowlist(r) for r in agents.ROLES}
    assert {"profile_workload", "match_workloads"} <= a["observation"]
    assert {"get_profile", "search_policies", "create_plan"} <= a["planning"]
    assert {"get_plan", "validate_scheduler", "deploy", "get_status"} <= a["execution"]
    assert {"get_feedback", "contribute_policy", "record_outcome"} <= a["learning"]
    assert "validate_scheduler" not in a["planning"]  # planning decides, execution proves


def test_a_role_listing_a_tool_the_server_lacks_leaves_it_out():
    role = agents.Role(role="observation", name="schedcp-x", description="d", model="sonnet",
                       tools=["get_system_info", "no_such_tool"], body="Use `get_system_info`.")
    text = agents.render_agent(role, agents.server_tools(), agents.PROJECT_PREFIX)
    assert "mcp__schedcp__get_system_info" in text and "no_such_tool" not in text


def test_plugin_and_marketplace_describe_one_plugin_with_its_server():
    market = json.loads((ROOT / ".claude-plugin" / "marketplace.json").read_text())
    (entry,) = market["plugins"]
    plugin_dir = ROOT / entry["source"]
    manifest = json.loads((plugin_dir / ".claude-plugin" / "plugin.json").read_text())
    assert manifest["name"] == entry["name"] == "schedcp"
    mcp = json.loads((plugin_dir / ".mcp.json").read_text())
    assert mcp["mcpServers"]["schedcp"]["args"] == ["serve"]
    assert len(list((plugin_dir / "agents").glob("*.md"))) == 4
    assert (plugin_dir / "commands" / "optimize.md").exists()


def test_optimize_command_delegates_to_the_four_agents_in_order():
    text = (ROOT / ".claude" / "commands" / "optimize.md").read_text()
    names = [f"schedcp-{r}" for r in agents.ROLES]
    positions = [text.index(n) for n in names]
    assert positions == sorted(positions)
    assert "$ARGUMENTS" in text and "--target host" in text


def test_install_into_a_project_writes_agents_command_and_server(tmp_path):
    (tmp_path / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}}))
    r = agents.install("project", tmp_path)
    assert len(r.written) == 6 and not r.unchanged
    assert agents.allowlist("execution", tmp_path) == agents.allowlist("execution")
    servers = json.loads((tmp_path / ".mcp.json").read_text())["mcpServers"]
    assert set(servers) == {"other", "schedcp"}  # the project's own servers are kept
    again = agents.install("project", tmp_path)
    assert not again.written and len(again.unchanged) == 6


def test_install_never_overwrites_a_changed_file_without_force(tmp_path):
    agents.install("project", tmp_path)
    mine = tmp_path / ".claude" / "agents" / "schedcp-learning.md"
    mine.write_text("my own edits")
    with pytest.raises(BadInput, match="--force"):
        agents.install("project", tmp_path)
    assert mine.read_text() == "my own edits"
    agents.install("project", tmp_path, force=True)
    assert mine.read_text() != "my own edits"


def test_install_refuses_a_different_schedcp_server_without_force(tmp_path):
    (tmp_path / ".mcp.json").write_text(json.dumps({"mcpServers": {"schedcp": {"command": "old"}}}))
    with pytest.raises(BadInput, match="different 'schedcp' server"):
        agents.install("project", tmp_path)
    assert not (tmp_path / ".claude").exists()


def test_install_says_when_a_configured_server_shadows_the_plugins(tmp_path):
    """Claude Code 2.1 with the plugin enabled and `claude mcp add schedcp -- schedcp serve` (local
    scope) listed only the local server: the plugin's was skipped (checked with the real CLI)."""
    import json as _json

    from schedcp_mcp import agents as ag

    home, proj = tmp_path / "home", tmp_path / "proj"
    (home / ".claude").mkdir(parents=True)
    proj.mkdir()
    assert ag.plugin_shadowed(proj, home) == []  # no plugin: nothing to say
    (home / ".claude" / "settings.json").write_text(_json.dumps({"enabledPlugins": {"schedcp@schedcp": True}}))
    assert ag.plugin_shadowed(proj, home) == []  # the plugin alone: fine
    (home / ".claude.json").write_text(_json.dumps({"projects": {str(proj): {"mcpServers": {
        "schedcp": {"type": "stdio", "command": "schedcp", "args": ["serve"]}}}}}))
    (where,) = ag.plugin_shadowed(proj / "sub", home)
    assert "local scope" in where and "claude mcp remove schedcp -s local" in where
    (proj / ".mcp.json").write_text(_json.dumps({"mcpServers": {"schedcp": {}}}))
    assert any("project scope" in w for w in ag.plugin_shadowed(proj, home))
    (warning,) = ag.shadow_warning(ag.plugin_shadowed(proj, home))
    assert "skips the plugin's server" in warning
