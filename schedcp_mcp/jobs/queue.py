"""The job queue in SQLite: submit, claim, heartbeat, finish, cancel, reclaim.

Every transition is one `BEGIN IMMEDIATE` transaction, so any number of threads and processes (local
pools, `schedcp worker`, the Celery coordinator, a CLI cancelling) share one store safely. A result is
written only by the attempt that currently owns the job (`state='running' AND attempts=? AND
worker=?`): a worker that was given up on (it stopped heartbeating, passed its timeout, or its job
was cancelled) may still finish, but its late result is discarded — no result is recorded twice.

Failures: the handler's `TransientError` (VM boot failure, guest crash, guest timeout), an attempt's
timeout and a lost worker are transient: retried with exponential backoff until `max_attempts`, then `dead`
(kept with every attempt's error for inspection). Any other error is final (`failed`): bad input,
or a machine that cannot do it at all (no sandbox image, a host without sched_ext). A candidate
that the verifier rejected or that stalled the guest is not an error: the job `succeeded` and its
result says so.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable

import psutil
from pydantic import BaseModel

from .. import store
from .. import errors
from ..errors import BadInput, NotFound
from . import kinds
from .models import LANES, Attempt, Budget, Job, JobDetail, LaneName, WorkerInfo

HOST = socket.gethostname()
_TERMINAL_SQL = "('succeeded','failed','cancelled','dead')"
_wakeups: list[threading.Event] = []  # local pools, woken at once by a local submit


def backoff_s(attempt: int) -> float:
    """Delay before retry number `attempt` (1, 2, …): base × 2^(attempt-1), capped."""
    base = float(os.environ.get("SCHEDCP_JOBS_BACKOFF_S", "2"))
    return min(base * 2 ** (attempt - 1), 300.0)


def _wake_local() -> None:
    for e in list(_wakeups):
        e.set()


# --- submit ------------------------------------------------------------------------------------

def submit(kind: str, inputs: BaseModel | dict[str, Any] | None = None, *, lane: LaneName = "normal",
           timeout_s: float | None = None, max_attempts: int | None = None,
           complete_by_s: float | None = None, deps: Iterable[str] = (), parent: str | None = None,
           join_all: bool = False, budget: Budget | None = None, use_cache: bool = True,
           actor: str = "api", not_before: float | None = None, deadline: float | None = None,
           node: str | None = None) -> Job:
    """Queue a job (or answer it at once: see below). `inputs`: the kind's request (a model, or its
    JSON as a dict, checked against the kind's model and stored as that model writes it); `node`: its
    name in a campaign. `complete_by_s` is a deadline from now
    (`deadline`: the same as epoch seconds; the earlier wins). A job past its deadline is
    dead-lettered: before it starts when it is claimed, while running by the supervisor's sweep.

    Identical work (the kind's content key: source, parameters, kernel build, workloads, rounds)
    is not done twice: with `use_cache`, a job whose twin already succeeded is recorded as succeeded
    with that twin's result (`cached_from`); a top-level job whose twin is pending or running is
    that job."""
    k = kinds.get(kind)
    req = k.parse(inputs or {})
    inputs = req.model_dump(mode="json") if isinstance(req, BaseModel) else dict(req)
    if node is not None:
        inputs[kinds.NODE] = node
    if lane not in LANES:
        raise BadInput(f"unknown priority lane {lane!r}", f"use one of {', '.join(LANES)}")
    key = k.key(req) if k.key else None
    now = time.time()
    deps = list(dict.fromkeys(deps))
    row = dict(id=store.new_id("job"), kind=kind, lane=LANES.index(lane), state="pending",
               created_at=now, not_before=not_before or now,
               deadline=min([t for t in (deadline, now + complete_by_s if complete_by_s else None) if t],
                            default=None),
               timeout_s=float(timeout_s or k.timeout_s),
               max_attempts=int(max_attempts or k.max_attempts), parent=parent,
               join_all=int(join_all), dedupe_key=key, budget=budget.model_dump_json() if budget else None,
               actor=actor, inputs=json.dumps(inputs, sort_keys=True))
    with store.transaction() as conn:
        if parent is None and actor not in ("cli", "schedcp"):
            from ..access import check_cap

            held = conn.execute("SELECT COUNT(*) FROM jobs WHERE actor=? AND parent IS NULL AND state IN "
                                "('pending','running')", (actor,)).fetchone()[0]
            check_cap("queued_jobs", held + 1, actor, "queued or running jobs for this caller")
        for d in deps + ([parent] if parent else []):
            if conn.execute("SELECT 1 FROM jobs WHERE id=?", (d,)).fetchone() is None:
                raise NotFound(f"no job {d!r} to depend on", "list jobs with `schedcp jobs`")
        if key and use_cache:
            twin = conn.execute("SELECT * FROM jobs WHERE dedupe_key=? AND state='succeeded' "
                                "ORDER BY finished_at DESC LIMIT 1", (key,)).fetchone()
            if twin is not None:
                row.update(state="succeeded", started_at=now, finished_at=now, result=twin["result"],
                           cached_from=twin["cached_from"] or twin["id"], progress=1.0,
                           message="answered from the cache")
            elif parent is None and not deps:
                live = conn.execute("SELECT id FROM jobs WHERE dedupe_key=? AND state IN "
                                    "('pending','running') AND parent IS NULL ORDER BY created_at "
                                    "LIMIT 1", (key,)).fetchone()
                if live is not None:
                    return _get(conn, live["id"])
        cols = ", ".join(row)
        conn.execute(f"INSERT INTO jobs({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        conn.executemany("INSERT INTO job_deps(job, dep) VALUES (?,?)", [(row["id"], d) for d in deps])
    _wake_local()
    return get(row["id"])


def add_deps(job_id: str, deps: list[str]) -> None:
    store.db().executemany("INSERT OR IGNORE INTO job_deps(job, dep) VALUES (?,?)", [(job_id, d) for d in deps])


def release(job_id: str) -> None:
    """Make a held job (not_before far ahead) claimable now."""
    store.db().execute("UPDATE jobs SET not_before=? WHERE id=? AND state='pending'", (time.time(), job_id))
    _wake_local()


# --- reading -----------------------------------------------------------------------------------

def _get(conn, job_id: str) -> Job:
    r = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
    if r is None:
        recent = [x["id"] for x in conn.execute("SELECT id FROM jobs ORDER BY created_at DESC LIMIT 5")]
        raise NotFound(f"no job {job_id!r}", "recent jobs: " + ", ".join(recent) if recent
                       else "no jobs yet")
    deps = [x["dep"] for x in conn.execute("SELECT dep FROM job_deps WHERE job=?", (job_id,))]
    return Job.from_row(r, deps)


def get(job_id: str) -> Job:
    return _get(store.db(), job_id)


def detail(job_id: str) -> JobDetail:
    conn = store.db()
    job = _get(conn, job_id)
    children = [Job.from_row(r) for r in conn.execute(
        "SELECT * FROM jobs WHERE parent=? ORDER BY lane, created_at", (job_id,))]
    attempts = [Attempt(**{k: r[k] for k in r.keys() if k != "job"}) for r in conn.execute(
        "SELECT * FROM job_attempts WHERE job=? ORDER BY attempt", (job_id,))]
    return JobDetail(job=job, children=children, attempts=attempts)


def list_jobs(state: str | None = None, kind: str | None = None, lane: str | None = None,
              parent: str | None = None, top_level: bool = False, limit: int = 50) -> list[Job]:
    """Newest first, filtered."""
    where, args = [], []
    for col, val in (("state", state), ("kind", kind), ("parent", parent)):
        if val:
            where.append(f"{col}=?")
            args.append(val)
    if lane:
        if lane not in LANES:
            raise BadInput(f"unknown lane {lane!r}", f"use one of {', '.join(LANES)}")
        where.append("lane=?")
        args.append(LANES.index(lane))
    if top_level:
        where.append("parent IS NULL")
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    rows = store.db().execute(sql + " ORDER BY created_at DESC LIMIT ?", (*args, limit))
    return [Job.from_row(r) for r in rows]


def queue_depth() -> dict[str, int]:
    """Pending jobs per lane."""
    depth = {n: 0 for n in LANES}
    for r in store.db().execute("SELECT lane, COUNT(*) n FROM jobs WHERE state='pending' GROUP BY lane"):
        depth[LANES[r["lane"]]] = r["n"]
    return depth


def dep_results(job: Job) -> dict[str, Any]:
    """The results of the jobs this one depends on (what a DAG node passes to its dependents)."""
    if not job.deps:
        return {}
    marks = ",".join("?" * len(job.deps))
    return {r["id"]: json.loads(r["result"]) if r["result"] else None for r in store.db().execute(
        f"SELECT id, result FROM jobs WHERE id IN ({marks})", job.deps)}


def wait(job_id: str, timeout_s: float | None = None,
         on_progress: Callable[[str, float], None] | None = None, poll_s: float = 0.1,
         on_poll: Callable[[Job], None] | None = None) -> Job:
    """Block until the job ends (or `timeout_s`), reporting its progress as it changes;
    `on_poll(job)` is called on every look (pool.run_to_end checks there that someone runs it)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = None
    while True:
        job = get(job_id)
        if job.kind == "campaign" and job.state == "pending":
            n, ended = store.db().execute(f"SELECT COUNT(*), SUM(state IN {_TERMINAL_SQL}) FROM jobs "
                                          "WHERE parent=?", (job_id,)).fetchone()
            run = store.db().execute("SELECT inputs, progress, message FROM jobs WHERE parent=? AND "
                                     "state='running' ORDER BY started_at LIMIT 1", (job_id,)).fetchone()
            job.message = f"{ended or 0} of {n} nodes done" + (  # and what the running one says
                f"; {json.loads(run['inputs']).get('node', '?')}: {run['message']}" if run else "")
            job.progress = ((ended or 0) + (run["progress"] if run else 0)) / max(n, 1)
        if on_progress and (job.message, job.progress) != seen:
            seen = (job.message, job.progress)
            on_progress(job.message or job.state, job.progress)
        if job.done or (deadline is not None and time.monotonic() > deadline):
            return job
        if on_poll:
            on_poll(job)
        time.sleep(poll_s)


def result_or_raise(job: Job) -> dict[str, Any]:
    """A finished job's result, or the error it ended with, raised as what it was (a bad input stays
    a BadInput; a dead-lettered job is an InfrastructureError)."""
    if job.state == "succeeded":
        return job.result or {}
    hint = f"`schedcp jobs show {job.id}` (MCP get_job) lists every attempt"
    if job.state == "dead" and "complete-by deadline" in (job.error or ""):
        raise errors.InfrastructureError(f"job {job.id} did not complete by its deadline: {job.error}",
                                         "give it more time (--deadline / deadline_s) or none; " + hint)
    if job.state == "dead":
        raise errors.InfrastructureError(f"job {job.id} failed {job.attempts} time(s) for reasons outside "
                                         f"the candidate and was dead-lettered: {job.error}", hint)
    if job.state == "cancelled":
        raise errors.SchedcpError(f"job {job.id} was cancelled: {job.error}", hint)
    if job.state != "failed":
        raise errors.SchedcpError(f"job {job.id} has not finished ({job.state})",
                                  f"wait for it: `schedcp jobs wait {job.id}`")
    kind, sep, message = (job.error or "").partition(": ")
    message, _, given_hint = message.partition("\nhint: ")
    cls = getattr(errors, kind, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, errors.SchedcpError):
        raise cls(message, given_hint or None)
    raise errors.SchedcpError(job.error or "failed", hint)


# --- workers -----------------------------------------------------------------------------------

def _proc_start(pid: int) -> float:
    """The start time of a running process; 0.0 when it is gone (a zombie, killed but not yet
    reaped by its parent, is gone too)."""
    try:
        p = psutil.Process(pid)
        return 0.0 if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return 0.0


def register_worker(engine: str, size: int, scope: str | None = None,
                    kind_names: Iterable[str] | None = None) -> str:
    pid, now = os.getpid(), time.time()
    wid = f"{engine}:{HOST}:{pid}:{os.urandom(2).hex()}"
    store.db().execute("INSERT INTO workers(id, engine, host, pid, pid_start, size, started_at, heartbeat_at, "
                       "scope, kinds) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (wid, engine, HOST, pid, _proc_start(pid), size, now, now, scope,
                        json.dumps(sorted(kind_names)) if kind_names is not None else None))
    return wid


