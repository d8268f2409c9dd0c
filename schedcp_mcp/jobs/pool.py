"""The local worker pool and its supervisor loop.

A pool is one process running up to `size` jobs at once, one thread each. Threads, not processes:
a job's heavy work runs in qemu (its own process) and the guest, so the Python side only waits on
sockets and SQLite; threads start in microseconds, share the pool's wake-up on a local submit, and
isolation between pools comes from running more pool processes (`schedcp worker`, the server's
own pool, Celery workers), which share the store safely. Each job boots its own VM, so the pool size
bounds the VMs running at once.

Three loops:
- the dispatcher claims ready jobs (lane order) while a slot is free, and starts a thread for each;
- each job thread runs its kind, then records the outcome (only if its attempt still owns the job);
- the supervisor heartbeats (the pool and its running jobs), stops local work whose job was
  cancelled or given up on elsewhere (and kills its VMs), reclaims jobs of dead pools and jobs past
  their timeout or deadline (`queue.reclaim`), and stops what jobs of dead owners left running
  (orphan qemu processes: `kinds.reap`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from . import kinds, queue
from .kinds import JobContext
from .models import Job

log = logging.getLogger("schedcp.jobs")

VM_MEM_MB = 1536 + 256  # a sandbox VM's RAM plus qemu's own


def default_size() -> int:
    """Sandbox VMs to run at once on this machine: $SCHEDCP_WORKERS, else one per two cores (a TCG
    VM keeps one host core busy and the A/B timing inside it needs the other quiet: measured in
    docs/supervision.md), at least 1, and no more than memory holds."""
    if os.environ.get("SCHEDCP_WORKERS"):
        return max(1, int(os.environ["SCHEDCP_WORKERS"]))
    import psutil

    by_mem = int(psutil.virtual_memory().available / (VM_MEM_MB * 2**20))
    return max(1, min((os.cpu_count() or 1) // 2, by_mem))


class Service:
    """What a pool and the fleet coordinator share: `with` starts and stops it, and
    `serve_forever` blocks until stopped (subclasses set `_stop` and define start/stop)."""

    _stop: threading.Event

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()


class Pool(Service):
    def __init__(self, size: int | None = None, *, poll_s: float = 0.01, heartbeat_s: float = 1.0,
                 stale_s: float = 30.0, kind_names: list[str] | None = None, engine: str = "local",
                 scope: str | None = None):
        """`scope`: run only this job and its children (a CLI command that waits for its own job
        when no worker is running)."""
        self.size = size or default_size()
        self.poll_s, self.heartbeat_s, self.stale_s = poll_s, heartbeat_s, stale_s
        self.kind_names = kind_names
        self.engine = engine
        self.scope = scope
        self.id: str | None = None
        self._running: dict[str, tuple[Job, JobContext]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Pool":
        self.id = queue.register_worker(self.engine, self.size, self.scope, self.kind_names)
        kinds.reap()
        queue.reclaim(self.stale_s)
        queue._wakeups.append(self._wake)
        for name, fn in (("dispatch", self._dispatch), ("supervise", self._supervise)):
            t = threading.Thread(target=fn, name=f"schedcp-jobs-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, wait_s: float | None = 10.0) -> None:
        """Stop claiming; give running jobs `wait_s` to end (None: as long as they take — a pool
        never abandons a job it claimed unless told to), then cancel what is left locally (their
        jobs go back to the queue through the supervisor of whichever pool runs next)."""
        self._stop.set()
        self._wake.set()
        if self.id:
            queue.drain_worker(self.id)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while self.active and (deadline is None or time.monotonic() < deadline):
            if deadline is None:  # the supervisor loop has stopped: heartbeat here while draining
                self._drain_tick()
            time.sleep(0.05)
        with self._lock:
            left = list(self._running.values())
        for job, ctx in left:
            ctx.cancelled.set()
        if left:
            kinds.release([j.id for j, _ in left])
        for t in self._threads:
            t.join(timeout=5)
        if self._wake in queue._wakeups:
            queue._wakeups.remove(self._wake)
        if self.id:
            queue.stop_worker(self.id)
        if left:
            queue.reclaim(self.stale_s)  # our jobs: their worker is stopped now

    def _drain_tick(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_drain_tick", 0.0) >= self.heartbeat_s:
            self._last_drain_tick = now
            try:
                self.tick()
            except Exception:  # noqa: BLE001
                log.exception("supervisor tick failed")

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._running)

    # ------------------------------------------------------------ loops

    def _dispatch(self) -> None:
        """Claims whenever a slot is free: at once on a local submit or a finished job, else by
        polling the store (every `poll_s` while jobs come, every 0.1 s after 10 s without any)."""
        last_claim = time.monotonic()
        while not self._stop.is_set():
            try:
                while self.active < self.size and not self._stop.is_set():
                    job = queue.claim(self.id, self.kind_names, scope=self.scope)
                    if job is None:
                        break
                    last_claim = time.monotonic()
                    self._launch(job)
            except Exception:  # noqa: BLE001 — a busy or broken store must not end the pool
                log.exception("claiming jobs failed")
            idle = time.monotonic() - last_claim > 10
            self._wake.wait(max(self.poll_s, 0.1) if idle else self.poll_s)
            self._wake.clear()

    def _launch(self, job: Job) -> None:
        ctx = JobContext(job, queue.dep_results(job),
                         write=lambda m, f: queue.set_progress(job.id, job.attempts, m, f))
        with self._lock:
            self._running[job.id] = (job, ctx)
        t = threading.Thread(target=self._run, args=(job, ctx), name=f"schedcp-job-{job.id}", daemon=True)
        t.start()

    def _run(self, job: Job, ctx: JobContext) -> None:
        outcome, result, error = kinds.execute(ctx)
        try:
            if outcome and not ctx.cancelled.is_set():
                queue.finish(job.id, job.attempts, self.id, outcome, result, error)
        except Exception:  # noqa: BLE001
            log.exception("recording job %s failed (the supervisor will retry it)", job.id)
        finally:
            kinds.release([job.id])  # anything the kind left running
            with self._lock:
                self._running.pop(job.id, None)
            self._wake.set()

    def _supervise(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001
                log.exception("supervisor tick failed")

    def tick(self) -> None:
        """One supervisor pass (also callable directly)."""
        queue.reclaim(self.stale_s)
        with self._lock:
            mine = dict(self._running)
        states = queue.heartbeat(self.id, mine)
        lost = [jid for jid, (job, _) in mine.items()
                if states.get(jid) != ("running", job.attempts, self.id)]
        for jid in lost:
            mine[jid][1].cancelled.set()
        if lost:
            kinds.release(lost)
        kinds.reap()


def run_to_end(job_id: str, progress: Callable[[str, float], None] | None = None,
               timeout_s: float | None = None, cancel_on_interrupt: bool = True,
               recheck_s: float = 1.0) -> Job:
    """Wait for a job as a synchronous command does, making sure someone runs it: while it waits
    (every `recheck_s`, not once) it asks the store whether a live pool can take what is left of the
    job (queue.runner_for); when none can — no `schedcp worker`, no server, only other commands'
    pools scoped to their own jobs, or the pool it counted on died or began to stop — it starts a
    pool here for this job and its children. That pool finishes every job it claimed before the
    command returns. Ctrl-C (or SIGTERM) cancels the job, unless the caller only follows a job it
    did not start."""
    import signal

    pool: Pool | None = None
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def on_term(*_):
            raise KeyboardInterrupt
        old_term = signal.signal(signal.SIGTERM, on_term)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_check = 0.0
    interrupted = False

    def check(job: Job) -> None:
        nonlocal pool, next_check
        if pool is not None or job.done or time.monotonic() < next_check:
            return
        next_check = time.monotonic() + recheck_s
        if queue.runner_for(job_id) is None:
            log.info("no pool can run %s: starting one here", job_id)
            pool = Pool(scope=job_id).start()

    try:
        if cancel_on_interrupt:
            queue.set_waiter(job_id)
        return queue.wait(job_id, timeout_s, progress, on_poll=check)
    except KeyboardInterrupt:
        interrupted = True
        if cancel_on_interrupt:
            queue.cancel(job_id, actor="interrupted caller")
        raise
    finally:
        if pool is not None:
            # finish what it claimed (children included); when interrupted, what was cancelled
            # stops at once and the rest goes back to the queue
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            pool.stop(wait_s=10.0 if interrupted else left)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
