"""The distributed engine for fleets: the same jobs and campaigns, run by Celery workers (Redis broker).

Roles:
- the **coordinator** (`Fleet`, `schedcp worker --engine celery`) sits beside the store, as a local
  pool does: it claims ready jobs (lanes, DAG dependencies, budgets, dedupe: all decided in SQLite,
  which stays the record of what ran), sends each to Celery with the job and its dependencies'
  results, heartbeats it while Celery has it, and writes the outcome back — only if its attempt
  still owns the job, as a pool does. Cancelling a job revokes its task.
- **workers** (`celery -A schedcp_mcp.worker worker`, which registers every job kind, on any machine with a sandbox, each with
  its own $SCHEDCP_HOME) run the job's kind (`kinds.execute`, the same code a local pool runs) and
  return the outcome; they report progress through the task state. The records a job refers to go
  with it, and the records it wrote come back with its outcome (`carry`), so the coordinator's
  store has every report. Kinds that read the store themselves (`Kind.local`: a campaign's join)
  are run by the coordinator, beside the store.

Security (jobs/fleetauth.py): the broker needs a password, and every task body, result, progress
report and control message is sealed with HMAC-SHA256 under the fleet key and checked before it is
parsed (the app's only serializer). A worker runs only a remote kind, as the coordinator sent it
(kind, actor and inputs are inside the sealed order), before the order expires; the coordinator
takes a reply only for the job and attempt it sent, and re-derives the records in it (carry.accept).

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
import uuid
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init
from celery.result import AsyncResult
from kombu.exceptions import ContentDisallowed, DecodeError
from pydantic import BaseModel, ConfigDict, Field

from .. import store
from . import carry, fleetauth, kinds, queue
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
    sealed = fleetauth.SERIALIZER
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        # the only content either side accepts: sealed under the fleet key (plain JSON is refused)
        task_serializer=sealed, result_serializer=sealed, event_serializer=sealed,
        accept_content=[sealed], result_accept_content=[sealed],
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


@worker_init.connect
def _refuse_without_locks(**_: Any) -> None:
    """A worker starts only on a broker with a password and with the fleet key in hand."""
    try:
        fleetauth.check_broker(broker_url())
        fleetauth.load_key()
    except fleetauth.FleetAuthError as e:
        log.critical("schedcp fleet worker refused to start: %s", e)
        raise SystemExit(2) from None
    if not carry.record_kinds():  # started on this module: it would refuse every real job
        log.critical("schedcp fleet worker refused to start: no job kinds are registered; start it with "
                     "`celery -A schedcp_mcp.worker worker`")
        raise SystemExit(2)


@worker_process_init.connect
def _reap_vms_left_behind(**_: Any) -> None:
    """A (re)started worker process stops the sandbox VMs a SIGKILLed predecessor in this home left
    running (their qemu is in its own session, so killing the worker's group does not reach it), as
    the local pool does when it starts."""
    kinds.reap()


#: how long an order stays good after the coordinator sent it, beyond the job's own time limit
#: (time in the queue): a copy replayed later is refused
ORDER_GRACE_S = 3600.0


class Order(BaseModel):
    """What the coordinator sends a worker for one attempt of a job (sealed by fleetauth)."""
    model_config = ConfigDict(extra="forbid")
    job: Job
    deps: dict[str, Any] = Field({}, description="the results of the jobs it depends on, by job id")
    referred: carry.Bundle = Field(default_factory=carry.Bundle, description="the records it refers to")
    task_id: str
    expires: float = Field(description="epoch seconds: a copy replayed later is refused")


class Progress(BaseModel):
    """A running job's progress, as a worker reports it through the task state."""
    message: str = ""
    progress: float = 0.0


class Reply(BaseModel):
    """What a worker answers for one job: exactly these fields (anything else is refused)."""
    model_config = ConfigDict(extra="forbid")
    job_id: str
    attempt: int
    outcome: str = Field(pattern="^(succeeded|failed|transient)$")
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=20000)
    host: str = Field(max_length=255)
    pid: int
    redelivered: bool
    carried: carry.Bundle


@app.task(name="schedcp.run_job", bind=True)
def run_job(self, order: dict[str, Any]) -> dict[str, Any]:
    """On a worker: one attempt of the job in a sealed order (fleetauth checked its tag before this
    runs), with the records it refers to (`carry`); returns the outcome with every record it wrote
    (never raises: the store decides)."""
    o = Order.model_validate(order)
    j = o.job

    def reply(outcome: str, result=None, error=None, carried=None) -> dict[str, Any]:
        return Reply(job_id=j.id, attempt=j.attempts, outcome=outcome, result=result, error=error,
                     host=socket.gethostname(), pid=os.getpid(),
                     redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
                     carried=carried or carry.Bundle()).model_dump()

    if o.task_id != self.request.id or time.time() > o.expires:
        return reply("failed", error="fleet: a stale or re-addressed order (not run)")
    if j.kind not in kinds.names(local=False):
        return reply("failed", error=f"fleet: kind {j.kind!r} is not run by fleet workers")
    carry.unpack(o.referred)
    ctx = JobContext(j, o.deps, write=lambda m, f: self.update_state(
        state="PROGRESS", meta=Progress(message=m, progress=f).model_dump()))
    with store.capture() as written:
        outcome, result, error = kinds.execute(ctx)
    return reply(outcome or "failed", result, error, carry.with_files(list(written.values())))