def drain_worker(worker_id: str) -> None:
    """The pool stopped claiming: waiting commands must not count on it for new work."""
    store.db().execute("UPDATE workers SET draining=1 WHERE id=?", (worker_id,))


def stop_worker(worker_id: str) -> None:
    store.db().execute("UPDATE workers SET stopped_at=?, end_reason='stopped' WHERE id=? AND stopped_at IS NULL",
                       (time.time(), worker_id))


def _worker_alive(w) -> bool:
    """Is the pool process that owns a job still there? Known for this host (pid + its start time:
    a reused pid is not it); others by heartbeat."""
    if w["stopped_at"]:
        return False
    if w["host"] != HOST:
        return True
    start = _proc_start(w["pid"])
    return start != 0.0 and abs(start - w["pid_start"]) < 1.0


def bury_dead_workers(conn=None) -> list[str]:
    """Mark the workers of this host whose process is gone as ended ('process gone') at once, so no
    one counts on them (a killed `schedcp worker` or CLI command never says it stopped)."""
    conn = conn or store.db()
    dead = [w["id"] for w in conn.execute("SELECT * FROM workers WHERE stopped_at IS NULL AND host=?", (HOST,))
            if not _worker_alive(w)]
    if dead:
        conn.executemany("UPDATE workers SET stopped_at=?, end_reason='process gone' WHERE id=? "
                         "AND stopped_at IS NULL", [(time.time(), d) for d in dead])
    return dead


