"""The fleet engine for real: a Redis broker and two Celery worker processes on loopback, started
here; the coordinator in this process writes to the real store. A worker is SIGKILLed mid-job and
its job is finished by the other one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("celery", reason="celery is not installed (pyproject dependency)")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (setup.sh installs it)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path, schedcp_home, monkeypatch):
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    env = {**os.environ, "SCHEDCP_HOME": str(schedcp_home), "PYTHONPATH": str(ROOT),
           "SCHEDCP_BROKER": broker, "SCHEDCP_FLEET_VISIBILITY_S": "4", "SCHEDCP_FLEET_RESTORE_S": "1"}
    monkeypatch.setenv("SCHEDCP_BROKER", broker)
    workers = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "schedcp_mcp.jobs.fleet", "worker",
                                 "--pool=prefork", "--concurrency=1", "-n", f"w{i}@%h", "-Q", "schedcp",
                                 "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
                                env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / f"w{i}.log", "w"))
               for i in range(2)]
    # the coordinator talks to this broker (the app module read SCHEDCP_BROKER at import)
    from schedcp_mcp.jobs import fleet

    fleet.app.conf.broker_url = fleet.app.conf.result_backend = broker
    fleet.app.conf.broker_transport_options = {**fleet.app.conf.broker_transport_options,
                                               "visibility_timeout": 4.0}
    yield fleet, workers
    for w in workers:
        try:
            os.killpg(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.wait()
    redis.kill()
    redis.wait()


def group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_worker_killed_mid_job_its_job_is_finished_by_the_other(cluster, tmp_path):
    from schedcp_mcp.jobs import queue

    fleet, workers = cluster
    marks = tmp_path / "marks"
    marks.mkdir()
    with fleet.Fleet(capacity=2):
        warm = [queue.submit("noop", {"echo": i}) for i in range(4)]  # both workers are up and serving
        for j in warm:
            assert queue.wait(j.id, 60).state == "succeeded"
        j = queue.submit("sleep", {"seconds": 3, "marker_dir": str(marks)})
        deadline = time.monotonic() + 30
        while not list(marks.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = list(marks.iterdir())
        assert len(first) == 1
        pid = int(first[0].name.rsplit(".", 1)[1])
        victim = next(w for w in workers if group_of(pid) == w.pid)
        other = next(w for w in workers if w is not victim)
        os.killpg(victim.pid, signal.SIGKILL)  # the whole worker: its main process and its child
        victim.wait()
        j = queue.wait(j.id, 90)
        pools = [w.engine for w in queue.list_workers() if w.alive]
    assert pools == ["celery"]  # no local pool ran it
    assert j.state == "succeeded", (j.state, j.error)
    assert j.result["slept_s"] == 3 and group_of(j.result["pid"]) == other.pid
    assert j.result["executed_by"]["redelivered"] is True
    assert j.attempts == 1  # one attempt in the store: the redelivery was the engine's
    assert len(list(marks.iterdir())) == 2  # it ran twice: once on each worker
