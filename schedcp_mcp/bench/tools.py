"""`schedcp bench tools`: what the MCP server costs an agent, measured through a real stdio client.

The tool definitions (`tools/list`, read by every agent session) and each tool's default result for
the README's worked examples (the ids come from the newest records in the store), in bytes as they
cross the wire and in estimated tokens (answers.BYTES_PER_TOKEN). `shown` is what Claude Code puts in
the model's context: the compact JSON of the structured content.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client
from pydantic import BaseModel

from .. import answers, store

LIST_MAX = 40_000
RESULT_MAX = 8_192
MAIN_LOOP_MAX = 4_096
#: the optimization loop's results (profile, search, plan, campaign, report, token, deploy, feedback)
MAIN_LOOP = {"profile_workload", "get_profile", "search_policies", "create_plan", "get_plan",
             "validate_campaign", "validate_scheduler", "get_report", "issue_token", "deploy",
             "get_status", "get_feedback"}


class ToolCost(BaseModel):
    tool: str
    args: dict[str, Any]
    bytes: int
    shown: int
    tokens: int
    error: str | None = None

    @property
    def limit(self) -> int:
        return MAIN_LOOP_MAX if self.tool in MAIN_LOOP else RESULT_MAX


class ToolBench(BaseModel):
    tools: int
    list_bytes: int
    list_tokens: int
    definitions: dict[str, int]
    results: list[ToolCost]


def example_calls() -> list[tuple[str, dict[str, Any]]]:
    """The README's worked examples, with the newest ids of this store."""
    def newest(kind: str) -> str | None:
        got = store.ids(kind, 1)
        return got[0] if got else None

    calls: list[tuple[str, dict[str, Any]]] = [
        ("get_system_info", {}), ("get_cpu_stats", {"interval_s": 0.2}), ("list_workloads", {}),
        ("search_policies", {"query": "message passing latency interactive build many-processes"}),
        ("get_policy", {"name": "fifo"}), ("list_primitives", {}), ("list_profiles", {}),
        ("list_plans", {}), ("list_jobs", {}), ("get_status", {}), ("list_callbacks", {})]
    if p := newest("profile"):
        calls.append(("get_profile", {"profile_id": p}))
    if p := newest("plan"):
        calls.append(("get_plan", {"plan_id": p}))
    conn = store.db()
    for (jid,) in conn.execute("SELECT id FROM jobs WHERE kind IN ('campaign', 'validate') "
                               "ORDER BY created_at LIMIT 2"):
        calls.append(("get_job", {"job_id": jid}))
    for rid in store.ids("report", 3):
        calls.append(("get_report", {"report_id": rid}))
        calls.append(("get_feedback", {"subject_id": rid}))
    from ..reports import get_report

    if rid := next((r for r in store.ids("report", 20) if get_report(r).layer2), None):
        calls.append(("diagnose_report", {"report_id": rid}))
    if d := newest("deployment"):
        calls.append(("get_feedback", {"subject_id": d}))
    return calls


def server_params() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "schedcp_mcp", "serve"],
                                 env={**os.environ, "SCHEDCP_SERVER_WORKERS": "0"})


async def measure(calls: list[tuple[str, dict[str, Any]]]) -> ToolBench:
    async with stdio_client(server_params()) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        listed = await s.list_tools()
        defs = {t.name: len(t.model_dump_json(by_alias=True, exclude_none=True).encode())
                for t in listed.tools}
        total = len(listed.model_dump_json(by_alias=True, exclude_none=True).encode())
        out = []
        for tool, args in calls:
            res = await s.call_tool(tool, args)
            n = answers.result_bytes(res)
            shown = len(json.dumps(res.structured_content, separators=(",", ":"),
                                   ensure_ascii=False).encode()) if res.structured_content else n
            out.append(ToolCost(tool=tool, args=args, bytes=n, shown=shown, tokens=answers.tokens(n),
                                error=res.content[0].text if res.is_error else None))
    return ToolBench(tools=len(defs), list_bytes=total, list_tokens=answers.tokens(total),
                     definitions=dict(sorted(defs.items(), key=lambda kv: -kv[1])), results=out)


def bench_tools() -> ToolBench:
    return anyio.run(measure, example_calls())
