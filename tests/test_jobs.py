"""The supervisor: real jobs in the real store (SQLite), run by real pools — in this process, or in
`schedcp worker` processes that the tests start and kill. The job kinds are the trivial built-in
ones (noop, sleep, flaky): the supervisor's behaviour does not depend on what a job does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedcp_mcp.errors import NotFound
from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.models import Budget
from schedcp_mcp.jobs.pool import Pool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setenv("SCHEDCP_JOBS_BACKOFF_S", "0.05")


def wait_done(job_id: str, timeout_s: float = 20.0):
    j = queue.wait(job_id, timeout_s, poll_s=0.02)
    assert j.done, f"{job_id} still {j.state} after {timeout_s} s: {j.message}"
    return j


def start_worker(home: Path, size: int = 1) -> subprocess.Popen:
    env = {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT),
           "SCHEDCP_JOBS_BACKOFF_S": "0.05"}
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "worker", "--size", str(size), "--json"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith('{"worker"'), p.stderr.read()
    return p


def test_priority_lanes_run_in_order_then_oldest_first(tmp_path):
    ids = {lane: [queue.submit("noop", {"echo": f"{lane}{i}"}, lane=lane).id for i in range(2)]
           for lane in ("low", "normal", "high", "urgent")}
    with Pool(1):
        for lane_ids in ids.values():
            for i in lane_ids:
                wait_done(i)
    order = [j.inputs["echo"] for j in sorted((queue.get(i) for v in ids.values() for i in v),
                                               key=lambda j: j.started_at)]
    assert order == ["urgent0", "urgent1", "high0", "high1", "normal0", "normal1", "low0", "low1"]


def test_transient_failure_retried_with_backoff_final_failure_not():
    flaky = queue.submit("flaky", {"succeed_on": 3}, max_attempts=3)
    final = queue.submit("flaky", {"final": True})
    with Pool(2):
        f, g = wait_done(flaky.id), wait_done(final.id)
    assert (f.state, f.attempts, f.result) == ("succeeded", 3, {"attempt": 3})
    d = queue.detail(flaky.id)
    assert [a.outcome for a in d.attempts] == ["transient", "transient", "succeeded"]
    # exponential backoff: the second gap (2 × base) is longer than the first
    gaps = [d.attempts[i + 1].started_at - d.attempts[i].ended_at for i in range(2)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1
    assert (g.state, g.attempts) == ("failed", 1) and "input is wrong" in g.error


def test_timing_out_job_is_retried_then_dead_lettered():
    j = queue.submit("sleep", {"seconds": 30}, timeout_s=0.3, max_attempts=2)
    t0 = time.monotonic()
    with Pool(1, heartbeat_s=0.05):
        j = wait_done(j.id)
    assert j.state == "dead" and j.attempts == 2 and "timed out after 0.3 s" in j.error
    assert [a.outcome for a in queue.detail(j.id).attempts] == ["timeout", "timeout"]
    assert time.monotonic() - t0 < 10  # the sleeping handler was stopped, not waited for


def test_worker_killed_mid_job_is_reclaimed_and_finished_by_another(tmp_path, schedcp_home):
    marks = tmp_path / "marks"
    marks.mkdir()
    a = start_worker(schedcp_home)
    try:
        j = queue.submit("sleep", {"seconds": 2, "marker_dir": str(marks)})
        deadline = time.monotonic() + 20
        while not list(marks.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m.name for m in marks.iterdir()] == [f"{j.id}.1.{a.pid}"]
        a.send_signal(signal.SIGKILL)
        a.wait()
        b = start_worker(schedcp_home)
        try:
            j = wait_done(j.id)
        finally:
            b.terminate()
            b.wait(10)
    finally:
        a.kill()
    assert j.state == "succeeded" and j.result["pid"] == b.pid and j.attempts == 2
    attempts = queue.detail(j.id).attempts
    assert [a_.outcome for a_ in attempts] == ["worker_lost", "succeeded"]
    assert sorted(m.name for m in marks.iterdir()) == [f"{j.id}.1.{a.pid}", f"{j.id}.2.{b.pid}"]


def test_late_result_of_a_superseded_attempt_is_not_recorded():
    j = queue.submit("sleep", {"seconds": 0})
    wid = queue.register_worker("test", 1)
    first = queue.claim(wid)
    queue.stop_worker(wid)  # its pool is gone: the supervisor gives the job to another attempt
    assert queue.reclaim() == [(j.id, "pending")]
    wid2 = queue.register_worker("test", 1)
    time.sleep(0.1)
    second = queue.claim(wid2)
    assert second.attempts == 2
    assert queue.finish(j.id, first.attempts, wid, "succeeded", {"from": "first"}) is False
    assert queue.finish(j.id, second.attempts, wid2, "succeeded", {"from": "second"}) is True
    assert queue.finish(j.id, second.attempts, wid2, "succeeded", {"from": "again"}) is False
    assert queue.get(j.id).result == {"from": "second"}


def test_duplicate_request_is_answered_from_the_cache(tmp_path):
    with Pool(1):
        first = wait_done(queue.submit("sleep", {"seconds": 0.1, "key": "same"}).id)
        again = queue.submit("sleep", {"seconds": 0.1, "key": "same"})
        forced = wait_done(queue.submit("sleep", {"seconds": 0.1, "key": "same"}, use_cache=False).id)
    assert again.state == "succeeded" and again.cached_from == first.id and again.attempts == 0
    assert again.result == first.result
    assert forced.cached_from is None and forced.attempts == 1


def test_identical_job_in_flight_is_shared():
    a = queue.submit("sleep", {"seconds": 5, "key": "k"})
    b = queue.submit("sleep", {"seconds": 5, "key": "k"})
    assert b.id == a.id
    queue.cancel(a.id)


def test_cancel_stops_a_running_job_and_records_no_result():
    j = queue.submit("sleep", {"seconds": 30})
    with Pool(1, heartbeat_s=0.05) as pool:
        deadline = time.monotonic() + 10
        while queue.get(j.id).state != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.cancel(j.id, actor="test") == [j.id]
        deadline = time.monotonic() + 5
        while pool.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.active == 0  # the handler noticed and stopped
    j = queue.get(j.id)
    assert j.state == "cancelled" and j.result is None and j.error == "cancelled by test"


def test_bad_requests_say_what_to_do():
    with pytest.raises(Exception, match="unknown job kind 'nope'"):
        queue.submit("nope")
    with pytest.raises(NotFound, match="no job 'job-x'"):
        queue.get("job-x")
    with pytest.raises(Exception, match="unknown priority lane"):
        queue.submit("noop", lane="asap")


def test_campaign_runs_independent_nodes_in_parallel_and_passes_results():
    from schedcp_mcp.jobs.campaigns import Node, submit_campaign

    camp = submit_campaign("dag", [
        Node(name="a", kind="sleep", inputs={"seconds": 0.5}),
        Node(name="b", kind="sleep", inputs={"seconds": 0.5}),
        Node(name="join", kind="noop", inputs={"echo": "c"}, after=["a", "b"]),
    ])
    with Pool(2):
        camp = wait_done(camp.id)
    kids = {j.inputs["node"]: j for j in queue.detail(camp.id).children}
    a, b, join = (queue.get(kids[n].id) for n in ("a", "b", "join"))
    assert camp.state == "succeeded" and camp.result["counts"] == {"succeeded": 3}
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # ran side by side
    assert join.started_at >= max(a.finished_at, b.finished_at)
    assert set(join.result["deps"]) == {a.id, b.id} and join.result["deps"][a.id]["slept_s"] == 0.5


def test_failed_node_cancels_its_dependents_not_the_campaign():
    from schedcp_mcp.jobs.campaigns import Node, submit_campaign

    camp = submit_campaign("dag", [Node(name="bad", kind="flaky", inputs={"final": True}),
                                   Node(name="after", kind="noop", after=["bad"]),
                                   Node(name="other", kind="noop")])
    with Pool(2):
        camp = wait_done(camp.id)
    states = {c["name"]: c["state"] for c in camp.result["children"]}
    assert states == {"bad": "failed", "after": "cancelled", "other": "succeeded"}


def test_budget_exhaustion_stops_lower_priority_children():
    from schedcp_mcp.jobs.campaigns import Node, submit_campaign

    camp = submit_campaign("budgeted", [Node(name=lane, kind="sleep", inputs={"seconds": 0.05}, lane=lane)
                                        for lane in ("low", "normal", "high", "urgent")],
                           budget=Budget(runs=2))
    with Pool(1):
        camp = wait_done(camp.id)
    r = camp.result
    assert {c["name"]: c["state"] for c in r["children"]} == {
        "urgent": "succeeded", "high": "succeeded", "normal": "cancelled", "low": "cancelled"}
    assert sorted(r["not_started_for_budget"]) == ["low", "normal"] and r["used"]["runs"] == 2
    assert "budget exhausted: 2 of 2 runs used" in queue.get(
        next(c["id"] for c in r["children"] if c["name"] == "low")).error


def test_cancelling_a_campaign_cancels_its_subtree():
    from schedcp_mcp.jobs.campaigns import Node, submit_campaign

    camp = submit_campaign("long", [Node(name=f"s{i}", kind="sleep", inputs={"seconds": 30}) for i in range(3)])
    with Pool(2, heartbeat_s=0.05) as pool:
        deadline = time.monotonic() + 10
        while pool.active < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled = queue.cancel(camp.id)
        deadline = time.monotonic() + 5
        while pool.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.active == 0
    assert len(cancelled) == 4
    assert {j.state for j in queue.list_jobs(parent=camp.id)} == {"cancelled"}
    assert queue.get(camp.id).state == "cancelled"
