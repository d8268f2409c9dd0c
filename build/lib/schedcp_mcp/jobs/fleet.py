"""The distributed engine for fleets: the same jobs and campaigns, run by Celery workers (Redis broker).

Roles:
- the **coordinator** (`Fleet`, `schedcp worker --engine celery`) sits beside the store, as a local
  pool does: it claims ready jobs (lanes, DAG dependencies, budgets, dedupe: all decided in SQLite,
  which stays the record of what ran), sends each to Celery with the job and its dependencies'
  results, heartbeats it while Celery has it, and writes the outcome back — only if its attempt
  still owns the job, as a pool does. Cancelling a job revokes its task.
- **workers** (`celery -A schedcp_mcp.jobs.fleet worker`, on any machine with a sandbox, each with
  its own $SCHEDCP_HOME) run the job's kind (`kinds.execute`, the same code a local pool runs) and
  return the outcome; they report progress through the task state. The records a job refers to go
  with it, and the records it wrote come back with its outcome (`carry`), so the coordinator's
  store has every report. Kinds that read the store themselves (`Kind.local`: a campaign's join)
  are run by the coordinator, beside the store.

Celery semantics used: late acks + reject on worker lost (a worker that dies mid-job does not ack,
and the broker gives the job to another worker: a dead child process at once, a dead worker host
after the visibility timeout), per-message priority (the lanes), prefetch of one and a concurrency
per worker (the VMs a machine holds). Retries of transient failures and dead-lettering stay in the
store (`queue.finish`), so they mean the same on both engines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from celery.result import AsyncResult

from .. import store
from ..sandbox import vm as vmmod
from . import carry, kinds, queue
from .kinds import JobContext
from .models import LANES, Job
from .pool import Pool, Service

log = logging.getLogger("schedcp.jobs.fleet")

QUEUE = "schedcp"
#: Redis priorities: 0 is served first
LANE_PRIORITY = {"urgent": 0, "high": 3, "normal": 6, "low": 9}


def broker_url() -> str:
    return os.environ.get("SCHEDCP_BROKER", "redis://127.0.0.1:6379/0")


def make_app() -> Celery:
    app = Celery("schedcp", broker=broker_url(), backend=broker_url())
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=QUEUE, task_track_started=True, result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        # a job not acked this long after delivery goes to another worker: longer than any job
        # (and a living worker looks for such jobs every SCHEDCP_FLEET_RESTORE_S)
        broker_transport_options={"visibility_timeout": float(os.environ.get("SCHEDCP_FLEET_VISIBILITY_S", "7200")),
                                  "unacked_restore_interval": float(os.environ.get("SCHEDCP_FLEET_RESTORE_S", "10")),
                                  "unacked_restore_throttle": 1,
                                  "queue_order_strategy": "priority", "priority_steps": list(range(10))},
    )
    return app


app = make_app()


@worker_process_init.connect
def _reap_vms_left_behind(**_: Any) -> None:
    """A (re)started worker process stops the sandbox VMs a SIGKILLed predecessor in this home left
    running (their qemu is in its own session, so killing the worker's group does not reach it), as
    the local pool does when it starts."""
    vmmod.reap_orphans()


@app.task(name="schedcp.run_job", bind=True)
def run_job(self, job: dict[str, Any], dep_results: dict[str, Any],
            referred: dict[str, Any] | None = None) -> dict[str, Any]:
    """On a worker: record the records the job refers to (`carry`), run one attempt of the job,
    return its outcome with every record it wrote (never raise: the store decides)."""
    j = Job.model_validate(job)
    carry.unpack(referred)
    ctx = JobContext(j, dep_results, write=lambda m, f: self.update_state(
        state="PROGRESS", meta={"message": m, "progress": f}))
    with store.capture() as written:
        outcome, result, error = kinds.execute(ctx)
    return {"outcome": outcome or "failed", "result": result, "error": error, "host": socket.gethostname(),
            "pid": os.getpid(), "redelivered": bool((self.request.delivery_info or {}).get("redelivered")),
            "carried": carry.with_files(list(written.values())).model_dump()}


class Fleet(Service):
    """The coordinator: a pool whose slots are Celery workers' (`capacity` jobs in flight)."""

    def __init__(self, capacity: int = 4, *, poll_s: float = 0.05, heartbeat_s: float = 1.0,
                 stale_s: float = 30.0):
        self.capacity, self.poll_s, self.heartbeat_s, self.stale_s = capacity, poll_s, heartbeat_s, stale_s
        self.id: str | None = None
        self._inflight: dict[str, tuple[Job, AsyncResult]] = {}
        self._pool: Pool | None = None  # runs the kinds that read the store, here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote, self._local = kinds.names(local=False), kinds.names(local=True)

    def start(self) -> "Fleet":
        self.id = queue.register_worker("celery", self.capacity)
        queue.reclaim(self.stale_s)
        self._pool = Pool(self.capacity, kind_names=self._local, engine="celery",
                          heartbeat_s=self.heartbeat_s, stale_s=self.stale_s).start()
        self._thread = threading.Thread(target=self._loop, name="schedcp-fleet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self._pool:
            self._pool.stop()
        queue.stop_worker(self.id)
        queue.reclaim(self.stale_s)  # what was in flight goes back to the queue

    def _loop(self) -> None:
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                beat = time.monotonic() - last_beat >= self.heartbeat_s
                self._step(beat)
                if beat:
                    last_beat = time.monotonic()
            except Exception:  # noqa: BLE001 — a broker or store hiccup must not end the coordinator
                log.exception("fleet coordinator step failed")
            self._stop.wait(self.poll_s)

    def _step(self, beat: bool) -> None:
        while len(self._inflight) < self.capacity:
            job = queue.claim(self.id, self._remote)
            if job is None:
                break
            deps = queue.dep_results(job)
            ar = run_job.apply_async(args=[job.model_dump(mode="json"), deps,
                                           carry.referred(job.inputs, deps).model_dump()],
                                     priority=LANE_PRIORITY[job.lane], queue=QUEUE,
                                     time_limit=job.timeout_s + 30)
            self._inflight[job.id] = (job, ar)
        for jid, (job, ar) in list(self._inflight.items()):
            if ar.state == "PROGRESS" and isinstance(ar.info, dict):
                queue.set_progress(jid, job.attempts, str(ar.info.get("message", "")), float(ar.info.get("progress", 0)))
            elif ar.ready():
                del self._inflight[jid]
                if ar.successful():
                    r = ar.result
                    res = r["result"] if r["outcome"] == "succeeded" else None
                    if res is not None:
                        res = {**res, "executed_by": {"host": r["host"], "pid": r["pid"],
                                                      "redelivered": r["redelivered"]}}
                    if self._owns(job):  # its records first: whoever sees the job end finds them
                        carry.unpack(r.get("carried"))
                    queue.finish(jid, job.attempts, self.id, r["outcome"], res, r["error"])
                else:  # the task itself broke (time limit, a lost worker Celery gave up on)
                    queue.finish(jid, job.attempts, self.id, "transient", None, f"celery: {ar.state}: {ar.result}")
                ar.forget()
        if beat:
            queue.reclaim(self.stale_s)
            states = queue.heartbeat(self.id, list(self._inflight))
            for jid, (job, ar) in list(self._inflight.items()):
                if states.get(jid) != ("running", job.attempts, self.id):  # cancelled or given up on
                    ar.revoke(terminate=True)
                    del self._inflight[jid]

    def _owns(self, job: Job) -> bool:
        j = queue.get(job.id)
        return (j.state, j.attempts, j.worker) == ("running", job.attempts, self.id)


__all__ = ["app", "run_job", "Fleet", "LANES"]
