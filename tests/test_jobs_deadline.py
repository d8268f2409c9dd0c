"""Complete-by deadlines set from the interfaces (`--deadline SECONDS`, MCP `deadline_s`): a job past
its deadline is dead-lettered — before it starts (when a pool claims it) or while it runs (the
supervisor's sweep, which also stops the running work). No VM boots here: the not-started jobs never
start, and the running case uses the trivial `sleep` kind through the same queue call the options
make."""

from __future__ import annotations

import json
import time

import pytest
from mcp import ClientSession, stdio_client

from schedcp_mcp.errors import InfrastructureError
from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.pool import Pool
from test_jobs_interfaces import schedcp
from test_mcp_stdio import server_params


def test_cli_deadline_passed_before_start_dead_letters_the_job_without_running_it():
    p = schedcp("validate", "--policy", "fifo", "--deadline", "0.5", "--background", "--json")
    assert p.returncode == 0, p.stderr
    jid = json.loads(p.stdout)["job_id"]
    j = queue.get(jid)
    assert j.deadline is not None and 0.3 < j.deadline - j.created_at <= 0.5
    time.sleep(0.7)
    w = schedcp("jobs", "wait", jid, "--json")  # no worker: it runs a pool, whose claim sees the deadline
    assert w.returncode == 1, w.stderr
    shown = json.loads(w.stdout)["job"]
    assert shown["state"] == "dead" and shown["attempts"] == 0
    assert "passed its complete-by deadline before it could start" in shown["error"]


def test_cli_campaign_deadline_is_every_nodes_deadline():
    p = schedcp("campaign", "--policy", "fifo", "--policy", "batch", "--deadline", "0.5", "--background",
                "--json")
    assert p.returncode == 0, p.stderr
    camp = queue.get(json.loads(p.stdout)["job_id"])
    kids = queue.list_jobs(parent=camp.id)
    assert len(kids) == 4 and {k.deadline for k in kids} == {camp.deadline}
    time.sleep(0.7)
    w = schedcp("jobs", "wait", camp.id, "--json")
    assert w.returncode == 1
    assert {k.state for k in queue.list_jobs(parent=camp.id)} <= {"dead", "cancelled"}
    assert queue.get(camp.id).state == "dead"


def test_cli_synchronous_command_says_the_deadline_passed():
    # a synchronous verify whose deadline passes while it waits in the queue behind a busy pool
    blocker = queue.submit("sleep", {"seconds": 3}, lane="urgent")
    with Pool(1, heartbeat_s=0.1):
        while queue.get(blocker.id).state != "running":
            time.sleep(0.02)
        p = schedcp("verify", "--policy", "fifo", "--deadline", "1")
    assert p.returncode == 2
    assert "did not complete by its deadline" in p.stderr and "--deadline" in p.stderr


def test_running_job_past_its_deadline_is_dead_lettered_and_stopped():
    j = queue.submit("sleep", {"seconds": 30}, complete_by_s=0.5, max_attempts=3)
    t0 = time.monotonic()
    with Pool(1, heartbeat_s=0.05) as pool:
        j = queue.wait(j.id, 10, poll_s=0.02)
        while pool.active and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        assert pool.active == 0  # the sleeping work was stopped, not waited for
    assert j.state == "dead" and j.attempts == 1  # not retried: a deadline is final
    assert "passed its complete-by deadline while running" in j.error
    assert [a.outcome for a in queue.detail(j.id).attempts] == ["timeout"]
    assert time.monotonic() - t0 < 5
    with pytest.raises(InfrastructureError, match="did not complete by its deadline"):
        queue.result_or_raise(j)


@pytest.mark.anyio
async def test_mcp_deadline_s_on_the_long_tools():
    params = server_params()
    params.env["SCHEDCP_SERVER_WORKERS"] = "0"  # no pool in the server: the job waits in the queue
    async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        tools = {t.name: t for t in (await s.list_tools()).tools}
        for name in ("submit_scheduler", "validate_scheduler", "validate_campaign", "tune_policy"):
            assert "deadline_s" in tools[name].input_schema["properties"], name
        bad = await s.call_tool("validate_scheduler", {"policy": "fifo", "deadline_s": -1, "background": True})
        assert bad.is_error and "deadline_s" in bad.content[0].text
        res = await s.call_tool("validate_scheduler", {"policy": "fifo", "deadline_s": 0.5, "background": True})
        assert not res.is_error, res.content
        jid = res.structured_content["job_id"]
        j = queue.get(jid)
        assert j.deadline is not None and 0.3 < j.deadline - j.created_at <= 0.5
        time.sleep(0.7)
        with Pool(1, scope=jid):
            queue.wait(jid, 10)
        got = (await s.call_tool("get_job", {"job_id": jid})).structured_content["job"]
        assert got["state"] == "dead" and "complete-by deadline" in got["error"]


@pytest.mark.image
def test_cli_validation_running_past_its_deadline_is_stopped_with_its_vm(manifest, schedcp_home):
    t0 = time.monotonic()
    p = schedcp("validate", "--policy", "fifo", "--no-cache", "--deadline", "15", "--json", timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "did not complete by its deadline" in p.stdout  # (--json: the error as JSON on stdout)
    j = queue.list_jobs(kind="validate")[0]
    assert j.state == "dead" and j.attempts == 1 and "while running" in j.error
    assert took < 60  # stopped at the deadline, not at the end of the validation
    from schedcp_mcp.sandbox.vm import running_vms

    assert running_vms() == []  # its VMs were stopped
