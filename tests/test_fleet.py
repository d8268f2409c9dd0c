"""The fleet engine for real: a Redis broker (with a password) and two Celery worker processes on
loopback, started here, every message sealed under a fleet key; the coordinator in this process
writes to the real store. A worker is SIGKILLed mid-job and its job is finished by the other one;
a client without the password, or with forged messages or replies, gets nothing run or stored."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from loopback import free_port, wait_for_port

from schedcp_mcp.config import write_private

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("celery", reason="celery is not installed (pyproject dependency)")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (setup.sh installs it)", allow_module_level=True)


@pytest.fixture
def cluster_of(tmp_path, schedcp_home, monkeypatch):
    """cluster_of(homes): a redis-server and one Celery worker process per home (each worker's
    $SCHEDCP_HOME), on loopback; the coordinator in this process uses the test's home."""
    started, worker_homes = [], []

    def start(homes: list[Path], visibility_s: float = 4.0):
        """`visibility_s`: how long a delivered job may stay unacknowledged before the broker gives
        it to another worker (short: a killed worker's job moves on quickly; it must exceed the
        longest job, or a long job runs on two workers)."""
        port = free_port()
        password = secrets.token_hex(16)
        conf = tmp_path / "redis.conf"  # the password in a 0600 file: a command line is world-readable
        write_private(conf, (f"port {port}\nbind 127.0.0.1\nrequirepass {password}\nsave \"\"\n"
                             f"appendonly no\ndir {tmp_path}\n").encode())
        redis = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(redis)
        broker = f"redis://:{password}@127.0.0.1:{port}/0"
        wait_for_port(port, 10, redis)
        key = tmp_path / "fleet.key"
        write_private(key, secrets.token_hex(32).encode())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEDCP_BROKER": broker, "SCHEDCP_FLEET_KEY_FILE": str(key),
               "SCHEDCP_FLEET_VISIBILITY_S": str(visibility_s), "SCHEDCP_FLEET_RESTORE_S": "1"}
        monkeypatch.setenv("SCHEDCP_BROKER", broker)
        monkeypatch.setenv("SCHEDCP_FLEET_KEY_FILE", str(key))
        workers = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "schedcp_mcp.jobs.fleet", "worker",
                                     "--pool=prefork", "--concurrency=1", "-n", f"w{i}@%h", "-Q", "schedcp",
                                     "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
                                    env={**env, "SCHEDCP_HOME": str(home)}, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{i}.log", "w"))
                   for i, home in enumerate(homes)]
        started.extend(workers)
        worker_homes.extend(homes)
        # the coordinator talks to this broker (the app module read SCHEDCP_BROKER at import)
        from schedcp_mcp.jobs import fleet

        app = fleet.app
        app.conf.broker_url = app.conf.result_backend = broker
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "visibility_timeout": visibility_s}
        # forget the connections to an earlier test's broker (Celery caches them per app)
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool, app._backend_cache, app._local = None, None, threading.local()
        app.amqp._producer_pool = None
        cluster_info.update(port=port, password=password, broker=broker, key=key, tmp=tmp_path)
        return fleet, workers

    cluster_info: dict = {}
    start.info = cluster_info

    yield start
    for p in reversed(started):
        try:
            os.killpg(p.pid, signal.SIGKILL) if p.args[0] != "redis-server" else p.kill()
        except ProcessLookupError:
            pass
        p.wait()
    # a SIGKILLed worker's qemu runs on in its own session: stop what the workers left in their homes
    from schedcp_mcp.sandbox import vm as vmmod

    for home in dict.fromkeys(worker_homes):
        monkeypatch.setenv("SCHEDCP_HOME", str(home))
        vmmod.reap_orphans()


@pytest.fixture
def cluster(cluster_of, schedcp_home):
    """Two workers sharing the coordinator's home (one machine)."""
    return cluster_of([schedcp_home, schedcp_home])


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
    with fleet.Fleet(capacity=2) as coordinator:
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
    assert pools == ["celery", "celery"]  # the coordinator and its pool for the store's own kinds
    assert j.worker == coordinator.id  # the coordinator handed it to Celery
    assert j.state == "succeeded", (j.state, j.error)
    assert j.result["slept_s"] == 3 and group_of(j.result["pid"]) == other.pid
    assert j.result["executed_by"]["redelivered"] is True
    assert j.attempts == 1  # one attempt in the store: the redelivery was the engine's
    assert len(list(marks.iterdir())) == 2  # it ran twice: once on each worker


HOSTILE = '#include "/etc/passwd"\nchar _license[] __attribute__((section("license"))) = "GPL";\n'


