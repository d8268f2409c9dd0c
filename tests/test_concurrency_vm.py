"""A user's day: several commands at once never hang (issue #24). Real CLI processes, real VMs.

Two validates and a verify start together, each waiting for its own job with no `schedcp worker`
running; the first is SIGKILLed mid-run (its VM orphaned, its job left `running` by a dead pool), and
a fourth — the same command again — starts after it: it adopts the orphaned job (same content key)
and must run it to the end. Every command finishes, no job is left pending or running, no VM is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from schedcp_mcp.jobs import queue
from schedcp_mcp.sandbox import vm as vmmod

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.image

QUICK = ["--workload", "hackbench", "--rounds", "1", "--budget", "0", "--json"]  # a fresh home: no cache


def cli(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "SCHEDCP_HOME": str(home), "PYTHONPATH": str(ROOT), "SCHEDCP_JOBS_BACKOFF_S": "1"}
    return subprocess.Popen([sys.executable, "-m", "schedcp_mcp", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_three_commands_at_once_and_a_fourth_after_the_first_is_killed_all_finish(manifest, schedcp_home):
    first_args = ("validate", "--policy", "fifo", *QUICK)
    procs = {"validate fifo": cli(schedcp_home, *first_args),
             "validate vtime_fair": cli(schedcp_home, "validate", "--policy", "vtime_fair", *QUICK),
             "verify lean_preempt": cli(schedcp_home, "verify", "--policy", "lean_preempt", "--json")}
    seen_vms: set[int] = set()

    def note_vms():
        seen_vms.update(e["pid"] for e in vmmod.running_vms())

    # kill the first command once its job runs in a VM of its own
    end = time.monotonic() + 300
    fifo_job = None
    while time.monotonic() < end:
        note_vms()
        fifo_job = next((j for j in queue.list_jobs(kind="validate") if j.inputs.get("policy") == "fifo"
                         and j.state == "running"), None)
        if fifo_job and any(e.get("job") == fifo_job.id for e in vmmod.running_vms()):
            break
        time.sleep(0.2)
    assert fifo_job is not None, "the first command's job never ran"
    first = procs.pop("validate fifo")
    os.killpg(first.pid, signal.SIGKILL)  # the command and nothing else: its qemu is in its own group
    first.wait(10)
    procs["validate fifo (again)"] = cli(schedcp_home, *first_args)

    outs = {}
    end = time.monotonic() + 1200
    while procs and time.monotonic() < end:
        note_vms()
        for name, p in list(procs.items()):
            if p.poll() is not None:
                outs[name] = (p.returncode, p.stdout.read(), p.stderr.read())
                del procs[name]
        time.sleep(0.5)
    for name, p in procs.items():  # a hang: leave nothing behind, then fail
        os.killpg(p.pid, signal.SIGKILL)
    assert not procs, f"still waiting after 20 min: {sorted(procs)}; jobs: " + \
        "; ".join(f"{j.id} {j.kind} {j.state} {j.message}" for j in queue.list_jobs(limit=100))

    for name, (rc, out, err) in outs.items():
        assert rc in (0, 1), f"{name} exit {rc}: {out[-2000:]} {err[-2000:]}"
        body = json.loads(out)
        assert "error" not in body, f"{name}: {body}"
    # the killed command's job: adopted by the same command again (same content key) and finished,
    # or — when another pool's sweep saw it first — cancelled (no one waited for it), the command
    # again then running its own
    again = json.loads(outs["validate fifo (again)"][1])
    orphan = queue.get(fifo_job.id)
    assert orphan.state in ("succeeded", "cancelled"), orphan
    if orphan.state == "succeeded":
        assert again["report_id"] == f"rep-{fifo_job.id[4:]}"
    else:
        assert "command waiting for it ended" in orphan.error
    left = [j for j in queue.list_jobs(limit=1000) if j.state in ("pending", "running")]
    assert not left, f"jobs left: {[(j.id, j.state) for j in left]}"
    time.sleep(1)
    alive = [pid for pid in seen_vms if psutil.pid_exists(pid)
             and "qemu" in " ".join(psutil.Process(pid).cmdline())]
    assert seen_vms and not alive, f"VMs left running: {alive}"
    assert not vmmod.running_vms()


def test_a_command_stopped_with_sigterm_takes_its_vm_with_it(manifest, schedcp_home):
    """`kill PID` (SIGTERM: a CI timeout, systemd, a user) stops a command like an exit: its VM is
    closed before it ends. Before, Python vanished on SIGTERM and its qemu ran on with no owner."""
    p = cli(schedcp_home, "validate", "--policy", "fifo", *QUICK)
    end, mine = time.monotonic() + 300, []
    while time.monotonic() < end and not mine and p.poll() is None:
        mine = [e["pid"] for e in vmmod.running_vms() if e["owner_pid"] == p.pid]
        time.sleep(0.2)
    assert mine, f"the command never started a VM: {p.communicate()}"
    p.send_signal(signal.SIGTERM)  # the command alone, not its process group
    rc = p.wait(30)  # waiting on its job, Ctrl-C's path ("Aborted!", 1); elsewhere 128 + SIGTERM
    assert rc in (1, 128 + signal.SIGTERM), (rc, p.stderr.read()[-2000:])
    time.sleep(1)
    assert not [pid for pid in mine if psutil.pid_exists(pid)
                and "qemu" in " ".join(psutil.Process(pid).cmdline())], "its VM is still running"