def list_workers(include_stopped_s: float = 600) -> list[WorkerInfo]:
    conn, now = store.db(), time.time()
    bury_dead_workers(conn)
    out = []
    for w in conn.execute("SELECT * FROM workers WHERE stopped_at IS NULL OR stopped_at>? "
                          "ORDER BY started_at DESC", (now - include_stopped_s,)):
        running = [r["id"] for r in conn.execute(
            "SELECT id FROM jobs WHERE worker=? AND state='running'", (w["id"],))]
        out.append(WorkerInfo(**{k: w[k] for k in WorkerInfo.model_fields if k in w.keys()},
                              alive=_worker_alive(w) and now - w["heartbeat_at"] < 30, running=running))
    return out


def set_waiter(job_id: str) -> None:
    """This process waits for the job and owns it (a synchronous command): if it dies while the job
    is still to be done, the job is cancelled instead of retried for no one (see reclaim). A second
    command that adopts the same job (its twin) takes it over."""
    pid = os.getpid()
    store.db().execute("UPDATE jobs SET waiter=? WHERE id=?", (f"{HOST}:{pid}:{_proc_start(pid)}", job_id))


def _waiter_gone(waiter: str | None) -> bool:
    if not waiter:
        return False
    host, pid, start = waiter.rsplit(":", 2)
    if host != HOST:
        return False
    now_start = _proc_start(int(pid))
    return now_start == 0.0 or abs(now_start - float(start)) >= 1.0


