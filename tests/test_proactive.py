"""Proactive optimize cycles (`schedcp watch`): a real condition (the host's CPU pressure, read from
/proc/pressure/cpu) starts the real `optimize.run` on its rising edge, bounded by max cycles and the
watch's duration; every cycle is stored. The cycles here end at optimize's input check (an unknown
workload: exit 2, before any VM), so they run in the fast suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from schedcp_mcp import optimize, proactive
from schedcp_mcp.learn.callbacks import Condition

ROOT = Path(__file__).resolve().parent.parent
PSI = Path("/proc/pressure/cpu")
needs_psi = pytest.mark.skipif(not PSI.exists(), reason="this kernel has no PSI (/proc/pressure/cpu)")


def run_watch(req):
    said = []
    return anyio.run(proactive.watch, req, optimize.run, said.append), said


@needs_psi
def test_a_condition_that_holds_starts_one_cycle_on_its_rising_edge_and_not_again_while_it_holds():
    always = Condition(kind="psi_cpu_above", threshold=-1, cooldown_s=0)  # PSI >= 0 > -1: holds at once
    req = proactive.WatchRequest(conditions=[always], max_cycles=3, interval_s=0.1, duration_s=1.5,
                                 min_interval_s=0, optimize=optimize.OptimizeRequest(workloads=["no-such-workload"]))
    res, said = run_watch(req)
    assert len(res.cycles) == 1 and res.evaluations >= 5, (res, said)  # held all along: one rise only
    (c,) = res.cycles
    assert c.exit_code == 2 and "no-such-workload" in c.why, c
    assert c.trigger.startswith("psi_cpu_above") and "threshold -1" in c.trigger
    assert res.stopped == "watched 1.5 s"
    assert [s.id for s in proactive.list_cycles()] == [c.id]  # stored, with how it ended
    assert proactive.list_cycles()[0].ended_at >= c.created_at


@needs_psi
def test_max_cycles_ends_the_watch():
    always = Condition(kind="psi_cpu_above", threshold=-1, cooldown_s=0)
    req = proactive.WatchRequest(conditions=[always], max_cycles=1, interval_s=0.1,
                                 optimize=optimize.OptimizeRequest(workloads=["no-such-workload"]))
    res, _ = run_watch(req)
    assert len(res.cycles) == 1 and res.stopped == "1 cycle(s) run"


def schedcp(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], env=env, text=True,
                          capture_output=True, timeout=120)


@needs_psi
def test_the_cli_watches_for_its_duration_and_says_no_condition_rose(schedcp_home):
    p = schedcp(schedcp_home, "watch", "--psi-above", "100", "--for", "1", "--interval", "0.2",
                "--workload", "hackbench", "--json")
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert out["cycles"] == [] and out["evaluations"] >= 3 and out["stopped"] == "watched 1 s"


@pytest.mark.parametrize("args, words", [
    ((), "give a condition"),
    (("--reward-below", "0.5"), "--deployment"),
    (("--reward-below", "0.5", "--deployment", "dep-nope"), "dep-nope"),
    (("--unlike-profile", "0.5", "--profile", "prof-nope"), "prof-nope"),
    (("--psi-above", "20", "--workload", "no-such-workload"), "no-such-workload"),
])
def test_bad_input_is_refused_before_watching(schedcp_home, args, words):
    """The CLI in this process (a subprocess each cost 2-3 s: the MCP library's import); the real
    process is the watch test's above."""
    from click.testing import CliRunner

    from schedcp_mcp.cli import main

    r = CliRunner().invoke(main, ["watch", *args])
    assert r.exit_code == 2 and words in r.stdout + r.stderr, (r.stdout, r.stderr, r.exception)
    assert "internal error" not in r.stderr and isinstance(r.exception, SystemExit)
