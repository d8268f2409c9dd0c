"""Bad input is refused before anything is queued or booted: exit 2, a message saying what was wrong,
in about a second (the real CLI in a subprocess, the real store)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedcp_mcp import candidates
from schedcp_mcp.errors import BadInput
from schedcp_mcp.jobs import queue
from schedcp_mcp.models import Goal
from schedcp_mcp.sandbox import vm as vmmod

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    (["validate", "--policy", "fifo", "--goal", "bogus<=0.9"], "goal 'bogus' is not measured"),
    (["validate", "--policy", "fifo", "--budget", "-5"], "--budget"),
    (["validate", "--policy", "fifo", "--rounds", "0"], "--rounds"),
    (["validate", "--policy", "fifo", "--workload", "nope"], "nope"),
    (["validate", "--policy", "fifo", "--goal", "messaging_time_s<=0"], "must be above 0"),
    (["validate", "--policy", "fifo", "--goal", "messaging_time_s<0.9"], "expected METRIC<=RATIO"),
    (["validate", "--policy", "nope"], "nope"),
    (["optimize", "--budget", "-5"], "--budget"),
    (["optimize", "--workload", "nope"], "nope"),
    (["optimize", "--workload", "hackbench", "--goal", "bogus<=0.9"], "goal 'bogus' is not measured"),
    (["campaign", "--policy", "fifo", "--rounds", "0"], "--rounds"),
    (["campaign", "--policy", "fifo", "--goal", "bogus<=0.9"], "goal 'bogus' is not measured"),
    (["tune", "fifo", "--seconds", "-1"], "--seconds"),
    (["bench", "policies", "--budget", "-5"], "--budget"),
    (["bench", "stability", "--policy", "fifo", "--runs", "0"], "--runs"),
    (["jobs", "--limit", "0"], "--limit"),
    (["jobs", "wait", "job-x", "--timeout", "-1"], "--timeout"),
    (["token", "rep-x", "--ttl", "0"], "out of range"),
    (["deploy", "--token", "x", "--interval", "0"], "--interval"),
    (["verify", "--policy", "fifo", "--deadline", "-1"], "--deadline"),
]


@pytest.mark.parametrize("args,says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_answers_exit_2_at_once_with_nothing_queued(schedcp_home, args, says):
    env = {**os.environ, "SCHEDCP_HOME": str(schedcp_home), "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], env=env, capture_output=True,
                       text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert says in " ".join((p.stdout + p.stderr).split()), p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    assert took < 5.0, f"took {took:.2f} s"  # ~0.3-0.7 s alone; the shared test machine is loaded
    assert queue.list_jobs(limit=10) == []
    assert vmmod.running_vms() == []


def test_the_library_refuses_the_same_before_queueing(schedcp_home):
    """What the MCP tools call: the same checks, the same words."""
    with pytest.raises(BadInput, match="goal 'bogus' is not measured"):
        candidates.validate_job(policy="fifo", goals=[Goal(metric="bogus", direction="lower", target_ratio=0.9)])
    with pytest.raises(BadInput, match="budget must be"):
        candidates.validate_job(policy="fifo", budget_s=-5)
    with pytest.raises(BadInput, match="rounds must be"):
        candidates.validate_campaign([{"policy": "fifo"}], rounds=0)
    with pytest.raises(BadInput, match="not a ratio"):
        candidates.validate_job(policy="fifo", goals=[Goal(metric="wall_time_s", direction="lower",
                                                           target_ratio=-1)])
    assert queue.list_jobs(limit=10) == []
