"""The supervisor with real sandbox VMs: a pool process SIGKILLed during a campaign of verify jobs
(its qemu left behind), a restart that finishes it; a campaign cancelled while its VMs run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedcp_mcp import store
from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.campaigns import Node, submit_campaign
from schedcp_mcp.jobs.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.image


def verify_campaign(*policies: str):
    return submit_campaign("verify", [Node(name=p, kind="verify", inputs={"policy": p, "use_cache": False})
                                      for p in policies], use_cache=False)


def registered_vms(home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (home / "vms" / "run").glob("*.json")] \
        if (home / "vms" / "run").exists() else []


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu")
    except (OSError, ProcessLookupError):
        return False


def worker(home: Path) -> subprocess.Popen:
    env = {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT), "SCHEDCP_JOBS_BACKOFF_S": "0.1"}
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "worker", "--size", "1", "--json"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith('{"worker"')
    return p


def test_sigkill_during_a_campaign_restart_finishes_it_once_and_stops_the_orphan_qemu(manifest, schedcp_home):
    camp = verify_campaign("fifo", "vtime_fair")
    a = worker(schedcp_home)
    try:
        booted = wait_for(lambda: [v for v in registered_vms(schedcp_home) if alive(v["pid"])], 120,
                          "a VM of the campaign")
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    orphan = booted[0]
    assert orphan["owner_pid"] == a.pid and orphan["job"] in {j.id for j in queue.list_jobs(parent=camp.id)}
    b = worker(schedcp_home)
    try:
        wait_for(lambda: not alive(orphan["pid"]), 30, "the orphan qemu to be stopped")
        camp = queue.wait(camp.id, 400)
    finally:
        b.terminate()
        b.wait(30)
    assert camp.state == "succeeded", camp.error
    kids = queue.list_jobs(parent=camp.id)
    assert {k.state for k in kids} == {"succeeded"}
    assert {k.result["verdict"] for k in kids} == {"accepted"}
    hit = queue.detail(orphan["job"])
    assert [a_.outcome for a_ in hit.attempts] == ["worker_lost", "succeeded"]
    # one report per verify job, though one of them ran twice
    reports = [r["id"] for r in store.db().execute("SELECT id FROM records WHERE kind='report'")]
    assert sorted(reports) == sorted(k.result["report_id"] for k in kids)
    assert not [v for v in registered_vms(schedcp_home) if alive(v["pid"])]


def test_cancelling_a_campaign_stops_its_running_vms(manifest, schedcp_home):
    camp = verify_campaign("fifo", "vtime_fair", "batch")
    with Pool(2, heartbeat_s=0.2) as pool:
        running = wait_for(lambda: [v for v in registered_vms(schedcp_home) if alive(v["pid"])], 120,
                           "a VM of the campaign")
        t0 = time.monotonic()
        queue.cancel(camp.id, actor="test")
        wait_for(lambda: not any(alive(v["pid"]) for v in running), 10, "the VMs to stop")
        stopped_s = time.monotonic() - t0
        wait_for(lambda: pool.active == 0, 60, "the pool to let go of the cancelled jobs")
    assert stopped_s < 5
    assert {j.state for j in queue.list_jobs(parent=camp.id)} == {"cancelled"}
    assert queue.get(camp.id).state == "cancelled"
    assert all(j.result is None for j in queue.list_jobs(parent=camp.id))
    assert not [v for v in registered_vms(schedcp_home) if alive(v["pid"])]
