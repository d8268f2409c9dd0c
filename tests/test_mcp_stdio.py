"""The MCP server through the SDK's own client over stdio, spawning `schedcp serve` for real."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from schedcp_mcp import store

pytestmark = pytest.mark.anyio

CORE_TOOLS = {"get_system_info", "get_cpu_stats", "profile_workload", "list_profiles",
              "get_profile", "search_policies", "get_policy"}


ROOT = Path(__file__).resolve().parent.parent


def server_params(*serve_args: str, home: str | None = None, sandbox: str | None = None) -> StdioServerParameters:
    """`schedcp serve` of this checkout (the console script may point at another one), in the test's
    home unless told another."""
    return StdioServerParameters(command=sys.executable, args=["-m", "schedcp_mcp", "serve", *serve_args],
                                 env={"SCHEDCP_HOME": home or os.environ["SCHEDCP_HOME"],
                                      "SCHEDCP_SANDBOX_DIR": sandbox or os.environ["SCHEDCP_SANDBOX_DIR"],
                                      "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})


async def call(name: str, args: dict | None = None, progress=None, serve_args: tuple[str, ...] = ()):
    return (await calls([(name, args)], progress, serve_args))[0]


async def calls(named: list[tuple[str, dict | None]], progress=None, serve_args: tuple[str, ...] = ()):
    """Several calls in one session: one server start (1.5-3 s of the fast suite each) for all."""
    async with stdio_client(server_params(*serve_args)) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        return [await s.call_tool(name, args or {}, progress_callback=progress) for name, args in named]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"  # module-wide: the shared server's session lives across the module's tests


@pytest.fixture(scope="module")
async def server(tmp_path_factory):
    """One `schedcp serve` with the default flags, in a home of its own (no image), for the tests that
    need nothing else: each start costs 1.5-3 s of the fast suite. (A test that reads its own store,
    or needs other flags, starts its own.)"""
    d = tmp_path_factory.mktemp("stdio")
    params = server_params(home=str(d / "home"), sandbox=str(d / "no-sandbox-image"))
    async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
        s.init = await s.initialize()
        yield s


async def test_tools_list_shows_tools_with_schemas_and_annotations(server):
    assert server.init.server_info.name == "schedcp"
    tools = {t.name: t for t in (await server.list_tools()).tools}
    assert CORE_TOOLS <= set(tools)
    cpu = tools["get_cpu_stats"]
    assert cpu.input_schema["properties"]["interval_s"]["maximum"] == 60
    token = tools["issue_token"]  # output schemas only where the shape is fixed and small
    assert token.output_schema and "token" in token.output_schema["properties"]
    assert cpu.annotations.read_only_hint is True
    assert tools["profile_workload"].annotations.read_only_hint is False


async def test_call_returns_structured_content(server):
    res = await server.call_tool("get_cpu_stats", {"interval_s": 0.2, "top_n": 3})
    assert not res.is_error
    data = res.structured_content
    assert data["ncpus"] == os.cpu_count()
    assert len(data["per_cpu"]) == os.cpu_count()
    assert len(data["top_processes"]) <= 3


async def test_bad_argument_is_a_tool_error_not_a_traceback(server):
    res = await server.call_tool("get_cpu_stats", {"interval_s": 999})
    assert res.is_error
    text = res.content[0].text
    assert "interval_s" in text and "Traceback" not in text


async def test_unknown_policy_suggests_nearest_names(server):
    res = await server.call_tool("get_policy", {"name": "vtime_fiar"})
    assert res.is_error
    assert "vtime_fair" in res.content[0].text and "Traceback" not in res.content[0].text


async def test_validate_campaign_takes_its_candidates_argument_by_its_documented_name(server):
    # the tool's argument is `candidates` (a pydantic alias on a renamed parameter once made every call
    # an internal TypeError); a misspelt policy is the agent's error, answered before any VM boots
    res = await server.call_tool("validate_campaign", {"candidates": [{"policy": "vtime_fiar"}]})
    assert res.is_error
    text = res.content[0].text
    assert "vtime_fair" in text and "internal error" not in text and "Traceback" not in text


async def test_profile_workload_stores_profile_then_get_profile_finds_it(server):
    progress = []

    async def on_progress(p, total, msg):
        progress.append(p)

    # a sandbox workload's command: allowed without any operator flag
    res = await server.call_tool("profile_workload", {"command": ["stress-ng", "--cpu", "4", "--cpu-method",
                                                                  "int64", "-t", "1", "--metrics-brief"],
                                                      "duration_s": 5}, progress_callback=on_progress)
    assert not res.is_error, res.content
    pid = res.structured_content["id"]
    assert res.structured_content["characteristics"]["cpu_utilization"] > 0  # the summary
    got = await server.call_tool("get_profile", {"profile_id": pid, "detail": "full"})
    assert got.structured_content["id"] == pid
    assert got.structured_content["process_tree"]["cpu_time_s"] > 0
    assert progress, "long tools send MCP progress notifications"


async def test_profiling_a_missing_command_is_a_clear_error():
    res = await call("profile_workload", {"command": ["no-such-program-xyz"], "duration_s": 1},
                     serve_args=("--allow-command",))
    assert res.is_error and "command not found" in res.content[0].text


async def test_submit_scheduler_refuses_host_file_include_before_compiling(server):
    src = '#include "/etc/passwd"\nchar _license[] __attribute__((section("license"))) = "GPL";\n'
    res = await server.call_tool("submit_scheduler", {"source": src})
    assert not res.is_error, res.content
    data = res.structured_content
    assert data["layer1"]["verdict"] == "rejected"
    assert data["layer1"]["stage"] == "source_check"
    assert any("/etc/passwd" in e["message"] for e in data["layer1"]["errors"])


async def test_host_verify_from_an_mcp_client_needs_the_operators_permission(server):
    res = await server.call_tool("submit_scheduler", {"policy": "fifo", "target": "host"})
    assert res.is_error
    text = res.content[0].text
    assert "--allow-host-verify" in text and "Traceback" not in text


async def test_deploy_with_forged_token_is_refused_and_nothing_loads():
    res, st = await calls([("deploy", {"token": "eyJ2IjoxfQ.AAAA", "target": "sandbox"}), ("get_status", None)])
    assert res.is_error and "signature" in res.content[0].text
    assert not st.is_error
    assert st.structured_content["deployments"] == []
    assert st.structured_content["targets"]["sandbox"] == "staging VM not running"  # nothing booted
    actions = [a["action"] for a in store.audit_log()]
    assert "deploy_refused" in actions and "deploy" not in actions


async def test_an_mcp_client_cannot_run_commands_unless_the_operator_allows_it(server, tmp_path):
    marker = tmp_path / "ran"
    args = {"command": ["sh", "-c", f"touch {marker}; cat /etc/shadow"], "duration_s": 1}
    res = await server.call_tool("profile_workload", args)
    assert res.is_error and "off for MCP clients" in res.content[0].text
    assert not marker.exists()
    res = await call("profile_workload", args, serve_args=("--allow-command-prefix", "sh -c"))
    assert marker.exists()
    assert "root:" not in str(res.content)  # the workload's output never comes back


async def test_a_negative_pid_is_an_input_error_not_an_internal_one(server):
    res = await server.call_tool("profile_workload", {"pid": -1, "duration_s": 1})
    assert res.is_error and "internal error" not in res.content[0].text
    assert "pid" in res.content[0].text
