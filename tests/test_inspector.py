"""An independent MCP client, the MCP Inspector's CLI mode (npm `@modelcontextprotocol/inspector`),
lists the tools of `schedcp serve` and calls one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

INSPECTOR = shutil.which("mcp-inspector")
pytestmark = pytest.mark.skipif(INSPECTOR is None, reason="MCP Inspector not installed "
                                                          "(setup.sh installs it with npm)")


def inspector(*args: str) -> dict:
    r = subprocess.run([INSPECTOR, "--cli", sys.executable, "-m", "schedcp_mcp", "serve", *args],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_inspector_lists_the_tools_with_schemas():
    tools = {t["name"]: t for t in inspector("--method", "tools/list")["tools"]}
    assert {"get_system_info", "profile_workload", "create_plan", "validate_scheduler",
            "deploy"} <= set(tools)
    assert tools["deploy"]["annotations"]["destructiveHint"] is True
    assert "plan_id" in tools["get_plan"]["inputSchema"]["properties"]


def test_inspector_calls_get_system_info():
    res = inspector("--method", "tools/call", "--tool-name", "get_system_info")
    assert not res.get("isError")
    info = res["structuredContent"]
    assert info["topology"]["logical_cpus"] == os.cpu_count()
    assert "sched_ext" in info["kernel"]