def runner_for(job_id: str, stale_s: float = 30.0) -> str | None:
    """Who will run what is left of this job (it and its unfinished children): the id of a live
    pool that may claim its pending work — one that runs any job of those kinds, or one scoped to
    this very job — or, when nothing is pending, of the live pool running it. None: nobody; a
    command waiting for it must start a pool (see pool.run_to_end)."""
    conn, now = store.db(), time.time()
    bury_dead_workers(conn)
    left = conn.execute(f"SELECT id, kind, state, worker FROM jobs WHERE (id=? OR parent=?) "
                        f"AND state NOT IN {_TERMINAL_SQL}", (job_id, job_id)).fetchall()
    if not left:
        return "nobody needed"
    live = [w for w in conn.execute("SELECT * FROM workers WHERE stopped_at IS NULL")
            if _worker_alive(w) and now - w["heartbeat_at"] < stale_s]
    by_id = {w["id"]: w for w in live}
    needs = [r for r in left if r["state"] == "pending" or r["worker"] not in by_id]
    if not needs:
        return left[0]["worker"]
    kinds_needed = {r["kind"] for r in needs}
    for w in live:
        if w["draining"]:
            continue
        takes = set(json.loads(w["kinds"])) if w["kinds"] else None
        if (w["scope"] is None and (takes is None or kinds_needed <= takes)) or w["scope"] == job_id:
            return w["id"]
    return None


