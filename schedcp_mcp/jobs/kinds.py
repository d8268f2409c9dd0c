"""Job kinds: what a job of each kind does, its content key (dedupe) and its limits.

A kind's `run(ctx)` gets a `JobContext` (its typed request, the results of the jobs it depends on,
progress that also notices cancellation) and returns its typed result (or a JSON-able dict). A kind
with a `request` model is queued with one (`queue.submit` checks a dict against it and stores the
model's JSON) and its run reads `ctx.request`, parsed by the same model: the queue's row is the
request, whatever hop it crossed. This layer is infrastructure: it
knows no domain module. The modules that own the work register their kinds (`candidates`: verify,
validate; `jobs.campaigns`: campaign; `synth.tune`: tune; `bench.runs`: the sandbox benchmarks)
when they are imported, and the processes that run jobs import them at startup
(`schedcp_mcp.worker`: the CLI, the server, fleet workers). The sandbox registers what a job's
work leaves running (its VMs) the same way (`on_release`). The trivial kinds here (`noop`,
`sleep`, `flaky`) are real jobs for the supervisor's own tests and `schedcp bench jobs`: they go
through the same store, pools and engines as a validation.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError

from ..errors import BadInput, SchedcpError, TransientError

#: the input key under which a campaign's node keeps its name (beside the kind's request)
NODE = "node"


class JobCancelled(Exception):
    """Raised inside a job's work when the job was cancelled or given up on: stop, record nothing."""


class JobContext:
    """What a running job sees: its typed `request`, its dependencies' results, and `progress()`, the
    library's progress(message, fraction) callback: it is written to the store (throttled) and raises
    JobCancelled once the job is cancelled."""

    def __init__(self, job, dep_results: dict[str, Any] | None = None,
                 write: Callable[[str, float], None] | None = None):
        self.job = job
        self.dep_results = dep_results or {}
        self._request: Any = None
        self.cancelled = threading.Event()
        self._write = write
        self._last = 0.0

    @property
    def request(self) -> Any:
        """The job's request, parsed by its kind's model (the inputs as stored, for a kind without one)."""
        if self._request is None:
            self._request = get(self.job.kind).parse(self.job.inputs)
        return self._request

    def dep_result(self, model: type[BaseModel]) -> list[Any]:
        """The results of the jobs this one depends on that succeeded, each parsed by `model`."""
        return [model.model_validate(r) for r in self.dep_results.values() if r]

    def progress(self, message: str, fraction: float = 0.0) -> None:
        self.check()
        now = time.monotonic()
        if self._write and (now - self._last > 0.25 or fraction >= 1.0):
            self._last = now
            self._write(message, fraction)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.job.id)

    def sleep(self, seconds: float) -> None:
        if self.cancelled.wait(seconds):
            raise JobCancelled(self.job.id)


@dataclass
class Kind:
    name: str
    run: Callable[[JobContext], Any]
    key: Callable[[Any], str | None] | None = None  # of the typed request (content key: dedupe)
    timeout_s: float = 1800.0
    max_attempts: int = 3
    sandbox: bool = False  # boots VMs (counts against a pool's VM slots)
    local: bool = False  # reads the store itself (a campaign's join): a fleet's coordinator runs it
    #: the prefixes of the record ids the coordinator gives each job of this kind (`rep-<job>`): a
    #: fleet worker's reply may create no other new record (jobs.carry)
    issues_ids: tuple[str, ...] = ()
    request: type[BaseModel] | None = None  # what a job of this kind is asked (its stored inputs)

    def parse(self, inputs: BaseModel | dict[str, Any]) -> Any:
        """The request as this kind's model (a dict for a kind without one); a wrong one is a BadInput."""
        if self.request is None:
            return inputs.model_dump(mode="json") if isinstance(inputs, BaseModel) else dict(inputs)
        if isinstance(inputs, self.request):
            return inputs
        try:
            data = inputs.model_dump(mode="json") if isinstance(inputs, BaseModel) else inputs
            return self.request.model_validate(data)
        except ValidationError as e:
            raise BadInput(f"not a {self.name} request: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}",
                           f"see {self.request.__name__}") from None


_KINDS: dict[str, Kind] = {}

#: the job the work in this context belongs to (set while a kind runs): what the work starts (a
#: sandbox VM) is tagged with it, so that cancelling the job stops it, from any process on this host
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("schedcp_job", default=None)

#: what stops the things jobs left running (the sandbox's VMs): `release(job_ids)` when jobs end or
#: are cancelled, `reap()` for those whose owner process is gone
_RELEASE: list[Callable[[list[str]], int]] = []
_REAP: list[Callable[[], int]] = []


def on_release(release: Callable[[list[str]], int], reap: Callable[[], int]) -> None:
    """Register what stops a job's leftovers (the sandbox registers its VMs' on import)."""
    if release not in _RELEASE:
        _RELEASE.append(release)
    if reap not in _REAP:
        _REAP.append(reap)