class Fleet(Service):
    """The coordinator: a pool whose slots are Celery workers' (`capacity` jobs in flight)."""

    def __init__(self, capacity: int = 4, *, poll_s: float = 0.05, heartbeat_s: float = 1.0,
                 stale_s: float = 30.0):
        self.capacity, self.poll_s, self.heartbeat_s, self.stale_s = capacity, poll_s, heartbeat_s, stale_s
        self.id: str | None = None
        self._inflight: dict[str, tuple[Job, AsyncResult, set[str]]] = {}
        self._pool: Pool | None = None  # runs the kinds that read the store, here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote, self._local = kinds.names(local=False), kinds.names(local=True)

    def start(self) -> "Fleet":
        fleetauth.check_broker(app.conf.broker_url)
        fleetauth.load_key()
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
            sent = carry.referred(job.inputs, deps)
            task_id = f"{job.id}.{job.attempts}.{uuid.uuid4().hex[:8]}"
            order = Order(job=job, deps=deps, referred=sent, task_id=task_id,
                          expires=time.time() + job.timeout_s + ORDER_GRACE_S)
            ar = run_job.apply_async(args=[order.model_dump(mode="json")], task_id=task_id, priority=LANE_PRIORITY[job.lane],
                                     queue=QUEUE, time_limit=job.timeout_s + 30)
            self._inflight[job.id] = (job, ar, {r["id"] for r in sent.records})
        for jid, (job, ar, sent_ids) in list(self._inflight.items()):
            try:
                self._collect(jid, job, ar, sent_ids)
            except (DecodeError, ContentDisallowed, fleetauth.FleetAuthError) as e:
                del self._inflight[jid]
                store.audit("fleet", "fleet_reply_refused", {"job_id": jid, "why": str(e)[:500]})
                queue.finish(jid, job.attempts, self.id, "failed", None,
                             f"fleet: the reply failed authentication, nothing of it was stored: {e}")
                ar.forget()
        if beat:
            queue.reclaim(self.stale_s)
            states = queue.heartbeat(self.id, list(self._inflight))
            for jid, (job, ar, _) in list(self._inflight.items()):
                if states.get(jid) != ("running", job.attempts, self.id):  # cancelled or given up on
                    ar.revoke(terminate=True)
                    del self._inflight[jid]

    def _collect(self, jid: str, job: Job, ar: AsyncResult, sent: set[str]) -> None:
        """Progress of a job in flight, or its reply once it ended: checked, then written."""
        if ar.state == "PROGRESS" and isinstance(ar.info, dict):
            p = Progress.model_validate(ar.info)
            queue.set_progress(jid, job.attempts, p.message[:500], p.progress)
            return
        if not ar.ready():
            return
        del self._inflight[jid]
        if not ar.successful():  # the task itself broke (time limit, a lost worker Celery gave up on)
            queue.finish(jid, job.attempts, self.id, "transient", None, f"celery: {ar.state}: {ar.result}")
            ar.forget()
            return
        try:
            r = Reply.model_validate(ar.result)
            if (r.job_id, r.attempt) != (jid, job.attempts):
                raise carry.Refused(f"a reply for {r.job_id} attempt {r.attempt}, not this job")
            res = r.result if r.outcome == "succeeded" else None
            if res is not None:
                res = {**res, "executed_by": {"host": r.host, "pid": r.pid, "redelivered": r.redelivered}}
            if self._owns(job):  # its records first: whoever sees the job end finds them
                carry.accept(r.carried, job, sent)
            queue.finish(jid, job.attempts, self.id, r.outcome, res, r.error)
        except (ValueError, carry.Refused) as e:  # pydantic's ValidationError is a ValueError
            why = e.message if isinstance(e, carry.Refused) else str(e)[:500]
            store.audit("fleet", "fleet_reply_refused", {"job_id": jid, "why": why})
            queue.finish(jid, job.attempts, self.id, "failed", None,
                         f"fleet: the worker's reply was refused, nothing of it was stored: {why}")
        ar.forget()

    def _owns(self, job: Job) -> bool:
        j = queue.get(job.id)
        return (j.state, j.attempts, j.worker) == ("running", job.attempts, self.id)


__all__ = ["app", "run_job", "Fleet", "LANES"]