def heartbeat(worker_id: str, job_ids: Iterable[str]) -> dict[str, tuple[str, int, str | None]]:
    """Say the pool is alive (and so are its running jobs); return (state, attempts, worker) of the
    given jobs, so the pool notices a job cancelled or given up on elsewhere."""
    now = time.time()
    ids = list(job_ids)
    with store.transaction() as conn:
        conn.execute("UPDATE workers SET heartbeat_at=? WHERE id=?", (now, worker_id))
        conn.execute("UPDATE jobs SET heartbeat_at=? WHERE worker=? AND state='running'", (now, worker_id))
        if not ids:
            return {}
        rows = conn.execute(f"SELECT id, state, attempts, worker FROM jobs WHERE id IN "
                            f"({','.join('?' * len(ids))})", ids).fetchall()
    return {r["id"]: (r["state"], r["attempts"], r["worker"]) for r in rows}


# --- claim -------------------------------------------------------------------------------------

_READY = f"""
SELECT j.* FROM jobs j
WHERE j.state='pending' AND j.not_before<=? {{kinds}}
  AND NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs x ON x.id=d.dep
                  WHERE d.job=j.id AND x.state!='succeeded'
                    AND (j.join_all=0 OR x.state NOT IN {_TERMINAL_SQL}))
ORDER BY j.lane, j.created_at LIMIT 1
"""


def budget_usage(conn, parent_id: str, now: float | None = None) -> dict[str, float]:
    """What a campaign's children have spent: attempts started, seconds run (running ones so far)."""
    now = now or time.time()
    r = conn.execute("SELECT COALESCE(SUM(attempts),0) runs, COALESCE(SUM(elapsed_s + CASE WHEN "
                     "state='running' THEN ?-started_at ELSE 0 END),0) secs FROM jobs WHERE parent=?",
                     (now, parent_id)).fetchone()
    return {"runs": r["runs"], "sandbox_s": round(r["secs"], 3)}


def _over_budget(conn, job, now: float) -> str | None:
    if not job["parent"]:
        return None
    p = conn.execute("SELECT budget FROM jobs WHERE id=?", (job["parent"],)).fetchone()
    if p is None or not p["budget"]:
        return None
    b = Budget.model_validate_json(p["budget"])
    used = budget_usage(conn, job["parent"], now)
    if b.runs is not None and used["runs"] + 1 > b.runs:
        return f"budget exhausted: {used['runs']} of {b.runs} runs used"
    if b.sandbox_s is not None and used["sandbox_s"] >= b.sandbox_s:
        return f"budget exhausted: {used['sandbox_s']:.1f} of {b.sandbox_s:g} sandbox seconds used"
    return None


def claim(worker_id: str, kind_names: Iterable[str] | None = None, scope: str | None = None) -> Job | None:
    """Atomically take the next ready job — lane first (urgent … low), then oldest — for `worker_id`.

    Ready: pending, past its backoff, every dependency succeeded (a join node: ended). A job past
    its complete-by deadline is dead-lettered instead; a campaign child that its parent's budget
    cannot pay for is cancelled and says so."""
    names = list(kind_names) if kind_names is not None else None
    kinds_sql = f"AND j.kind IN ({','.join('?' * len(names))})" if names else ""
    args: list[Any] = list(names or [])
    if scope:
        kinds_sql += " AND (j.id=? OR j.parent=?)"
        args += [scope, scope]
    while True:
        with store.transaction() as conn:
            now = time.time()  # inside: a job that ended while we waited for the lock ended before this
            row = conn.execute(_READY.format(kinds=kinds_sql), (now, *args)).fetchone()
            if row is None:
                return None
            if row["deadline"] is not None and row["deadline"] < now:
                _end(conn, row["id"], "dead", now, error="passed its complete-by deadline before it could start")
                continue
            why = _over_budget(conn, row, now)
            if why:
                _end(conn, row["id"], "cancelled", now, error=why)
                continue
            attempt = row["attempts"] + 1
            conn.execute("UPDATE jobs SET state='running', attempts=?, worker=?, started_at=?, "
                         "heartbeat_at=?, progress=0, message='started' WHERE id=?",
                         (attempt, worker_id, now, now, row["id"]))
            conn.execute("INSERT INTO job_attempts(job, attempt, worker, started_at) VALUES (?,?,?,?)",
                         (row["id"], attempt, worker_id, now))
            return _get(conn, row["id"])