def records_in(home: Path) -> dict[str, str]:
    import sqlite3

    if not (home / "schedcp.db").exists():  # a worker that ran nothing
        return {}
    with sqlite3.connect(home / "schedcp.db") as c:
        return dict(c.execute("SELECT id, kind FROM records"))


def test_workers_with_their_own_homes_carry_records_both_ways(cluster_of, tmp_path, schedcp_home):
    """Each worker has its own $SCHEDCP_HOME (another machine): the profile a job refers to goes
    with it; the report it makes (and its source) comes back into the coordinator's store, where
    the campaign's join (run by the coordinator) and `schedcp reports` / `token` find it. Layer 1
    stops at the source check here (no VM); a validation does the same with its object (VM test)."""
    from schedcp_mcp.jobs import queue
    from schedcp_mcp.jobs.campaigns import Node, submit_campaign
    from schedcp_mcp.observe.profile import profile_workload
    from schedcp_mcp.reports import get_report, source_for

    homes = [tmp_path / "w0", tmp_path / "w1"]
    for h in homes:
        h.mkdir()
    fleet, workers = cluster_of(homes)
    prof = profile_workload(["sleep", "0.5"], duration_s=1)
    srcs = [HOSTILE + f"// candidate {i}\n" for i in range(4)]
    with fleet.Fleet(capacity=2):
        camp = submit_campaign("hostile", [Node(name=f"c{i}", kind="verify", inputs={
            "source": s, "profile_id": prof.id, "use_cache": False}) for i, s in enumerate(srcs)])
        camp = queue.wait(camp.id, 120)
    assert camp.state == "succeeded", (camp.state, camp.error)
    kids = camp.result["children"]
    assert [k["state"] for k in kids] == ["succeeded"] * 4
    ran_on = {json.loads(k["result_json"])["executed_by"]["pid"] for k in kids}
    worker_homes = {}
    for k in kids:
        r = get_report(k["report_id"])  # in the coordinator's store
        assert r.layer1.verdict == "rejected" and r.profile_id == prof.id
        assert r.goals == prof.goals  # the worker read the profile the coordinator sent
        assert source_for(r) in srcs
        worker_homes[k["report_id"]] = [h for h in homes if k["report_id"] in records_in(h)]
    assert all(len(hs) == 1 for hs in worker_homes.values())  # each was made on one worker
    assert len({hs[0] for hs in worker_homes.values()}) == 2 and len(ran_on) == 2  # both worked
    assert prof.id in records_in(homes[0]) and prof.id in records_in(homes[1])
    assert not any(k.startswith("job-") for h in homes for k in records_in(h))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listed = subprocess.run([sys.executable, "-m", "schedcp_mcp", "reports", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {k["report_id"] for k in kids} <= {r["id"] for r in json.loads(listed.stdout)}
    tok = subprocess.run([sys.executable, "-m", "schedcp_mcp", "token", kids[0]["report_id"]], env=env,
                         capture_output=True, text=True, timeout=60)
    assert tok.returncode == 2 and "did not pass layers 1 and 2" in tok.stderr  # found, and refused


@pytest.mark.image
def test_a_validation_on_a_remote_worker_is_a_report_on_the_coordinator(cluster_of, tmp_path, manifest,
                                                                         schedcp_home):
    """Layer 1 here (the coordinator's home), layer 2 on a fleet worker with its own home: the
    worker gets the report and its compiled object with the job; the coordinator gets the validated
    report and its outcome back, so `feedback` and `token` work on the coordinator."""
    from schedcp_mcp import candidates
    from schedcp_mcp.jobs import queue
    from schedcp_mcp.jobs.pool import Pool
    from schedcp_mcp.reports import get_report

    homes = [tmp_path / "w0", tmp_path / "w1"]
    for h in homes:
        h.mkdir()
    v = candidates.verify_job(policy="fifo", use_cache=False)
    with Pool(1, scope=v.id):
        rep = candidates.verified_report(queue.wait(v.id, 300)).id
    fleet, _ = cluster_of(homes, visibility_s=900)
    with fleet.Fleet(capacity=2):
        j = candidates.validate_job(report_id=rep, workloads=["hackbench"], rounds=3, budget_s=0, use_cache=False)
        j = queue.wait(j.id, 600)
    assert j.state == "succeeded", (j.state, j.error)
    assert j.result["report_id"] == rep
    r = get_report(rep)
    assert r.layer2 is not None and [w.name for w in r.layer2.workloads] == ["hackbench"]
    ran_in = [h for h in homes if rep in records_in(h)]
    assert len(ran_in) == 1 and any(k.startswith("out-") for k in records_in(ran_in[0]))
    assert any(k.startswith("out-") for k in records_in(schedcp_home))  # the outcome came back
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fb = subprocess.run([sys.executable, "-m", "schedcp_mcp", "feedback", rep, "--json"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert fb.returncode == 0, fb.stderr
    assert json.loads(fb.stdout)["subject_id"] == rep
    tok = subprocess.run([sys.executable, "-m", "schedcp_mcp", "token", rep], env=env,
                         capture_output=True, text=True, timeout=60)
    if r.passed:
        assert tok.returncode == 0 and tok.stdout.strip()
    else:
        assert tok.returncode == 2 and "did not pass layers 1 and 2" in tok.stderr


# --- hostile: a local user without the broker password, a broker peer without the fleet key, a
# fleet member (key holder) whose replies lie --------------------------------------------------------

def _queue_len(info) -> int:
    import redis

    c = redis.Redis(port=info["port"], password=info["password"])
    return sum(c.llen(q) for q in c.keys("schedcp*") if c.type(q) == b"list")


def test_a_client_without_the_broker_password_cannot_connect(cluster_of, schedcp_home):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    cluster_of([])
    info = cluster_of.info
    for password in (None, "wrong-" + info["password"]):  # none, and a guess
        # no retries: a refused login is final (redis-py retries it, with backoff, by default: 15 s)
        c = redis.Redis(port=info["port"], password=password, retry=Retry(NoBackoff(), 0))
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            c.lpush("schedcp", '{"forged": true}')
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            c.keys("*")
    assert _queue_len(info) == 0 and records_in(schedcp_home) == {}


def _order(marks: Path, job_id: str = "job-0123456789", kind: str = "noop") -> dict:
    now = time.time()
    return {"job": {"id": job_id, "kind": kind, "created_at": now, "not_before": now, "timeout_s": 60,
                    "max_attempts": 1, "attempts": 1, "actor": "cli",
                    "inputs": {"marker_dir": str(marks), "echo": "pwned"}},
            "deps": {}, "referred": {}, "task_id": "forged", "expires": now + 600}


def test_orders_not_sealed_with_the_fleet_key_are_refused_unread(cluster_of, tmp_path, monkeypatch, schedcp_home):
    """A broker peer (it has the password, not the fleet key) sends run_job orders: as plain JSON,
    sealed under its own key, and with a tag it made up. No worker runs any of them; a real job
    still runs afterwards (the workers were listening)."""
    from celery import Celery

    from schedcp_mcp.jobs import queue

    home = tmp_path / "w0"
    home.mkdir()
    fleet, _ = cluster_of([home])
    info = cluster_of.info
    marks = tmp_path / "marks"
    marks.mkdir()
    plain = Celery("attacker", broker=info["broker"])
    plain.conf.update(task_serializer="json", accept_content=["json"])
    plain.send_task("schedcp.run_job", args=[_order(marks)], queue="schedcp", task_id="forged")
    other_key = tmp_path / "attacker.key"
    write_private(other_key, secrets.token_hex(32).encode())
    monkeypatch.setenv("SCHEDCP_FLEET_KEY_FILE", str(other_key))
    fleet.run_job.apply_async(args=[_order(marks)], queue="schedcp", task_id="forged")
    monkeypatch.setenv("SCHEDCP_FLEET_KEY_FILE", str(info["key"]))
    from schedcp_mcp.jobs import fleetauth

    with monkeypatch.context() as m:  # a tag it made up
        m.setattr(fleetauth, "tag", lambda body, key=None: "0" * 64)
        fleet.run_job.apply_async(args=[_order(marks)], queue="schedcp", task_id="forged")

    with fleet.Fleet(capacity=1):
        j = queue.wait(queue.submit("noop", {"echo": "real", "marker_dir": str(marks)}).id, 60)
    assert j.state == "succeeded" and j.result["echo"] == "real"
    assert [p.name.split(".")[0] for p in marks.iterdir()] == [j.id]  # only the real job ran
    assert _queue_len(info) == 0  # the forged orders were taken off the queue and dropped
    log = (tmp_path / "w0.log").read_text()
    assert "failed authentication" in log or "ContentDisallowed" in log or "disallowed" in log.lower()
    assert records_in(home) == {}


def _sent_task_id(info) -> tuple[str, dict]:
    """What a broker peer reads off the queue: the id of the order waiting there."""
    import redis

    c = redis.Redis(port=info["port"], password=info["password"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for q in c.keys("schedcp*"):  # one list per priority step
            if c.type(q) == b"list" and c.llen(q):
                msg = c.lpop(q)  # taken: no worker will get it
                return json.loads(msg)["headers"]["id"], c
        time.sleep(0.05)
    raise AssertionError("the coordinator sent nothing")


def test_forged_replies_are_refused_with_nothing_stored(cluster_of, tmp_path, schedcp_home):
    """No worker runs; a broker peer answers the coordinator's verify order itself with a "passed"
    report: as plain JSON, then sealed under its own key. A fleet member (it has the key) then
    answers for another job, and with a report whose object is a root-only file it never sent. Each
    reply is refused, the job fails saying why, and no report is stored."""

    from kombu.utils import json as kjson

    from schedcp_mcp import candidates, store
    from schedcp_mcp.jobs import fleetauth, queue

    fleet, _ = cluster_of([])
    info = cluster_of.info
    other_key = tmp_path / "attacker.key"
    write_private(other_key, secrets.token_hex(32).encode())

    def forged_reply(job, src=None, **over):
        sha = "ab" * 32
        src_sha = hashlib.sha256(src.encode()).hexdigest() if src else sha
        rep = {"id": f"rep-{job.id[4:]}", "created_at": time.time(), "source_sha256": src_sha, "object_sha256": sha,
               "object_path": "/etc/shadow", "params": {}, "layer1": {"verdict": "accepted", "stage": "done",
               "source_sha256": src_sha, "object_sha256": sha, "object_path": "/etc/shadow"}}
        reply = {"job_id": job.id, "attempt": 1, "outcome": "succeeded",
                 "result": {"report_id": rep["id"], "verdict": "accepted"}, "error": None, "host": "evil",
                 "pid": 1, "redelivered": False,
                 "carried": {"records": [{"kind": "report", "id": rep["id"], "created_at": 0, "ref": None,
                                          "data": json.dumps(rep)}], "objects": {},
                             "sources": {src_sha: src} if src else {}}}
        return {**reply, **over}

    def meta(result, task_id):
        return {"status": "SUCCESS", "result": result, "traceback": None, "children": [], "task_id": task_id,
                "date_done": None}

    ways = []
    with fleet.Fleet(capacity=1):
        for way in ("plain json", "sealed under another key", "another job's reply", "another source",
                    "object outside the store"):
            before = records_in(schedcp_home)
            src = HOSTILE + f"// {way}\n"
            job = candidates.verify_job(source=src, use_cache=False)
            tid, c = _sent_task_id(info)
            key = f"celery-task-meta-{tid}"
            if way == "plain json":
                c.set(key, json.dumps(meta(forged_reply(job), tid)))
            elif way == "sealed under another key":  # sealed by hand: pointing this process's key
                # file at the attacker's for a moment raced the coordinator's thread, which read the
                # reply under that key then (and refused it later, for its source: a flaky failure)
                body = kjson.dumps(meta(forged_reply(job), tid), sort_keys=True, separators=(",", ":")).encode()
                c.set(key, fleetauth.tag(body, fleetauth.load_key(other_key)).encode() + b"\n" + body)
            else:
                real = src if way == "object outside the store" else None
                reply = forged_reply(job, real, **({"job_id": "job-0000000000"} if way == "another job's reply" else {}))
                fleet.app.backend.store_result(tid, reply, "SUCCESS")
            j = queue.wait(job.id, 30)
            ways.append((way, j.state, j.error))
            assert j.state == "failed" and "nothing of it was stored" in j.error, (way, j.state, j.error)
            assert store.get_raw(f"rep-{job.id[4:]}") is None
            assert set(records_in(schedcp_home)) == set(before)
    assert "authentication" in ways[0][2] and "authentication" in ways[1][2]
    assert "not this job" in ways[2][2] and "not of the source" in ways[3][2]
    assert "object that was not sent" in ways[4][2]
    assert [a["action"] for a in store.audit_log(10)].count("fleet_reply_refused") == 5


def test_a_fleet_without_its_locks_does_not_start(tmp_path, monkeypatch, schedcp_home):
    from schedcp_mcp.jobs import fleetauth

    for url in ("redis://127.0.0.1:6379/0", "redis://admin@127.0.0.1:6379/0", "redis+socket:///tmp/r.sock"):
        with pytest.raises(fleetauth.FleetAuthError, match="no password"):
            fleetauth.check_broker(url)
    assert fleetauth.check_broker("redis://:s3cret@127.0.0.1:6379/0")
    key = tmp_path / "k"
    key.write_text("x" * 64)
    os.chmod(key, 0o644)
    with pytest.raises(fleetauth.FleetAuthError, match="mode 600"):
        fleetauth.load_key(key)
    os.chmod(key, 0o600)
    link = tmp_path / "link"
    link.symlink_to(key)
    with pytest.raises(fleetauth.FleetAuthError, match="cannot read"):
        fleetauth.load_key(link)
    short = tmp_path / "short"
    write_private(short, b"abc")
    with pytest.raises(fleetauth.FleetAuthError, match="too short"):
        fleetauth.load_key(short)
    assert len(fleetauth.load_key(key)) == 64
