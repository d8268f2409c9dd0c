"""Verdicts you can see (issue #24): a job's outcome beside its state in `schedcp jobs`, `jobs --json`
and the status page; tables never cut ids or reasons (plain lines in a pipe, wrapped on a terminal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from schedcp_mcp.jobs import queue
from schedcp_mcp.web import status

ROOT = Path(__file__).resolve().parent.parent
LONG_REASON = ("layer 2 failed: wakeup worse: 0.00099x [0.00081, 0.0012] vs the default scheduler; "
               "kernel: [ 44.527114] sched_ext: BPF scheduler \"lean\" disabled (runnable task stall)")


def finished(kind: str, result: dict) -> str:
    j = queue.submit(kind, {"policy": "fifo", "n": os.urandom(4).hex()}, use_cache=False)
    c = queue.claim("test-worker", scope=j.id)
    assert queue.finish(c.id, c.attempts, "test-worker", "succeeded", result)
    return j.id


def schedcp(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_rejected_verify_and_a_failed_validation_show_their_outcome_beside_succeeded(schedcp_home):
    rejected = finished("verify", {"report_id": "rep-aaaaaaaaaa", "verdict": "rejected",
                                   "status": "layer 1 rejected at verifier"})
    failed = finished("validate", {"report_id": "rep-bbbbbbbbbb", "passed": False, "status": LONG_REASON})
    passed = finished("validate", {"report_id": "rep-cccccccccc", "passed": True,
                                   "status": "passed layers 1 and 2"})

    p = schedcp(schedcp_home, "jobs", "--json")
    assert p.returncode == 0, p.stderr
    by_id = {j["id"]: j for j in json.loads(p.stdout)}
    assert (by_id[rejected]["state"], by_id[rejected]["outcome"], by_id[rejected]["passed"]) == \
        ("succeeded", "rejected", False)
    assert by_id[rejected]["outcome_reason"] == "layer 1 rejected at verifier"
    assert (by_id[failed]["outcome"], by_id[failed]["passed"], by_id[failed]["outcome_reason"]) == \
        ("failed", False, LONG_REASON)
    assert (by_id[passed]["outcome"], by_id[passed]["passed"]) == ("passed", True)

    # a pipe at 80 columns: one plain line per job, id and the whole reason on it
    p = schedcp(schedcp_home, "jobs")
    lines = p.stdout.splitlines()
    assert lines[0].split("\t")[:5] == ["id", "kind", "lane", "state", "outcome"]
    row = next(line for line in lines if line.startswith(failed)).split("\t")
    assert row[3:5] == ["succeeded", "failed"] and row[-1] == LONG_REASON
    assert "…" not in p.stdout

    html = status.render_html(status.state())
    assert "rejected" in html and "outcome-failed" in html and "kernel: [ 44.527114] sched_ext" in html


def test_a_wide_table_on_a_narrow_terminal_wraps_instead_of_cutting():
    from rich.console import Console

    from schedcp_mcp.cli import Table

    t = Table("id", "message")
    t.add_row("job-0123456789", LONG_REASON)
    c = Console(width=40, record=True, force_terminal=True, file=open(os.devnull, "w"))
    c.print(t)
    text = "".join(c.export_text().split())
    assert "…" not in text and "job-0123456789" in text and "".join(LONG_REASON.split()) in \
        text.replace("│", "").replace("┃", "")