# --- ending ------------------------------------------------------------------------------------

def _end(conn, job_id: str, state: str, now: float, *, result: Any = None, error: str | None = None) -> None:
    """Move a job to a terminal state and cancel the dependents that can no longer run."""
    conn.execute("UPDATE jobs SET state=?, finished_at=?, result=COALESCE(?, result), error=?, "
                 "progress=CASE WHEN ?='succeeded' THEN 1 ELSE progress END, "
                 "message=CASE WHEN ?='succeeded' THEN 'succeeded' ELSE message END WHERE id=?",
                 (state, now, json.dumps(result) if result is not None else None, error, state, state,
                  job_id))
    if state != "succeeded":
        _propagate(conn, [job_id], now)


def _propagate(conn, ended: list[str], now: float) -> None:
    while ended:
        marks = ",".join("?" * len(ended))
        rows = conn.execute(f"SELECT DISTINCT j.id, d.dep FROM job_deps d JOIN jobs j ON j.id=d.job "
                            f"WHERE d.dep IN ({marks}) AND j.join_all=0 AND j.state='pending'",
                            ended).fetchall()
        ended = []
        for r in rows:
            conn.execute("UPDATE jobs SET state='cancelled', finished_at=?, error=? WHERE id=? "
                         "AND state='pending'", (now, f"dependency {r['dep']} did not succeed", r["id"]))
            ended.append(r["id"])


def _close_attempt(conn, job_id: str, attempt: int, outcome: str, error: str | None, now: float) -> None:
    conn.execute("UPDATE job_attempts SET ended_at=?, outcome=?, error=? WHERE job=? AND attempt=? "
                 "AND ended_at IS NULL", (now, outcome, error, job_id, attempt))


def _retry_or_dead(conn, row, outcome: str, error: str, now: float) -> str:
    """A transient failure of the current attempt: back to pending after a backoff, or dead."""
    elapsed = now - (row["started_at"] or now)
    _close_attempt(conn, row["id"], row["attempts"], outcome, error, now)
    delay = backoff_s(row["attempts"])
    late = row["deadline"] is not None and now + delay > row["deadline"]
    if row["attempts"] < row["max_attempts"] and not late:
        conn.execute("UPDATE jobs SET state='pending', worker=NULL, not_before=?, error=?, "
                     "elapsed_s=elapsed_s+?, message=? WHERE id=?",
                     (now + delay, error, elapsed, f"retrying in {delay:.1f} s after: {error}"[:300], row["id"]))
        return "pending"
    why = "past its complete-by deadline" if late else f"{row['attempts']} attempts"
    conn.execute("UPDATE jobs SET elapsed_s=elapsed_s+?, message=? WHERE id=?",
                 (elapsed, f"dead-lettered after {why}", row["id"]))
    _end(conn, row["id"], "dead", now, error=f"{error} (dead-lettered after {why})")
    return "dead"


def finish(job_id: str, attempt: int, worker_id: str, outcome: str, result: Any = None,
           error: str | None = None) -> bool:
    """Record the end of an attempt: outcome succeeded | failed | transient. False (and nothing
    written) when this attempt no longer owns the job."""
    with store.transaction() as conn:
        now = time.time()
        row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["state"] != "running" or row["attempts"] != attempt or row["worker"] != worker_id:
            _close_attempt(conn, job_id, attempt, "superseded", error, now)
            return False
        if outcome == "transient":
            _retry_or_dead(conn, row, "transient", error or "transient failure", now)
        else:
            _close_attempt(conn, job_id, attempt, outcome, error, now)
            conn.execute("UPDATE jobs SET elapsed_s=elapsed_s+? WHERE id=?", (now - row["started_at"], job_id))
            _end(conn, job_id, "succeeded" if outcome == "succeeded" else "failed", now,
                 result=result, error=error)
    _wake_local()
    return True


