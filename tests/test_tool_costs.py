"""What the MCP tools cost an agent, through a real stdio client: definitions, default results,
text beside structured content, pagination, issue_token, and read-only tools that never write.

The store is a real `schedcp optimize --workload hackbench` run (tests/fixtures/optimize_run.json:
its profile, plan, three validation reports, deployment, outcomes and campaign jobs).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession, stdio_client

from schedcp_mcp import answers, reports, server, store, toolbench
from schedcp_mcp.jobs.campaigns import CampaignResult
from schedcp_mcp.jobs.queue import get as get_job
from schedcp_mcp.models import Deployment

pytestmark = pytest.mark.anyio
RUN = json.loads((Path(__file__).parent / "fixtures" / "optimize_run.json").read_text())
CAMPAIGN = "job-431450ea1b"
PASSED = "rep-8c02a41d30"


@pytest.fixture
def run_store(schedcp_home):
    """The optimize run's rows in this test's store."""
    with store.transaction() as conn:
        for table, rows in RUN.items():
            for row in rows:
                cols = ", ".join(row)
                conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})",
                             list(row.values()))
    return schedcp_home


def rows() -> dict[str, list[tuple]]:
    """Every row of every table of the store."""
    conn = store.db()
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                         "AND name NOT LIKE 'sqlite_%'")]
    return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}


@asynccontextmanager
async def session():
    """One server for a test's calls (a start costs 1.5-3 s of the fast suite)."""
    async with stdio_client(toolbench.server_params()) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        yield s


async def session_calls(calls):
    async with session() as s:
        return [await s.call_tool(name, args) for name, args in calls], (await s.list_tools()).tools


async def test_tools_list_is_at_most_40_kb():
    b = await toolbench.measure([])
    print(f"tools/list: {b.list_bytes} bytes, {b.tools} tools; largest {list(b.definitions.items())[:5]}")
    assert b.list_bytes <= toolbench.LIST_MAX
    assert "issue_token" in b.definitions


async def test_every_default_result_of_the_worked_examples_fits(run_store):
    b = await toolbench.measure(toolbench.example_calls() + [("issue_token", {"report_id": PASSED})])
    print(f"\n{'tool':18} {'bytes':>6} {'shown':>6} {'limit':>6}  arguments")
    for r in b.results:
        print(f"{r.tool:18} {r.bytes:6} {r.shown:6} {r.limit:6}  {json.dumps(r.args)}")
    assert not [r for r in b.results if r.error], [r.error for r in b.results if r.error]
    over = [(r.tool, r.bytes) for r in b.results if r.bytes > r.limit]
    assert not over, over
    assert {"get_report", "get_job", "get_feedback", "get_plan", "get_profile", "issue_token"} <= \
        {r.tool for r in b.results}


def test_the_long_tools_answer_the_same_summaries_within_the_main_loop_limit(run_store):
    # validate_scheduler / submit_scheduler answer report_answer, validate_campaign the campaign brief,
    # deploy and rollback deployment_answer: the same builders on the run's real records
    sizes = {}
    for rid in store.ids("report", 10):
        sizes[f"validate_scheduler {rid}"] = answers.result_bytes(
            server.report_answer(reports.get_report(rid), "summary", "job-x"))
    camp = CampaignResult.model_validate(get_job(CAMPAIGN).result)
    sizes["validate_campaign"] = answers.result_bytes(answers.answer(
        {"job_id": CAMPAIGN, "state": "succeeded", **answers.campaign_brief(camp)}, "campaign"))
    dep = store.list_records("deployment", Deployment)[0]
    sizes["deploy"] = answers.result_bytes(server.deployment_answer(dep, "summary"))
    print(sizes)
    assert all(n <= toolbench.MAIN_LOOP_MAX for n in sizes.values()), sizes


async def test_text_is_a_short_line_beside_the_structured_content(run_store):
    results, _ = await session_calls([("get_report", {"report_id": PASSED}),
                                      ("get_policy", {"name": "fifo"}),
                                      ("list_jobs", {}), ("get_feedback", {"subject_id": PASSED})])
    for res in results:
        text = res.content[0].text
        assert res.structured_content and len(res.content) == 1
        assert len(text) < 400 and not text.lstrip().startswith("{"), text
    assert results[0].content[0].text.startswith(f"{PASSED} (fifo): passed layers 1 and 2")


