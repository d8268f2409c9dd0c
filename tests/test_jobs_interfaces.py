"""The supervisor through its interfaces: the MCP tools over a real stdio session (the server's own
worker pool runs the jobs) and the installed command. Layer 1 jobs here stop at the source check
(no VM): the job path is the same as for any verify."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mcp import ClientSession, stdio_client

from schedcp_mcp.jobs import queue
from test_mcp_stdio import server_params

HOSTILE = '#include "/etc/passwd"\nchar _license[] __attribute__((section("license"))) = "GPL";\n'


def schedcp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.anyio
async def test_mcp_background_job_then_get_list_and_cancel():
    async with stdio_client(server_params()) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        res = await s.call_tool("submit_scheduler", {"source": HOSTILE, "background": True})
        assert not res.is_error, res.content
        queued = res.structured_content
        assert queued["job_id"].startswith("job-") and queued.get("report_id") is None
        for _ in range(100):
            job = (await s.call_tool("get_job", {"job_id": queued["job_id"]})).structured_content
            if job["job"]["state"] == "succeeded":
                break
            time.sleep(0.1)
        j = job["job"]
        assert j["state"] == "succeeded" and j["report_id"].startswith("rep-")
        full = (await s.call_tool("get_job", {"job_id": queued["job_id"], "detail": "full"})
                ).structured_content["job"]
        assert json.loads(full["result_json"])["verdict"] == "rejected"
        listed = (await s.call_tool("list_jobs", {"kind": "verify"})).structured_content
        assert [x["id"] for x in listed["jobs"]] == [queued["job_id"]]
        assert set(listed["queue_depth"]) == {"urgent", "high", "normal", "low"}

        # a running job: cancel_job stops it
        long = queue.submit("sleep", {"seconds": 60})
        for _ in range(100):
            if queue.get(long.id).state == "running":
                break
            time.sleep(0.1)
        done = (await s.call_tool("cancel_job", {"job_id": long.id})).structured_content
        assert done["cancelled"] == [long.id] and queue.get(long.id).state == "cancelled"
        bad = await s.call_tool("get_job", {"job_id": "job-nope"})
        assert bad.is_error and "no job 'job-nope'" in bad.content[0].text


@pytest.mark.anyio
async def test_mcp_foreground_call_waits_with_progress_and_names_its_job():
    seen = []

    async def progress(p, total, message):
        seen.append((p, message))

    async with stdio_client(server_params()) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        res = await s.call_tool("submit_scheduler", {"source": HOSTILE}, progress_callback=progress)
    data = res.structured_content
    assert data["layer1"]["verdict"] == "rejected" and data["job_id"].startswith("job-")
    assert seen  # the job's progress, forwarded as MCP progress notifications


def test_cli_background_then_jobs_list_show_wait_cancel_and_the_cache(tmp_path):
    src = tmp_path / "hostile.bpf.c"
    src.write_text(HOSTILE)
    p = schedcp("verify", str(src), "--background", "--json")
    assert p.returncode == 0, p.stderr
    queued = json.loads(p.stdout)
    assert queued["state"] == "pending" and "no worker is running" in queued["hint"]
    listed = json.loads(schedcp("jobs", "--json").stdout)
    assert [j["id"] for j in listed] == [queued["job_id"]]
    w = schedcp("jobs", "wait", queued["job_id"], "--json")  # no worker: it runs the job itself
    assert w.returncode == 0, w.stderr
    shown = json.loads(schedcp("jobs", "show", queued["job_id"], "--json").stdout)
    assert shown["job"]["state"] == "succeeded" and shown["job"]["result"]["verdict"] == "rejected"
    assert [a["outcome"] for a in shown["attempts"]] == ["succeeded"]
    again = json.loads(schedcp("verify", str(src), "--background", "--json").stdout)
    if queue.get(again["job_id"]).dedupe_key:  # (dedupe needs a built sandbox image)
        assert again["state"] == "succeeded" and queue.get(again["job_id"]).cached_from == queued["job_id"]
    c = schedcp("jobs", "cancel", queued["job_id"], "--json")
    assert c.returncode == 0 and json.loads(c.stdout) == {"cancelled": []}
    missing = schedcp("jobs", "show", "job-nope")
    assert missing.returncode == 2 and "no job 'job-nope'" in missing.stderr