def set_progress(job_id: str, attempt: int, message: str, fraction: float) -> None:
    store.db().execute("UPDATE jobs SET message=?, progress=? WHERE id=? AND attempts=? AND state='running'",
                       (message[:300], max(0.0, min(1.0, fraction)), job_id, attempt))


def reclaim(stale_s: float = 30.0) -> list[tuple[str, str]]:
    """The supervisor's sweep over running jobs: a job whose pool process died (this host: the pid
    is gone; elsewhere: no heartbeat for `stale_s`) or whose attempt passed its timeout is retried
    or dead-lettered; one past its complete-by deadline is dead. Returns (job id, what happened)."""
    now = time.time()
    done = []
    with store.transaction() as conn:
        bury_dead_workers(conn)
        rows = conn.execute("SELECT j.*, w.host w_host, w.pid w_pid, w.pid_start w_pid_start, "
                            "w.stopped_at w_stopped, w.heartbeat_at w_hb FROM jobs j LEFT JOIN workers w "
                            "ON w.id=j.worker WHERE j.state='running'").fetchall()
        for r in rows:
            w = {"host": r["w_host"], "pid": r["w_pid"], "pid_start": r["w_pid_start"],
                 "stopped_at": r["w_stopped"]}
            hb = r["w_hb"] or r["heartbeat_at"] or r["started_at"]
            if r["deadline"] is not None and now > r["deadline"]:
                _close_attempt(conn, r["id"], r["attempts"], "timeout", "past its complete-by deadline", now)
                conn.execute("UPDATE jobs SET elapsed_s=elapsed_s+? WHERE id=?", (now - r["started_at"], r["id"]))
                _end(conn, r["id"], "dead", now, error="passed its complete-by deadline while running")
                done.append((r["id"], "dead"))
            elif now - r["started_at"] > r["timeout_s"]:
                done.append((r["id"], _retry_or_dead(conn, r, "timeout",
                                                     f"timed out after {r['timeout_s']:g} s", now)))
            elif (r["w_host"] is not None and not _worker_alive(w)) or now - hb > stale_s:
                if _waiter_gone(r["waiter"]) and not r["parent"]:
                    # the command that waited for it died with its pool: no one wants it any more
                    why = f"its worker {r['worker']} and the command waiting for it ended"
                    _close_attempt(conn, r["id"], r["attempts"], "worker_lost", why, now)
                    conn.execute("UPDATE jobs SET elapsed_s=elapsed_s+? WHERE id=?",
                                 (now - r["started_at"], r["id"]))
                    _cancel_tree(conn, r["id"], now, why)
                    done.append((r["id"], "cancelled"))
                else:
                    done.append((r["id"], _retry_or_dead(conn, r, "worker_lost",
                                                         f"its worker {r['worker']} stopped", now)))
    if done:
        _wake_local()
    return done


def cancel(job_id: str, actor: str = "api") -> list[str]:
    """Cancel a job and its whole subtree (children, their children, and the dependents that can no
    longer run); running VMs of those jobs on this host are killed at once, and their pools stop the
    work at their next heartbeat. Returns the ids cancelled."""
    now = time.time()
    with store.transaction() as conn:
        _get(conn, job_id)
        tree = _cancel_tree(conn, job_id, now, f"cancelled by {actor}")
    if tree:
        kinds.release(tree)
        store.audit(actor, "cancel_job", {"job": job_id, "cancelled": tree})
    _wake_local()
    return tree


def _cancel_tree(conn, job_id: str, now: float, why: str) -> list[str]:
    tree = [r["id"] for r in conn.execute(
        "WITH RECURSIVE t(id) AS (SELECT ? UNION SELECT j.id FROM jobs j JOIN t ON j.parent=t.id) "
        f"SELECT jobs.id FROM jobs JOIN t ON t.id=jobs.id WHERE jobs.state NOT IN {_TERMINAL_SQL}",
        (job_id,))]
    for jid in tree:
        r = conn.execute("SELECT state, attempts, started_at FROM jobs WHERE id=?", (jid,)).fetchone()
        if r["state"] == "running":
            _close_attempt(conn, jid, r["attempts"], "cancelled", why, now)
            conn.execute("UPDATE jobs SET elapsed_s=elapsed_s+? WHERE id=?", (now - r["started_at"], jid))
        _end(conn, jid, "cancelled", now, error=why)
    return tree