def release(job_ids: list[str]) -> int:
    """Stop what these jobs left running (a cancelled, abandoned or finished job's VMs). How many."""
    return sum(fn(list(job_ids)) for fn in _RELEASE) if job_ids else 0


def reap() -> int:
    """Stop what jobs of dead processes left running. How many."""
    return sum(fn() for fn in _REAP)


def register(name: str, **kw) -> Callable[[Callable], Callable]:
    def deco(fn: Callable[[JobContext], Any]) -> Callable:
        _KINDS[name] = Kind(name=name, run=fn, **kw)
        return fn
    return deco


def get(name: str) -> Kind:
    if name not in _KINDS:
        raise BadInput(f"unknown job kind {name!r}", f"known kinds: {', '.join(sorted(_KINDS))} (a process "
                       "that runs jobs imports schedcp_mcp.worker, which registers the rest)")
    return _KINDS[name]


def execute(ctx: JobContext) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """Run a job's kind: (outcome, result, error), the outcome being succeeded, transient (worth a
    retry), failed (final), or None when the job was cancelled. One place classifies failures, for
    the local pool and the fleet's workers alike."""
    token = current_job.set(ctx.job.id)
    try:
        out = get(ctx.job.kind).run(ctx)
        return "succeeded", out.model_dump(mode="json") if isinstance(out, BaseModel) else out, None
    except JobCancelled:
        return None, None, None
    except TransientError as e:
        return "transient", None, str(e)
    except SchedcpError as e:  # bad input, a machine that cannot do it: final
        return "failed", None, f"{type(e).__name__}: {e.message}" + (f"\nhint: {e.hint}" if e.hint else "")
    except Exception as e:  # noqa: BLE001 — a bug in a kind: final, logged
        import logging

        logging.getLogger("schedcp.jobs").exception("job %s (%s) failed", ctx.job.id, ctx.job.kind)
        return "failed", None, f"internal error: {type(e).__name__}: {e}"
    finally:
        current_job.reset(token)


def names(local: bool | None = None) -> list[str]:
    """The kinds' names (`local`: only those that must run beside the store, or only the others)."""
    return sorted(n for n, k in _KINDS.items() if local is None or k.local == local)


# --- trivial kinds: the supervisor's own tests and benchmark ----------------------------------------

class TrivialRequest(BaseModel):
    """What the trivial kinds are asked (each reads its own fields)."""
    marker_dir: str | None = Field(None, description="leave <dir>/<job>.<attempt>.<pid> behind")
    echo: Any = None
    seconds: float = 1.0
    key: str | None = Field(None, description="sleep: two jobs with one key are identical")
    final: bool = Field(False, description="flaky: fail for good")
    succeed_on: int = Field(10**9, description="flaky: the attempt that succeeds")


def _marker(ctx: JobContext) -> None:
    """Leave `<dir>/<job>.<attempt>.<pid>` so a test can see who ran which attempt."""
    d = ctx.request.marker_dir
    if d:  # a new file in that very directory: never through a symlink (of the file or the directory)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.close(os.open(f"{ctx.job.id}.{ctx.job.attempts}.{os.getpid()}",
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd))
        finally:
            os.close(dfd)


@register("noop", timeout_s=60, max_attempts=1, request=TrivialRequest)
def _noop(ctx: JobContext) -> dict[str, Any]:
    """Nothing: the supervisor's own overhead. Echoes its input and its dependencies' results."""
    _marker(ctx)
    return {"echo": ctx.request.echo, "deps": ctx.dep_results, "pid": os.getpid(),
            "started_at": ctx.job.started_at}


@register("sleep", timeout_s=300, max_attempts=3, request=TrivialRequest,
          key=lambda r: f"sleep:{r.key}" if r.key else None)
def _sleep(ctx: JobContext) -> dict[str, Any]:
    """Sleep `seconds` (cancellable), in progress steps; `key` makes two such jobs identical."""
    _marker(ctx)
    seconds = ctx.request.seconds
    steps = max(1, int(seconds / 0.1))
    for i in range(steps):
        ctx.progress(f"slept {i * seconds / steps:.1f} of {seconds:g} s", i / steps)
        ctx.sleep(seconds / steps)
    return {"slept_s": seconds, "pid": os.getpid()}


@register("flaky", timeout_s=60, max_attempts=3, request=TrivialRequest)
def _flaky(ctx: JobContext) -> dict[str, Any]:
    """Fail transiently (as a VM that does not boot) until attempt `succeed_on`; `final` fails for good."""
    _marker(ctx)
    if ctx.request.final:
        raise BadInput("this job's input is wrong (a final failure: not retried)")
    if ctx.job.attempts < ctx.request.succeed_on:
        raise TransientError(f"simulated infrastructure failure on attempt {ctx.job.attempts}")
    return {"attempt": ctx.job.attempts}
