"""A command that waits for its job always has someone to run it, and a pool never abandons a job it
claimed. Real store, real pools in this process and in other processes (started and killed here);
the jobs are the trivial `sleep` kind (the VM version is tests/test_concurrency_vm.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.pool import Pool, run_to_end

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setenv("SCHEDCP_JOBS_BACKOFF_S", "0.05")


def _env(home: Path) -> dict:
    return {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT), "SCHEDCP_JOBS_BACKOFF_S": "0.05"}


def waiting_command(home: Path, seconds: float, key: str) -> subprocess.Popen:
    """Another CLI-like process: queue a sleep job and wait for it with run_to_end."""
    code = ("import sys; from schedcp_mcp.jobs import queue; from schedcp_mcp.jobs.pool import run_to_end\n"
            f"j = queue.submit('sleep', {{'seconds': {seconds}, 'key': {key!r}}}, use_cache=False)\n"
            "print(j.id, flush=True)\n"
            "print(run_to_end(j.id).state, flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", code], env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def job_of(cmd: subprocess.Popen) -> str:
    line = cmd.stdout.readline()
    assert line.strip(), f"the command queued nothing: {cmd.stderr.read()[-2000:]}"
    return line.split()[0]


def until(pred, timeout_s: float = 15.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_a_second_command_runs_its_job_while_the_first_commands_pool_runs_only_the_first(schedcp_home):
    first = waiting_command(schedcp_home, 6.0, "first")
    first_job = job_of(first)
    until(lambda: queue.get(first_job).state == "running")  # the first command's own, scoped pool
    assert any(w.alive and w.scope == first_job for w in queue.list_workers(0))

    mine = queue.submit("sleep", {"seconds": 0.3})
    t0 = time.monotonic()
    done = run_to_end(mine.id, timeout_s=20)
    assert done.state == "succeeded", done
    assert time.monotonic() - t0 < 5.0, "waited for the first command's job instead of running its own"
    assert queue.get(first_job).state == "running"  # the first was not waited for
    assert first.wait(20) == 0 and first.stdout.readline().strip() == "succeeded"


def test_a_waiting_command_takes_over_when_the_worker_it_counted_on_is_killed(schedcp_home):
    w = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "worker", "--size", "1", "--json"],
                         env=_env(schedcp_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert w.stdout.readline().startswith('{"worker"')
    job = queue.submit("sleep", {"seconds": 3.0})
    until(lambda: queue.get(job.id).state == "running")
    assert queue.runner_for(job.id) is not None  # the worker: nothing to start yet

    killer = __import__("threading").Timer(0.5, lambda: w.send_signal(signal.SIGKILL))
    killer.start()
    done = run_to_end(job.id, timeout_s=30)
    assert done.state == "succeeded", done
    assert done.attempts == 2  # the killed worker's attempt, then this command's pool's
    w.wait(5)


def test_a_killed_workers_record_is_marked_dead_at_once(schedcp_home):
    w = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "worker", "--size", "1", "--json"],
                         env=_env(schedcp_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert w.stdout.readline().startswith('{"worker"')
    (info,) = queue.list_workers(0)
    assert info.alive and info.stopped_at is None
    w.send_signal(signal.SIGKILL)
    w.wait(5)
    (info,) = queue.list_workers()
    assert not info.alive and info.stopped_at is not None and info.end_reason == "process gone"


def test_a_pool_finishes_every_job_it_claimed_before_it_stops(schedcp_home):
    parent = queue.submit("sleep", {"seconds": 0.1})
    child = queue.submit("sleep", {"seconds": 2.0}, parent=parent.id)
    pool = Pool(2, scope=parent.id).start()
    until(lambda: queue.get(child.id).state == "running")
    until(lambda: queue.get(parent.id).done)
    pool.stop(wait_s=None)  # what a command does once its own job ended
    c = queue.get(child.id)
    assert c.state == "succeeded" and c.attempts == 1, c  # finished, not handed back or lost


def test_nobody_runs_a_job_when_only_other_jobs_scoped_pools_live(schedcp_home):
    other = queue.submit("sleep", {"seconds": 5.0})
    mine = queue.submit("sleep", {"seconds": 0.1})
    with Pool(1, scope=other.id):
        assert queue.runner_for(other.id) is not None
        assert queue.runner_for(mine.id) is None
    with Pool(1, kind_names=["noop"]):
        assert queue.runner_for(mine.id) is None  # a pool that does not run sleep jobs
    queue.cancel(other.id)
    queue.cancel(mine.id)


def test_the_job_of_a_killed_command_is_cancelled_not_left_pending_for_no_one(schedcp_home):
    cmd = waiting_command(schedcp_home, 30.0, "killed")
    job_id = job_of(cmd)
    until(lambda: queue.get(job_id).state == "running")
    cmd.send_signal(signal.SIGKILL)
    cmd.wait(5)
    with Pool(1):  # any pool's supervisor sweeps it up
        j = until(lambda: (lambda j: j if j.done else None)(queue.get(job_id)))
    assert j.state == "cancelled" and "command waiting for it ended" in j.error, j


def test_a_second_command_adopts_the_killed_commands_job_and_finishes_it(schedcp_home):
    cmd = waiting_command(schedcp_home, 2.0, "adopted")
    job_id = job_of(cmd)
    until(lambda: queue.get(job_id).state == "running")
    cmd.send_signal(signal.SIGKILL)
    cmd.wait(5)
    again = queue.submit("sleep", {"seconds": 2.0, "key": "adopted"})  # the same command again
    assert again.id == job_id
    done = run_to_end(again.id, timeout_s=30)
    assert done.state == "succeeded" and done.attempts == 2, done