async def test_full_detail_gives_what_the_summary_leaves_out(run_store):
    (short, full, pol, pol_full), _ = await session_calls([
        ("get_report", {"report_id": PASSED}), ("get_report", {"report_id": PASSED, "detail": "full"}),
        ("get_policy", {"name": "fifo"}), ("get_policy", {"name": "fifo", "detail": "full"})])
    s, f = short.structured_content, full.structured_content
    assert s["passed"] and s["layer2"]["workloads"][0]["ratio"] < 1 and "timeline" not in s["layer2"]
    assert f["layer2"]["timeline"] and f["layer2"]["workloads"][0]["baseline"]  # samples
    assert "source_code" not in pol.structured_content
    assert "SEC(" in pol_full.structured_content["source_code"]


async def test_lists_page_with_a_cursor(run_store):
    async with session() as s:
        page1 = (await s.call_tool("list_jobs", {"parent": CAMPAIGN, "limit": 4})).structured_content
        assert len(page1["jobs"]) == 4 and page1["next_cursor"]
        page2 = (await s.call_tool("list_jobs", {"parent": CAMPAIGN, "limit": 4,
                                                 "cursor": page1["next_cursor"]})).structured_content
    assert len(page2["jobs"]) == 2 and page2.get("next_cursor") is None
    assert not {j["id"] for j in page1["jobs"]} & {j["id"] for j in page2["jobs"]}


async def test_issue_token_for_a_passed_report_and_deploy_dry_run_accepts_it(run_store):
    async with session() as s:
        tok = await s.call_tool("issue_token", {"report_id": PASSED})
        dry = await s.call_tool("get_job", {"job_id": "job-8f00ffd45a"})
        assert not tok.is_error, tok.content
        t = tok.structured_content
        assert t["report_id"] == PASSED and t["target"] == "sandbox" and t["token"].count(".") == 1
        assert "token" not in json.dumps(dry.structured_content)  # get_job no longer hands out tokens
        check = await s.call_tool("deploy", {"token": t["token"], "dry_run": True})
        tools = (await s.list_tools()).tools
    assert not check.is_error, check.content
    annotations = {x.name: x.annotations for x in tools}
    assert annotations["issue_token"].read_only_hint is False


async def test_issue_token_refuses_a_report_that_did_not_pass(run_store):
    failed = reports.get_report(PASSED).model_copy(update={"id": "rep-failed0001",
                                                           "invalidated": True,
                                                           "invalidated_reason": "test"})
    reports.save(failed)
    (res,), _ = await session_calls([("issue_token", {"report_id": "rep-failed0001"})])
    assert res.is_error and "did not pass" in res.content[0].text


async def test_read_only_tools_change_no_store_row(run_store):
    # every tool annotated readOnlyHint is called (with the worked examples' arguments, or none);
    # the whole store, every table, is the same afterwards
    before = rows()
    async with session() as s:
        tools = (await s.list_tools()).tools
        read_only = {t.name for t in tools if t.annotations and t.annotations.read_only_hint}
        examples = toolbench.example_calls() + [("get_job", {"job_id": "job-8f00ffd45a", "detail": "full"}),
                                                ("get_report", {"report_id": PASSED, "detail": "full"})]
        calls = [(n, a) for n, a in examples if n in read_only]
        calls += [(n, {}) for n in sorted(read_only - {n for n, _ in calls})]
        results = [await s.call_tool(n, a) for n, a in calls]
    assert {n for n, _ in calls} == read_only and {"get_job", "get_report"} <= read_only
    assert not [(n, r.content[0].text) for (n, _), r in zip(calls, results) if r.is_error]
    await anyio.sleep(0.2)
    after = rows()
    changed = {t: (len(before[t]), len(after.get(t, []))) for t in before if before[t] != after.get(t)}
    assert not changed, changed
