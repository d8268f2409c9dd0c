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
  their timeout or deadline (`queue.reclaim`), and stops orphan qemu processes of dead owners.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from ..sandbox import vm as vmmod
from . import kinds, queue
from .kinds import JobContext
from .models import Job

log = logging.getLogger("schedcp.jobs")

VM_MEM_MB = 1536 + 256  # a sandbox VM's RAM plus qemu's own


def default_size() -> int:
    """Sandbox VMs to run at once on this machine: $SCHEDCP_WORKERS, else one per two cores (a TCG
    VM keeps one host core busy and the A/B timing inside it needs the other quiet: measured in
    README § Supervision), at least 1, and no more than memory holds."""
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
        self.id = queue.register_worker(self.engine, self.size)
        vmmod.reap_orphans()
        queue.reclaim(self.stale_s)
        queue._wakeups.append(self._wake)
        for name, fn in (("dispatch", self._dispatch), ("supervise", self._supervise)):
            t = threading.Thread(target=fn, name=f"schedcp-jobs-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop claiming; give running jobs `wait_s` to end, then cancel what is left locally (their
        jobs go back to the queue through the supervisor of whichever pool runs next)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + wait_s
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._running.values())
        for job, ctx in left:
            ctx.cancelled.set()
        if left:
            vmmod.kill_job_vms([j.id for j, _ in left])
        for t in self._threads:
            t.join(timeout=5)
        if self._wake in queue._wakeups:
            queue._wakeups.remove(self._wake)
        if self.id:
            queue.stop_worker(self.id)
        if left:
            queue.reclaim(self.stale_s)  # our jobs: their worker is stopped now

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
            vmmod.kill_job_vms([job.id])  # anything the kind left running
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
            vmmod.kill_job_vms(lost)
        vmmod.reap_orphans()


def run_to_end(job_id: str, progress: Callable[[str, float], None] | None = None,
               timeout_s: float | None = None, cancel_on_interrupt: bool = True) -> Job:
    """Wait for a job as a synchronous command does. When no pool is alive to run it (no `schedcp
    worker`, no server), run one here for this job and its children only. Ctrl-C cancels the job
    (unless the caller only follows a job it did not start)."""
    try:
        if any(w.alive for w in queue.list_workers(0)):
            return queue.wait(job_id, timeout_s, progress)
        with Pool(scope=job_id):
            return queue.wait(job_id, timeout_s, progress)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            queue.cancel(job_id, actor="interrupted caller")
        raise
