"""OptimizationPlan: stored with an id, checked when created, read back over MCP."""

from __future__ import annotations

import pytest
from mcp import ClientSession, stdio_client

from schedcp_mcp import plans
from schedcp_mcp.errors import BadInput, NotFound
from schedcp_mcp.observe.profile import Goal, profile_workload

from test_mcp_stdio import server_params


@pytest.fixture
def profile_id():
    return profile_workload(["sh", "-c", "for i in 1 2 3; do sleep 0.05; done"], None, 5,
                            use_perf=False, use_runqlat=False).id


def fifo(**kw):
    return plans.PlannedCandidate(policy="fifo", strategy="reconfigure", why="test", **kw)


def test_plan_is_stored_and_read_back(profile_id):
    goal = Goal(metric="messaging_time_s", direction="lower", target_ratio=0.95)
    p = plans.create_plan(profile_id, ["hackbench"], [goal], "reconfigure", "fifo wins messaging",
                          [fifo(params={"slice_ns": "3000000"})])
    assert p.id.startswith("plan-")
    got = plans.get_plan(p.id)
    assert got == p and got.candidates[0].label == "fifo[slice_ns=3000000]"
    assert plans.list_plans(profile_id=profile_id) == [p]


@pytest.mark.parametrize("candidate, goal, match", [
    (dict(params={"slice_ns": "1"}), "messaging_time_s", "out of range"),
    (dict(params={"no_such": "1"}), "messaging_time_s", "no parameter"),
    (dict(), "p99_wakeup_latency_us", "not measured by the chosen workloads"),
])
def test_a_plan_that_could_not_run_is_refused_when_created(profile_id, candidate, goal, match):
    g = Goal(metric=goal, direction="lower", target_ratio=1.0)
    with pytest.raises(BadInput, match=match):
        plans.create_plan(profile_id, ["hackbench"], [g], "reconfigure", "r", [fifo(**candidate)])


def test_a_candidate_names_one_artifact():
    with pytest.raises(ValueError, match="exactly one"):
        plans.PlannedCandidate(policy="fifo", report_id="rep-x", strategy="reconfigure", why="w")


def test_unknown_plan_says_what_exists():
    with pytest.raises(NotFound, match="no optimization plan"):
        plans.get_plan("plan-nope")


@pytest.mark.anyio
async def test_create_plan_over_mcp_keeps_the_goals_the_workloads_measure(profile_id):
    async with stdio_client(server_params()) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        res = await s.call_tool("create_plan", {
            "profile_id": profile_id, "workloads": ["hackbench"], "strategy": "reconfigure",
            "rationale": "fifo won message passing before",
            "candidates": [{"policy": "fifo", "strategy": "reconfigure", "why": "global FIFO"}]})
        assert not res.is_error, res.content
        plan = res.structured_content
        # the profile's goals that hackbench measures (or do-no-harm on its own metric)
        assert plan["goals"] and all(g["metric"] in ("messaging_time_s", "wall_time_s")
                                     for g in plan["goals"])
        got = await s.call_tool("get_plan", {"plan_id": plan["id"]})
        assert got.structured_content["id"] == plan["id"]
        bad = await s.call_tool("create_plan", {
            "profile_id": profile_id, "workloads": ["hackbench"], "strategy": "reconfigure",
            "rationale": "r", "candidates": [{"policy": "scx_rusty", "strategy": "reconfigure",
                                             "why": "w"}]})
        assert bad.is_error and "catalogued" in bad.content[0].text
