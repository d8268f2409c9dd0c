"""The `schedcp` command: a thin click layer over the library. Every command has `--json`.

Exit codes: 0 success, 1 the thing checked said no (rejected, failed validation), 2 usage or
infrastructure error.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from rich.text import Text

from .errors import SchedcpError


class Table(RichTable):
    """A table that never cuts a cell: ids, reasons and metric names wrap instead of ending in '…'."""

    def add_column(self, *args, **kw) -> None:
        kw.setdefault("overflow", "fold")
        super().add_column(*args, **kw)


def _cell_text(cell: Any) -> str:
    if isinstance(cell, str):
        text = Text.from_markup(cell).plain
    elif isinstance(cell, Text):
        text = cell.plain
    else:
        c = Console(width=10_000, record=True, file=open(os.devnull, "w"))
        c.print(cell)
        text = c.export_text()
    return " / ".join(x.strip() for x in text.strip().splitlines() if x.strip())


def plain_lines(table: RichTable) -> list[str]:
    """A table as lines a pipe, a log or grep can use whole: a '# title' line, the header, one line
    per row, cells separated by a tab, nothing cut."""
    cols = table.columns
    out = [f"# {_cell_text(table.title)}"] if table.title else []
    out.append("\t".join(_cell_text(c.header) for c in cols))
    for i in range(table.row_count):
        out.append("\t".join(_cell_text(c._cells[i]) if i < len(c._cells) else "" for c in cols))
    return out


class CliConsole(Console):
    """stdout: on a terminal tables wrap long cells (never '…'); elsewhere (a pipe, a CI log, an
    80-column capture) every table is printed as plain tab-separated lines, whole, and long lines
    are not wrapped at 80 columns either (soft wrap: a reason or an id stays on its line)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        if not self.is_terminal:
            self.soft_wrap = True

    def print(self, *objects: Any, **kw) -> None:  # noqa: A003 - rich's name
        if not any(isinstance(o, RichTable) for o in objects):
            return super().print(*objects, **kw)
        for o in objects:
            if not isinstance(o, RichTable):
                super().print(o, **kw)
            elif self.is_terminal:
                for c in o.columns:
                    if c.overflow == "ellipsis" and not c.no_wrap:
                        c.overflow = "fold"
                super().print(o, **kw)
            else:
                for line in plain_lines(o):
                    self.file.write(line + "\n")
                self.file.flush()


console = CliConsole()
err_console = Console(stderr=True)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            click.echo(data.model_dump_json(indent=2))
        else:
            click.echo(json.dumps(_plain(data), indent=2, default=str))
    else:
        render(data)


def _plain(x: Any) -> Any:
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    if isinstance(x, (list, tuple)):
        return [_plain(i) for i in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[str, float], None]]:
    """A rich progress bar on stderr; yields progress(message, fraction) — the library's
    progress-callback convention."""
    if not enabled or not sys.stderr.isatty():
        yield lambda message, fraction=0.0: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=1.0)

        def update(message: str, fraction: float = 0.0) -> None:
            bar.update(task, completed=max(0.0, min(1.0, fraction)),
                       description=f"{description}: {message}" if message else description)

        yield update


class SchedcpGroup(click.Group):
    """Report SchedcpError as a clean message with its hint, exit 2 (under --json: as JSON on
    stdout, `{"error": {"kind", "message", "hint"}}`, so a script always gets JSON)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SchedcpError as e:
            self._fail(ctx, type(e).__name__, e.message, e.hint)
        except click.ClickException as e:
            if not ctx.meta.get(JSON_META):
                raise
            self._fail(ctx, "UsageError", e.format_message(), "see --help")
        except (click.exceptions.Exit, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # `schedcp jobs | head`: the reader has what it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
            sys.exit(0)
        except ValidationError as e:  # a typed request refused its values: the input, not a bug
            self._fail(ctx, "BadInput", "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or 'input'}: {err['msg']}" for err in e.errors()),
                "see --help for each option's range")
        except Exception as e:  # a bug: say so plainly; SCHEDCP_DEBUG=1 shows the traceback
            if os.environ.get("SCHEDCP_DEBUG"):
                raise
            self._fail(ctx, "InternalError", f"{type(e).__name__}: {e}",
                       "this is a schedcp bug; rerun with SCHEDCP_DEBUG=1 for the traceback")

    @staticmethod
    def _fail(ctx: click.Context, kind: str, message: str, hint: str | None) -> None:
        if ctx.meta.get(JSON_META):
            click.echo(json.dumps({"error": {"kind": kind, "message": message, "hint": hint}}, indent=2))
        else:
            label = "internal error" if kind == "InternalError" else "error"
            err_console.print(f"[red]{label}:[/red] {escape(message)}")
            if hint:
                err_console.print(f"[yellow]hint:[/yellow] {escape(hint)}")
        sys.exit(2)


JSON_META = "schedcp.json"  # set in the shared context meta when a command got --json

# Value types shared by the options that take the same kind of value: a bad value is refused by
# click before anything is imported, queued or booted (exit 2, in well under a second). The same
# limits are checked again for MCP callers by the library (candidates.check_layer2_request).
ROUNDS = click.IntRange(1, 30)                      # validate.runner.MAX_ROUNDS
VALIDATION_BUDGET = click.FloatRange(0, 3600)       # candidates.MAX_BUDGET_S; 0 = exactly --rounds
SECONDS = click.FloatRange(0, min_open=True)        # a duration that must be > 0
COUNT = click.IntRange(1)                           # a limit or count of at least one


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                           help="machine-readable JSON output")


@click.group(cls=SchedcpGroup)
@click.version_option(package_name="schedcp")
def main() -> None:
    """schedcp: observe a workload, find or write a sched_ext scheduler for it, prove it safe and
    better in a sandbox VM, deploy it with a token, and learn from the outcome."""
    _unwind_on_sigterm()


def _unwind_on_sigterm() -> None:
    """SIGTERM (a `kill`, a CI timeout, systemd) unwinds like an exit: `with VM()` blocks close their
    VMs and a pool releases its jobs. Python's default is to vanish at once, which left the
    command's qemu running with nobody to stop it. A command that sets its own handler keeps it."""
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


# --- serve -----------------------------------------------------------------------------------------

def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


from .access import is_loopback  # noqa: E402 — re-exported: `cli.is_loopback` is what tests use


@main.command()
@click.option("--http", "http", metavar="HOST:PORT", help="serve streamable HTTP instead of stdio")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="file holding the bearer token HTTP clients must send")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="HTTPS certificate (PEM)")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="HTTPS private key (PEM)")
@click.option("--insecure-plain-http", is_flag=True,
              help="DANGEROUS: serve plain HTTP on a non-loopback address (the bearer token crosses the "
              "network in clear)")
@click.option("--allow-host-deploy", is_flag=True,
              help="let MCP clients deploy to this host's kernel (still only with a valid token)")
@click.option("--allow-host-verify", is_flag=True,
              help="let MCP clients run layer 1 against this host's kernel (load only, never attached)")
@click.option("--allow-command", is_flag=True,
              help="let MCP clients run any command on this host (profile_workload, host deploy "
              "metric/workload commands) as this user; default: only the sandbox workloads' commands")
@click.option("--allow-command-prefix", "command_prefixes", multiple=True, metavar="'PROG ARGS'",
              help="let MCP clients run commands starting with these exact words (repeatable)")
@click.option("--allow-exact-command", "exact_commands", multiple=True, metavar="'PROG ARGS'",
              help="let MCP clients run exactly this command, no other arguments (repeatable)")
def serve(http: str | None, token_file: Path | None, tls_cert: str | None, tls_key: str | None,
          insecure_plain_http: bool, allow_host_deploy: bool,
          allow_host_verify: bool, allow_command: bool, command_prefixes: tuple[str, ...],
          exact_commands: tuple[str, ...]) -> None:
    """Run the MCP server (stdio by default, for `claude mcp add schedcp -- schedcp serve`).
    Over HTTP every request needs the bearer token (loopback too): from --token-file, or generated
    once into $SCHEDCP_HOME/http-token."""
    from . import access

    if allow_host_deploy:
        os.environ["SCHEDCP_ALLOW_HOST_DEPLOY"] = "1"
    if allow_host_verify:
        os.environ["SCHEDCP_ALLOW_HOST_VERIFY"] = "1"
    from .workloads import host_commands

    access.set_policy(allow_command, list(command_prefixes),
                      host_commands() + [access.argv(c, "--allow-exact-command") for c in exact_commands])

    if http is None:
        from . import server

        server.run_stdio()
        return
    host, port = parse_host_port(http)
    if not is_loopback(host) and not token_file:
        raise SchedcpError(f"refusing to serve on non-loopback address {host} without a token",
                           "pass --token-file FILE (clients send 'Authorization: Bearer <token>') "
                           "or bind 127.0.0.1")
    if bool(tls_cert) != bool(tls_key):
        raise SchedcpError("give both --tls-cert and --tls-key", "or neither, on loopback")
    if not is_loopback(host) and not tls_cert:
        if not insecure_plain_http:
            raise SchedcpError(f"refusing plain HTTP on non-loopback address {host}: the bearer token "
                               "would cross the network in clear",
                               "pass --tls-cert FILE --tls-key FILE, or bind 127.0.0.1 (an SSH tunnel "
                               "reaches it), or accept the risk with --insecure-plain-http")
        err_console.print(f"[bold red]WARNING: plain HTTP on {host}: anyone on the network path can read "
                          "the bearer token and every request (--insecure-plain-http)[/bold red]")
    if token_file:
        token, where = access.read_token_file(token_file), token_file
    else:
        token, where = access.generated_token()
    scheme = "https" if tls_cert else "http"
    err_console.print(f"schedcp MCP server on {scheme}://{host}:{port}/mcp (clients send "
                      f"'Authorization: Bearer <token>'; the token is in {where})")
    from . import server  # after the refusals above: importing the MCP library takes a second or more

    server.run_http(host, port, token, tls=(tls_cert, tls_key) if tls_cert else None)


# --- supervisor: worker pool and jobs ---------------------------------------------------------------

background_option = click.option("--background", is_flag=True,
                                 help="queue it, print the job id and return (see `schedcp jobs`)")
deadline_option = click.option("--deadline", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
                               help="complete by this many seconds from now; a job past it is "
                                    "dead-lettered and its VMs are stopped")


def _lane(background: bool) -> str:
    """Someone waiting at a terminal comes before work queued for later."""
    return "normal" if background else "high"


def run_to_end(job_id: str, progress):
    from . import worker  # noqa: F401 — a pool started here runs any kind (children included)
    from .jobs.pool import run_to_end as run

    return run(job_id, progress)


def queue_result(job) -> dict:
    from .jobs.queue import result_or_raise

    return result_or_raise(job)


def queue_detail(job_id: str):
    from .jobs.queue import detail

    return detail(job_id)


def queued(job, as_json: bool) -> None:
    from .jobs.queue import list_workers

    hint = None if any(w.alive for w in list_workers(0)) else \
        "no worker is running: start one with `schedcp worker` (or `schedcp serve`)"
    emit({"job_id": job.id, "state": job.state, "hint": hint}, as_json, lambda d: (
        click.echo(job.id), err_console.print(f"queued: `schedcp jobs wait {job.id}` follows it"
                                              + (f"; {hint}" if hint else ""))))

@main.command()
@click.option("--size", type=click.IntRange(1, 64), help="jobs at once (default: from the machine; "
              "with --engine celery: jobs in flight on the fleet)")
@click.option("--engine", type=click.Choice(["local", "celery"]), default="local", show_default=True,
              help="local: run jobs here; celery: hand them to Celery workers ($SCHEDCP_BROKER)")
@json_option
def worker(size: int | None, engine: str, as_json: bool) -> None:
    """Run the job worker pool in the foreground (Ctrl-C / SIGTERM stops it; its running jobs go
    back to the queue). With --engine celery it is the fleet's coordinator; the workers are
    `celery -A schedcp_mcp.worker worker` on the sandbox machines."""
    import signal

    from . import worker as _kinds  # noqa: F401 — every job kind, registered

    def on_term(*_):
        raise KeyboardInterrupt

    if engine == "celery":
        from .jobs import fleetauth
        from .jobs.fleet import Fleet

        key = fleetauth.ensure_key()
        err_console.print(f"fleet key: {key} (copy it, mode 600, to each worker; {fleetauth.KEY_ENV} points there)")
        pool = Fleet(size or 4).start()
        pool.size = pool.capacity
    else:
        from .jobs.pool import Pool

        pool = Pool(size).start()
    signal.signal(signal.SIGTERM, on_term)
    if as_json:
        click.echo(json.dumps({"worker": pool.id, "size": pool.size}), nl=True)
    else:
        err_console.print(f"schedcp worker {pool.id}: {pool.size} slot(s); Ctrl-C stops")
    sys.stdout.flush()
    try:
        pool.serve_forever()
    except KeyboardInterrupt:
        pass


def _ago(t: float | None) -> str:
    import time as _t

    if not t:
        return "-"
    d = _t.time() - t
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.0f}h ago"


OUTCOME_COLOURS = {"accepted": "green", "passed": "green", "done": "green", "rejected": "red",
                   "failed": "red", "error": "red", "cancelled": "yellow"}


def render_jobs(js) -> None:
    """State (did the job run to its end) and outcome (what it concluded) side by side: a verify
    that ran fine and was rejected reads `succeeded  rejected`, never a green 'succeeded' alone."""
    if not js:
        console.print("no jobs")
        return
    t = Table("id", "kind", "lane", "state", "outcome", "try", "progress", "created", "why / message")
    colours = {"succeeded": "white", "failed": "red", "dead": "red", "cancelled": "yellow",
               "running": "cyan", "pending": "white"}
    for j in js:
        o = j.outcome
        t.add_row(j.id, j.kind, j.lane, f"[{colours[j.state]}]{j.state}[/]",
                  f"[{OUTCOME_COLOURS.get(o, 'white')}]{o}[/]" if o else "-",
                  f"{j.attempts}/{j.max_attempts}", f"{j.progress:.0%}", _ago(j.created_at),
                  escape(j.outcome_reason or j.error or j.message or ""))
    console.print(t)


def render_job_detail(d) -> None:
    j = d.job
    o = j.outcome
    console.print(f"[bold]{j.id}[/bold] {j.kind} ({j.lane}) {j.state}"
                  + (f" — [{OUTCOME_COLOURS.get(o, 'white')}]{o}[/]" if o and o != j.state else "")
                  + (f": {escape(j.outcome_reason)}" if j.outcome_reason and j.outcome_reason != j.error else "")
                  + f", attempt {j.attempts}/{j.max_attempts}"
                  + (f", answered from {j.cached_from}" if j.cached_from else "")
                  + (f", parent {j.parent}" if j.parent else ""))
    console.print(f"  inputs: {escape(json.dumps(j.inputs)[:300])}")
    if j.deps:
        console.print(f"  depends on: {', '.join(j.deps)}")
    if j.budget:
        console.print(f"  budget: {j.budget.model_dump(exclude_none=True)}")
    if j.message:
        console.print(f"  {escape(j.message)} ({j.progress:.0%})")
    if j.error:
        console.print(f"  [red]error:[/red] {escape(j.error)}")
    if j.result is not None:
        from .bench.runs import without_printed

        console.print(f"  result: {escape(json.dumps(without_printed(j.result))[:600])}")
    for a in d.attempts:
        console.print(f"  attempt {a.attempt} on {a.worker}: {a.outcome or 'running'}"
                      + (f" — {escape(a.error)}" if a.error else ""))
    if d.children:
        render_jobs(d.children)
    printed = next((x.result for x in [j, *d.children] if (x.result or {}).get("printed")), None)
    if printed:  # a benchmark's tables, as the command printed them
        from .bench.runs import show

        show(printed, console)


@main.group(invoke_without_command=True)
@click.option("--state", type=click.Choice(["pending", "running", "succeeded", "failed", "cancelled", "dead"]))
@click.option("--kind", help="only jobs of this kind")
@click.option("--all", "all_", is_flag=True, help="campaign children too (default: top-level jobs)")
@click.option("--limit", default=30, show_default=True, type=COUNT)
@json_option
@click.pass_context
def jobs(ctx: click.Context, state: str | None, kind: str | None, all_: bool, limit: int,
         as_json: bool) -> None:
    """The supervisor's jobs, newest first (subcommands: show, cancel, wait)."""
    from . import worker  # noqa: F401 — cancel stops a job's VMs; wait may run any kind here

    if ctx.invoked_subcommand is not None:
        return
    from .jobs import queue

    emit(queue.list_jobs(state=state, kind=kind, top_level=not all_, limit=limit), as_json, render_jobs)


@jobs.command("show")
@click.argument("job_id")
@json_option
def jobs_show(job_id: str, as_json: bool) -> None:
    """One job: inputs, state, attempts, result or error, children."""
    from .jobs import queue

    emit(queue.detail(job_id), as_json, render_job_detail)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
def jobs_cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job and its subtree (running VMs are stopped)."""
    from .jobs import queue

    ids = queue.cancel(job_id, actor="cli")
    emit({"cancelled": ids}, as_json, lambda d: console.print(
        f"cancelled {len(ids)} job(s): {', '.join(ids)}" if ids else f"{job_id} had already ended"))


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=SECONDS, help="give up waiting after this many seconds")
@json_option
def jobs_wait(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end, with its progress (running it here when no worker is). Exit 0
    succeeded, 1 otherwise. Ctrl-C stops waiting, not the job."""
    from .jobs import queue
    from .jobs.pool import run_to_end as run

    queue.get(job_id)
    with progress_bar(f"job {job_id}", not as_json) as bar:
        j = run(job_id, bar, timeout, cancel_on_interrupt=False)
    emit(queue.detail(job_id), as_json, render_job_detail)
    sys.exit(0 if j.state == "succeeded" else 1)


# --- observe ----------------------------------------------------------------------------------------

@main.command()
@json_option
def info(as_json: bool) -> None:
    """System info: topology, kernel and sched_ext facts, usable tools."""
    from .observe.system import get_system_info

    def render(s):
        t = s.topology
        console.print(f"[bold]{s.hostname}[/bold]  kernel {s.kernel.release}  "
                      f"{t.logical_cpus} CPUs / {t.physical_cores} cores / {t.packages} package(s), "
                      f"{s.memory_gib} GiB")
        console.print(f"SMT groups {t.smt_siblings}  LLC domains {t.llc_domains}  "
                      f"NUMA {t.numa_nodes}")
        x = s.kernel.sched_ext
        console.print(f"sched_ext: {'present, ' + str(x.state) + (', ops ' + x.ops if x.ops else '') if x.present else 'absent'}"
                      f"  BTF: {'yes' if s.kernel.btf else 'no'}  can load BPF schedulers: "
                      f"{'yes' if s.kernel.can_load_bpf else 'no'} ({s.kernel.can_load_bpf_reason})")
        table = Table("tool", "usable", "detail")
        for tool in s.tools:
            table.add_row(tool.name, "[green]yes[/green]" if tool.usable else "[red]no[/red]",
                          tool.detail)
        console.print(table)

    emit(get_system_info(), as_json, render)


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 3600),
              help="sampling interval, seconds")
@json_option
def stats(interval: float, as_json: bool) -> None:
    """CPU and scheduler statistics over one interval."""
    from .observe.cpu import get_cpu_stats

    def render(s):
        load = " ".join(f"{x:.2f}" for x in s.load_avg)
        table = Table("cpu", "busy%", "user", "sys", "iowait", "irq", "steal", "idle",
                      title=f"CPU time over {s.interval_s:.2f} s — load average {load}")
        for c in s.per_cpu:
            table.add_row(str(c.cpu), f"{c.busy:.1f}", f"{c.user:.1f}", f"{c.system:.1f}",
                          f"{c.iowait:.1f}", f"{c.irq + c.softirq:.1f}", f"{c.steal:.1f}",
                          f"{c.idle:.1f}")
        console.print(table)
        console.print(f"ctx switches/s {s.ctx_switches_per_s:.0f}  interrupts/s "
                      f"{s.interrupts_per_s:.0f}  forks/s {s.forks_per_s:.1f}  running "
                      f"{s.procs_running}  blocked {s.procs_blocked}")
        p = s.psi_cpu
        console.print(f"PSI cpu some avg10/60 {p.some_avg10}/{p.some_avg60}" if p.available
                      else f"PSI: {p.reason}")
        console.print("schedstat: " + (f"avg wait per timeslice {s.schedstat.avg_wait_per_timeslice_us} us"
                                       if s.schedstat.available else str(s.schedstat.reason)))
        top = Table("pid", "name", "cpu%", "policy", "nice", "threads", title="top processes")
        for t in s.top_processes:
            top.add_row(str(t.pid), t.name, f"{t.cpu_percent:.1f}", t.policy, str(t.nice),
                        str(t.num_threads))
        console.print(top)

    emit(get_cpu_stats(interval), as_json, render)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--pid", type=click.IntRange(1), help="attach to a running process instead of running CMD")
@click.option("--duration", default=10.0, show_default=True, type=SECONDS, help="max seconds")
@click.option("--no-runqlat", is_flag=True, help="skip the runqlat histogram")
@json_option
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def profile(pid: int | None, duration: float, no_runqlat: bool, as_json: bool, cmd: tuple[str, ...]) -> None:
    """Profile a workload: `schedcp profile -- hackbench -g 4` or `--pid N`."""
    from .observe.profile import profile_workload

    with progress_bar("profiling", not as_json) as bar:
        p = profile_workload(list(cmd) if cmd else None, pid, duration,
                             use_runqlat=not no_runqlat, progress=bar)

    def render(p):
        console.print(f"[bold]{p.id}[/bold]  {p.summary}")
        for g in p.goals:
            console.print(f"  goal: {g.metric} {g.direction}"
                          + (f" (ratio {g.target_ratio})" if g.target_ratio else "") + f" — {g.why}")
        if p.runqlat:
            console.print(f"  run-queue latency p50 ≤ {p.runqlat.p50_us} us, p99 ≤ {p.runqlat.p99_us} us")
        for s in p.sources:
            console.print(f"  source {s.name}: {'used' if s.used else 'not used'} {s.detail}")

    emit(p, as_json, render)


@main.command("profiles")
@click.option("--limit", default=20, show_default=True, type=COUNT)
@json_option
def profiles_cmd(limit: int, as_json: bool) -> None:
    """Stored workload profiles, newest first."""
    from .observe.profile import list_profiles

    def render(ps):
        table = Table("id", "command", "summary")
        for p in ps:
            table.add_row(p.id, " ".join(p.command or [f"pid {p.pid}"])[:40], p.summary[:100])
        console.print(table)

    emit(list_profiles(limit), as_json, render)


# --- policies ---------------------------------------------------------------------------------------

@main.group()
def policies() -> None:
    """The policy repository: list, search, show."""


@policies.command("list")
@json_option
def policies_list(as_json: bool) -> None:
    """Every policy: ours (with source) and the scx catalog."""
    from .repository.policies import list_policies

    def render(ps):
        table = Table("name", "kind", "runnable", "algorithm", "tags")
        for p in ps:
            table.add_row(p.name, p.kind, "yes" if p.runnable else "no", p.algorithm,
                          ", ".join(p.tags))
        console.print(table)

    emit(list_policies(), as_json, render)


@policies.command("search")
@click.argument("query", required=False, default="")
@click.option("--tag", "tags", multiple=True, help="only policies with this tag (repeatable)")
@click.option("--limit", default=10, show_default=True, type=COUNT)
@click.option("--profile", "profile_id", help="also rank by history on profiles similar to this one")
@json_option
def policies_search(query: str, tags: tuple[str, ...], limit: int, profile_id: str | None,
                    as_json: bool) -> None:
    """Search policies by keywords (and history, with --profile)."""
    from .learn import history
    from .repository.policies import search_policies

    scorer = history.scorer_for(profile_id) if profile_id else None
    hits = search_policies(query, list(tags), limit, scorer)

    def render(hs):
        if not hs:
            console.print("no policy matched; try other words, or `schedcp policies list`")
            return
        table = Table("score", "name", "kind", "summary", "why")
        for h in hs:
            table.add_row(f"{h.score:.2f}", h.name, h.kind, h.summary, h.reason)
        console.print(table)

    emit(hits, as_json, render)


@policies.command("show")
@click.argument("name")
@json_option
def policies_show(name: str, as_json: bool) -> None:
    """A policy's metadata, parameters, history and source."""
    from .learn import history
    from .repository.policies import get_policy

    p = get_policy(name)
    data = {"policy": p, "history": history.outcomes_for_policy(name), "source_code": p.source_text()}

    def render(d):
        p = d["policy"]
        console.print(f"[bold]{p.name}[/bold] ({p.kind}) — {p.summary}\n{p.description}")
        console.print(f"algorithm: {p.algorithm}\nuse cases: {'; '.join(p.use_cases)}\n"
                      f"limitations: {'; '.join(p.limitations)}\ntags: {', '.join(p.tags)}")
        if p.parameters:
            t = Table("parameter", "type", "default", "range", "description")
            for q in p.parameters:
                rng = "-" if q.min is None and q.max is None else f"{q.min}..{q.max}"
                t.add_row(q.name, q.type, str(q.default), rng, q.description)
            console.print(t)
        for tu in p.tunables:
            console.print(f"  {tu.flag}: {tu.description}")
        if d["history"]:
            t = Table("outcome", "source", "reward", "goals met", "profile")
            for o in d["history"]:
                t.add_row(o.id, o.source, f"{o.reward:+.3f}", str(o.goals_met), str(o.profile_id))
            console.print(t)

    emit(data, as_json, render)


# --- sandbox ----------------------------------------------------------------------------------------

@main.group()
def sandbox() -> None:
    """The sched_ext sandbox: image build, info, the staging VM."""


@sandbox.command("build")
@click.option("--force", is_flag=True, help="rebuild everything")
@click.option("--refresh", is_flag=True, help="look for a newer sid kernel")
@json_option
def sandbox_build(force: bool, refresh: bool, as_json: bool) -> None:
    """Build (or bring up to date) the sandbox image: sid kernel, toolchain rootfs, guest."""
    from .sandbox import image

    with progress_bar("sandbox build", not as_json) as bar:
        m = image.build(force=force, refresh=refresh, progress=bar)
    emit(m, as_json, lambda m: console.print(
        f"sandbox ready: kernel {m.kernel_version} (sched_ext), clang {m.toolchain.clang}, "
        f"bpftool {m.toolchain.bpftool}, build {m.build_id[:12]}"))


@sandbox.command("info")
@json_option
def sandbox_info(as_json: bool) -> None:
    """The sandbox manifest (kernel, packages, paths, hashes) and the staging VM's state."""
    from .sandbox import image
    from .sandbox.vm import VM

    m = image.load_manifest()
    if m is None:
        raise SchedcpError("the sandbox image is not built", "run `schedcp sandbox build`")
    staging = VM.named_status("staging")
    data = {"manifest": m, "staging_vm": staging}
    emit(data, as_json, lambda d: console.print(
        f"kernel {m.kernel_version}; build {m.build_id[:12]}; built {m.built_at}; "
        f"staging VM: {'running' if staging else 'stopped'}"))


@sandbox.command("stop")
@click.option("--name", default="staging", show_default=True)
def sandbox_stop(name: str) -> None:
    """Stop a long-lived sandbox VM (the staging VM by default)."""
    from .sandbox.vm import VM

    stopped = VM.stop_named(name)
    console.print(f"{name} VM {'stopped' if stopped else 'was not running'}")


# --- peers: the kernel's example scheduler programs -------------------------------------------------

@main.group()
def peers() -> None:
    """The kernel's own example schedulers (tools/sched_ext), built as programs: peers to measure against."""


def _render_peers(m) -> None:
    t = Table("peer", "built", "sha256", "why not", title=f"tools/sched_ext of {m.kernel_version}: "
              f"{len(m.built())} of {len(m.peers)} built ({m.seconds:.0f} s; cache {m.key})")
    for p in m.peers:
        t.add_row(p.name, "yes" if p.built else "[red]no[/red]", (p.sha256 or "")[:12], escape(p.why or ""))
    console.print(t)
    if m.built():
        console.print(f"programs in {Path(m.built()[0].path).parent}; run one in the sandbox: "
                      f"`schedcp verify --program {m.built()[0].name}`")


@peers.command("build")
@click.option("--only", "only", multiple=True, help="build only this one (repeatable), e.g. scx_simple")
@click.option("--force", is_flag=True, help="build again even if the cache has this build")
@json_option
def peers_build(only: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Build the kernel's example schedulers with their own Makefile in the toolchain jail (cached by
    the hash of the inputs). Says which did not build and why. Exit 0 when at least one built."""
    from .sandbox import peers as pe

    with progress_bar("peers build", not as_json) as bar:
        bar("make in the toolchain jail", 0.1)
        m = pe.build(force=force, only=list(only) or None)
    emit(m, as_json, _render_peers)
    sys.exit(0 if m.built() else 1)


@peers.command("list")
@json_option
def peers_list(as_json: bool) -> None:
    """The peers the last build made, and which did not build (why)."""
    from .sandbox import peers as pe

    m = pe.load_manifest()
    if m is None:
        raise SchedcpError("no peers are built yet", "run `schedcp peers build`")
    emit(m, as_json, _render_peers)


# --- layer 1: verify --------------------------------------------------------------------------------

def parse_params(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--param")
        out[k.strip()] = v.strip()
    return out


def render_layer1(r) -> None:
    l1 = r.layer1
    colour = "green" if l1.verdict == "accepted" else "red"
    what = r.policy or 'source'
    if l1.program_args is not None:
        import shlex

        what = f"program {shlex.join([l1.program_name or 'program', *l1.program_args])} (sha256 {l1.object_sha256[:12]})"
    console.print(f"[bold]{r.id}[/bold] {escape(what)}: [{colour}]{l1.verdict}[/{colour}] "
                  f"at stage {l1.stage}; kernel {l1.kernel_version}; "
                  f"{'cached, ' if l1.cached else ''}{l1.total_s:.2f}s")
    if l1.program_args is not None:
        if l1.ops_name:
            console.print(f"  attached: sched_ext enabled with root/ops {escape(l1.ops_name)}")
        for label, text in (("stdout", l1.program_stdout), ("stderr", l1.program_stderr)):
            tail = [ln for ln in text.strip().splitlines() if ln.strip()][-4:]
            if tail:
                console.print(f"  its {label} (end): " + escape(" | ".join(tail))[:600])
    for e in l1.errors:
        where = " ".join(x for x in (e.program, f"line {e.line}" + (f":{e.column}" if e.column else "")
                                     if e.line else None) if x)
        console.print(f"  [red]{e.stage}[/red]{' ' + escape(where) if where else ''}: {escape(e.message)}")
        if e.snippet:
            console.print(f"      {escape(e.snippet.strip())}")
    for w in l1.warnings:
        where = f" line {w.line}" if w.line else ""
        console.print(f"  [yellow]{w.severity}[/yellow] {w.stage}{where}: {escape(w.message)}")
    if l1.missing_kfuncs:
        console.print(f"  missing kfuncs on {l1.kernel_version}: {', '.join(l1.missing_kfuncs)}")
    if l1.programs:
        t = Table("program", "callback", "insns", "verified insns")
        for p in l1.programs:
            t.add_row(p.name, p.callback or "", str(p.insns), str(p.verified_insns or ""))
        console.print(t)


def _one_file(items: tuple[str, ...]) -> Path | None:
    """The FILE argument of verify/validate (arguments after `--` belong to --program only)."""
    if not items:
        return None
    if len(items) > 1:
        raise click.UsageError(f"one FILE only (got {len(items)} arguments); arguments after `--` need --program")
    p = Path(items[0])
    if not p.is_file():
        raise click.BadParameter(f"{items[0]!r} is not a file", param_hint="FILE")
    return p


def layer1_json(r) -> dict:
    d = r.layer1.model_dump(mode="json")
    return {"report_id": r.id, **d}


@main.command()
@click.argument("file_and_args", nargs=-1, metavar="[FILE | -- ARGS...]")
@click.option("--policy", help="verify a repository policy instead of a file")
@click.option("--all-policies", is_flag=True, help="verify every repository policy at its defaults")
@click.option("--program", help="a scheduler program with its own loader (a path, or a built peer's name "
              "like scx_simple); its arguments follow `--`. It runs only in the sandbox guest")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="set a const volatile (or a policy parameter); map:MAP=N sizes a map")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True)
@click.option("-I", "include_dirs", multiple=True, type=click.Path(exists=True, file_okay=False,
              path_type=Path), help="operator-trusted include directory")
@click.option("--no-cache", is_flag=True, help="do not answer from the result cache")
@background_option
@deadline_option
@json_option
def verify(file_and_args: tuple[str, ...], policy: str | None, all_policies: bool, program: str | None,
           params: tuple[str, ...], target: str, include_dirs: tuple[Path, ...], no_cache: bool,
           background: bool, deadline: float | None, as_json: bool) -> None:
    """Layer 1: compile, static checks and the real kernel verifier; for --program, that the program
    attaches in the sandbox (`/sys/kernel/sched_ext/state` enabled, `root/ops` set).
    Exit 0 accepted, 1 rejected, 2 usage/infrastructure error."""
    from . import candidates
    from .reports import get_report
    from .repository.policies import list_policies

    if program:
        if params or include_dirs or target != "sandbox":
            raise click.UsageError("--program takes its arguments after `--`, runs only in the sandbox, and "
                                   "has no --param / -I")
        job = candidates.verify_program_job(program, list(file_and_args), use_cache=not no_cache,
                                            lane=_lane(background), actor="cli", complete_by_s=deadline)
        if background:
            return queued(job, as_json)
        with progress_bar("verify", not as_json) as bar:
            r = candidates.verified_report(run_to_end(job.id, bar))
        if as_json:
            click.echo(json.dumps(layer1_json(r), indent=2))
        else:
            render_layer1(r)
        sys.exit(0 if r.passed_layer1 else 1)
    file = _one_file(file_and_args)
    chosen = sum(bool(x) for x in (file, policy, all_policies))
    if chosen != 1:
        raise click.UsageError("give exactly one of FILE, --policy NAME, --all-policies, --program PATH")
    kv = parse_params(params)
    if all_policies:
        names = [p.name for p in list_policies() if p.kind == "schedcp"]
        from .operations import VerifyRequest

        job = candidates.verify_job(VerifyRequest(policies=names, target=target, use_cache=not no_cache,
                                                  actor="cli"), lane=_lane(background), complete_by_s=deadline)
        if background:
            return queued(job, as_json)
        with progress_bar("verifying policies", not as_json) as bar:
            job = run_to_end(job.id, bar)
        from .operations import VerifyManyResult

        queue_result(job)
        reports = [get_report(x.report_id) for x in job.result_as(VerifyManyResult).reports]
        ok = all(r.passed_layer1 for r in reports)
        if as_json:
            click.echo(json.dumps({"passed": ok, "reports": [layer1_json(r) for r in reports]},
                                  indent=2))
        else:
            for r in reports:
                render_layer1(r)
        sys.exit(0 if ok else 1)
    source = file.read_text(errors="replace") if file else None
    from .operations import VerifyRequest

    req = VerifyRequest(source=source, policy=policy, params=kv, target=target, actor="cli",
                        include_dirs=[str(p.resolve()) for p in include_dirs], use_cache=not no_cache)
    job = candidates.verify_job(req, lane=_lane(background), complete_by_s=deadline)
    if background:
        return queued(job, as_json)
    with progress_bar("verify", not as_json) as bar:
        r = candidates.verified_report(run_to_end(job.id, bar))
    if as_json:
        click.echo(json.dumps(layer1_json(r), indent=2))
    else:
        render_layer1(r)
    sys.exit(0 if r.passed_layer1 else 1)


# --- layer 2: validate ------------------------------------------------------------------------------

def parse_goals(items: tuple[str, ...]):
    """`p99_wakeup_latency_us<=0.9`, `throughput>=0.97`: the form and the ratio (candidate/baseline,
    > 0); whether a chosen workload measures the metric is checked before anything is queued
    (candidates.check_layer2_request)."""
    import re

    from .models import Goal

    goals = []
    for item in items:
        m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(<=|>=)\s*([0-9]*\.?[0-9]+)\s*", item)
        if not m:
            raise click.BadParameter(f"{item!r}: expected METRIC<=RATIO or METRIC>=RATIO, e.g. "
                                     "messaging_time_s<=0.9", param_hint="--goal")
        ratio = float(m[3])
        if not 0 < ratio <= 100:
            raise click.BadParameter(f"{item!r}: the ratio is candidate/baseline and must be above 0 "
                                     "(0.9 = 10 % better for a lower-is-better metric)", param_hint="--goal")
        goals.append(Goal(metric=m[1], direction="lower" if m[2] == "<=" else "higher",
                          target_ratio=ratio, why="given on the command line"))
    return goals


def render_layer2(out) -> None:
    r = out.report
    render_layer1(r)
    l2 = r.layer2
    if l2 is None:
        return
    from .bench.validate import interval_table

    console.print(interval_table(l2.workloads, f"sandbox A/B: {l2.rounds} paired rounds in one boot "
                                 f"({l2.durations.get('total', 0):.0f} s); TCG timings, ratios only"))
    if l2.counters:
        console.print("  policy counters (candidate's measured runs): "
                      + ", ".join(f"{k} {v}" for k, v in l2.counters.items()))
    for g in l2.correctness + l2.performance:
        mark = "[green]pass[/green]" if g.passed else "[red]FAIL[/red]"
        console.print(f"  {mark} {g.kind}/{g.name}: {escape(g.reason)}")
    if l2.host:
        console.print(f"  host: other processes used {l2.host.others_cpu:.2f} of {l2.host.cpus} CPUs while this "
                      f"measured ({l2.host.seconds:.0f} s)" + (f"; steal {l2.host.steal_cpu:.2f}"
                                                                if l2.host.steal_cpu else ""))
    for w in l2.warnings:
        console.print(f"  [yellow]warning[/yellow] {escape(w)}")
    colour = "green" if r.passed else "red"
    console.print(f"[{colour}]{r.status}[/{colour}]")
    if out.token:
        console.print("deployment token (single use, expires in 1 h):")
        click.echo(out.token)  # never wrapped: it must survive copy-paste and pipes


@main.command()
@click.argument("file_and_args", nargs=-1, metavar="[FILE | -- ARGS...]")
@click.option("--policy", help="a repository policy instead of a file")
@click.option("--report", "report_id", help="an existing report (layer 1 passed); one measured already is measured into a new report")
@click.option("--program", help="a scheduler program with its own loader (a path, or a built peer's name); "
              "its arguments follow `--`: layer 1 (it attaches), then the same A/B and gates in the sandbox")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="set a const volatile (or a policy parameter); map:MAP=N sizes a map")
@click.option("--goal", "goals", multiple=True, metavar="METRIC<=RATIO",
              help="e.g. p99_wakeup_latency_us<=0.9, throughput>=0.97 (repeatable)")
@click.option("--workload", "workloads", multiple=True, help="run only these workloads (repeatable)")
@click.option("--profile", "profile_id", help="the WorkloadProfile this is for (its goals apply)")
@click.option("--rounds", default=3, show_default=True, type=ROUNDS, help="interleaved A/B rounds, at least")
@click.option("--budget", type=VALIDATION_BUDGET, default=None,
              help="seconds for the whole run: more rounds while a workload is undecided [default: 240]; "
                   "0 = exactly --rounds")
@click.option("--no-cache", is_flag=True, help="run again even if identical work has a result")
@background_option
@deadline_option
@json_option
def validate(file_and_args: tuple[str, ...], policy: str | None, report_id: str | None, program: str | None,
             params: tuple[str, ...], goals: tuple[str, ...], workloads: tuple[str, ...], profile_id: str | None,
             rounds: int, budget: float | None, no_cache: bool, background: bool, deadline: float | None,
             as_json: bool) -> None:
    """Layer 2: stress, correctness and same-boot A/B performance in the sandbox VM.
    Exit 0 pass (prints a deployment token), 1 fail (with the reason), 2 usage/infrastructure."""
    from . import candidates

    file = None
    if program:
        if policy or report_id or params:
            raise click.UsageError("--program takes its arguments after `--`; not with --policy/--report/--param")
        goal_list = parse_goals(goals)
        candidates.check_layer2_request(goal_list, list(workloads) or None, rounds, budget, profile_id)
        vjob = candidates.verify_program_job(program, list(file_and_args), profile_id=profile_id,
                                             goals=goal_list or None, use_cache=not no_cache, actor="cli",
                                             complete_by_s=deadline)
        with progress_bar("verify", not as_json) as bar:
            r = candidates.verified_report(run_to_end(vjob.id, bar))
        if not r.passed_layer1:
            if as_json:
                click.echo(json.dumps(layer1_json(r), indent=2))
            else:
                render_layer1(r)
            sys.exit(1)
        report_id = r.id
    else:
        file = _one_file(file_and_args)
    if sum(bool(x) for x in (file, policy, report_id)) != 1:
        raise click.UsageError("give exactly one of FILE, --policy NAME, --report ID, --program PATH")
    from .operations import ValidateRequest

    req = ValidateRequest(report_id=report_id, source=file.read_text(errors="replace") if file else None,
                          policy=policy, params=parse_params(params), goals=parse_goals(goals) or None,
                          workloads=list(workloads) or None, profile_id=profile_id, rounds=rounds,
                          budget_s=budget, use_cache=not no_cache)
    job = candidates.validate_job(req, lane=_lane(background), actor="cli", complete_by_s=deadline)
    if background:
        return queued(job, as_json)
    with progress_bar("validate", not as_json) as bar:
        out = candidates.validation_outcome(run_to_end(job.id, bar))
    emit(out, as_json, render_layer2)
    sys.exit(0 if out.passed else 1)


@main.command()
@click.option("--policy", "policies", multiple=True, help="a repository policy (repeatable)")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a scheduler source file (repeatable)")
@click.option("--goal", "goals", multiple=True, metavar="METRIC<=RATIO", help="for every candidate")
@click.option("--workload", "workloads", multiple=True, help="run only these workloads (repeatable)")
@click.option("--rounds", default=3, show_default=True, type=ROUNDS, help="interleaved A/B rounds")
@click.option("--budget-runs", type=click.IntRange(0), help="at most this many sandbox runs in all")
@click.option("--budget-seconds", type=click.FloatRange(0), help="at most this many sandbox seconds")
@click.option("--no-cache", is_flag=True, help="run again even if identical work has a result")
@background_option
@deadline_option
@json_option
def campaign(policies: tuple[str, ...], files: tuple[Path, ...], goals: tuple[str, ...],
             workloads: tuple[str, ...], rounds: int, budget_runs: int | None,
             budget_seconds: float | None, no_cache: bool, background: bool, deadline: float | None,
             as_json: bool) -> None:
    """Validate several candidates as one campaign: verify → validate per candidate, in parallel up to
    the pool size, within an optional budget (earlier candidates first). Exit 0 when all passed."""
    from . import candidates
    from .jobs.campaigns import CampaignResult
    from .jobs.models import Budget
    from .operations import CampaignCandidate, CampaignRequest

    lane = _lane(background)
    cands = [CampaignCandidate(policy=p, lane=lane) for p in policies] + \
        [CampaignCandidate(source=f.read_text(errors="replace"), name=f.stem, lane=lane) for f in files]
    budget = Budget(runs=budget_runs, sandbox_s=budget_seconds) \
        if budget_runs is not None or budget_seconds is not None else None
    req = CampaignRequest(candidates=cands, goals=parse_goals(goals), workloads=list(workloads) or None,
                          rounds=rounds, budget=budget, use_cache=not no_cache)
    job = candidates.validate_campaign(req, lane=lane, actor="cli", complete_by_s=deadline)
    if background:
        return queued(job, as_json)
    with progress_bar("campaign", not as_json) as bar:
        job = run_to_end(job.id, lambda m, f: bar(m, f))
    queue_result(job)
    emit(queue_detail(job.id), as_json, render_job_detail)
    res = job.result_as(CampaignResult)
    sys.exit(0 if all(c.state == "succeeded" and c.passed is not False for c in res.children) else 1)


@main.command("workloads")
@json_option
def workloads_cmd(as_json: bool) -> None:
    """The sandbox benchmark workloads."""
    from .workloads import list_workloads

    def render(ws):
        t = Table("name", "metric", "unit", "better", "command")
        for w in ws:
            t.add_row(w.name, w.metric, w.unit, w.direction, w.command)
        console.print(t)

    emit(list_workloads(), as_json, render)


@main.command("reports")
@click.option("--limit", default=20, show_default=True, type=COUNT)
@json_option
def reports_cmd(limit: int, as_json: bool) -> None:
    """Stored validation reports, newest first."""
    from .reports import list_reports, what

    def render(rs):
        t = Table("id", "policy", "ops", "status")
        for r in rs:
            t.add_row(r.id, what(r), r.ops_name or "", r.status)
        console.print(t)

    emit(list_reports(limit), as_json, render)


@main.command("report")
@click.argument("report_id")
@click.option("--evidence", is_flag=True, help="what explains the figures: run-queue waits, who they were behind, "
              "idle CPUs, the wake graph, switches (both sides), and the starvation phase's worst waiters")
@json_option
def report_cmd(report_id: str, evidence: bool, as_json: bool) -> None:
    """One validation report: its verdict, and with --evidence what the guest's run-queue wait tracer
    saw under the default scheduler and under the candidate — per traced phase (round 1 of each
    workload, the starvation phase) the waits, who they were behind, idle CPUs beside them, the
    waker -> wakee graph and switches, side by side; the policy's own counters; the starvation
    phase's worst waiters by name and who starved."""
    from .reports import get_report, what
    from .validate.evidence import summary_lines

    r = get_report(report_id)
    sides = r.layer2.starvation if r.layer2 else []
    evs = r.layer2.evidence if r.layer2 else []
    if as_json:
        out = {"id": r.id, "policy": r.policy, "status": r.status,
               "passed": bool(r.layer2 and r.layer2.passed), "failure_reason": r.layer2.failure_reason if r.layer2 else None}
        if evidence:
            out["starvation"] = [s.model_dump() for s in sides]
            out["evidence"] = [e.model_dump() for e in evs]
            out["counters"] = r.layer2.counters if r.layer2 else {}
        click.echo(json.dumps(out, indent=2))
        return
    console.print(f"{r.id} ({escape(what(r))}): {escape(r.status)}")
    if not evidence:
        return
    if not sides and not evs:
        console.print("no traced phase in this report (layer 2 did not reach one, or the report predates the tracer)")
        return
    phases = list(dict.fromkeys(e.phase for e in evs))
    for ph in phases:
        by = {e.side: e for e in evs if e.phase == ph}
        for ln in summary_lines(by.get("baseline"), by.get("candidate")):
            console.print(escape(ln), soft_wrap=True)
    if r.layer2 and r.layer2.counters:
        console.print(escape("policy counters (candidate's measured runs): " +
                             ", ".join(f"{k} {v}" for k, v in sorted(r.layer2.counters.items()))), soft_wrap=True)
    for s in sides:
        console.print(escape("starvation phase " + s.line())
                      + (f", p99 <= {s.p99_ms:.0f} ms" if s.p99_ms else ""))
        t = Table("task", "pid", "longest ms", "mean ms", "waits", ">= 50 ms", ">= 250 ms", "nice", "kthread",
                  title=f"{s.side}: the longest single run-queue waits")
        for w in s.worst:
            t.add_row(escape(w.comm), str(w.pid), f"{w.max_ms:.1f}", f"{w.mean_ms:.2f}", str(w.waits),
                      str(w.over_50ms), str(w.long_waits), str(w.nice), "yes" if w.kthread else "")
        console.print(t)
        for w in s.starved:
            console.print(f"  [red]starved[/red]: {escape(starvation_describe(w))}")
    for e in evs:
        if e.edges or e.blockers:
            t = Table("waker -> wakee", "wakeups", "cross-CPU", "wait ms", title=f"{e.phase}, {e.side}: wake graph "
                      "(most waiting after the wakeups)")
            for g in e.edges[:4]:
                t.add_row(escape(f"{g.waker}[{g.waker_pid}] -> {g.wakee}[{g.wakee_pid}]"), str(g.wakeups),
                          str(g.cross_cpu), f"{g.wait_ms:.1f}")
            for b in e.blockers[:3]:
                t.add_row(escape(f"(behind {b.comm}[{b.pid}])"), str(b.waits), "", f"{b.blocked_ms:.1f}")
            console.print(t)


def starvation_describe(w) -> str:
    from .validate.starvation import describe

    return describe(w)


# --- synthesis: primitives, generate, reconfigure, revise, tune -------------------------------------

def render_synth(res) -> None:
    from .reports import get_report

    render_layer1(get_report(res.report_id))
    colour = "green" if res.verdict == "accepted" else "red"
    p = res.provenance
    origin = p.parent_policy or p.parent_candidate or (p.spec or {}).get("name", "")
    console.print(f"candidate [bold]{res.candidate_id}[/bold] ({p.kind} from {escape(origin)}): "
                  f"[{colour}]{res.verdict}[/{colour}]")
    if res.params:
        console.print("  params: " + " ".join(f"{k}={v}" for k, v in sorted(res.params.items())))
    console.print(f"  next: {escape(res.next_step)}")


def _synth_exit(res) -> None:
    sys.exit(0 if res.verdict == "accepted" else 1)


def _show_synth(res, as_json: bool, show_source: bool) -> None:
    """generate/revise: JSON, or the source when asked and the verdict table; exit by the verdict."""
    if as_json:
        click.echo(res.model_dump_json(indent=2))
    else:
        if show_source and res.source:
            click.echo(res.source)
        render_synth(res)
    _synth_exit(res)


@main.command("primitives")
@json_option
def primitives_cmd(as_json: bool) -> None:
    """The algorithm primitives a generated scheduler is built from (what, when, knobs, ranges)."""
    from .synth.spec import catalog

    def render(c):
        for axis in c.axes:
            t = Table("primitive", "what / when / fails", "knobs (type default range)", title=axis,
                      show_lines=True)
            for p in c.primitives:
                if p.axis != axis:
                    continue
                knobs = "\n".join(f"{k.name} ({k.type} {k.default}"
                                   + (f" {k.min}..{k.max}" if k.min is not None else "") + ")"
                                   for k in p.params)
                t.add_row(p.name, f"{p.what}\n[green]when:[/green] {p.when}\n[red]fails:[/red] {p.fails}"
                          + (f"\n[yellow]requires:[/yellow] {p.requires}" if p.requires else ""), knobs)
            console.print(t)
        console.print("class treatments: " + "; ".join(f"{k}: {v}" for k, v in c.class_treatments.items()))
        # the spec exactly as `schedcp generate SPEC.json` takes it (copy it from here)
        click.echo("example spec: " + c.spec_example.model_dump_json(exclude_none=True))

    emit(catalog(), as_json, render)


@main.command()
@click.argument("spec_file", metavar="SPEC.json|-", type=click.File("r"))
@click.option("--no-cache", is_flag=True, help="do not answer layer 1 from the result cache")
@click.option("--source", "show_source", is_flag=True, help="print the generated C source")
@json_option
def generate(spec_file, no_cache: bool, show_source: bool, as_json: bool) -> None:
    """Generate a scheduler from a spec (see `schedcp primitives`), compile it and run the kernel
    verifier. Exit 0 accepted, 1 rejected, 2 spec refused."""
    from .errors import BadInput
    from .synth.generate import generate as gen

    try:
        data = json.load(spec_file)
    except json.JSONDecodeError as e:
        raise BadInput(f"the spec is not JSON: {e}", "see `schedcp primitives` for an example spec")
    with progress_bar("generate", not as_json) as bar:
        res = gen(data, use_cache=not no_cache, progress=bar, actor="cli")
    _show_synth(res, as_json, show_source)


@main.command()
@click.argument("name")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", required=True,
              help="a policy.json parameter (repeatable)")
@json_option
def reconfigure(name: str, params: tuple[str, ...], as_json: bool) -> None:
    """A policy with new parameter values (checked against policy.json, loaded as rodata).
    Exit 0 accepted, 1 rejected, 2 bad parameter."""
    from .synth.reconfigure import reconfigure as rc

    with progress_bar("reconfigure", not as_json) as bar:
        res = rc(name, parse_params(params), progress=bar, actor="cli")
    emit(res, as_json, render_synth)
    _synth_exit(res)


@main.command()
@click.argument("base", metavar="NAME|CANDIDATE")
@click.argument("patch_file", metavar="PATCH|-", type=click.File("r"))
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="load with these values")
@click.option("--source", "show_source", is_flag=True, help="print the revised C source")
@json_option
def revise(base: str, patch_file, params: tuple[str, ...], show_source: bool, as_json: bool) -> None:
    """Apply a unified diff to a copy of a policy's (or candidate's) source and verify the result.
    Exit 0 accepted, 1 rejected, 2 the patch does not apply."""
    from .synth.revise import revise as rv

    with progress_bar("revise", not as_json) as bar:
        res = rv(base, patch_file.read(), parse_params(params), progress=bar, actor="cli")
    _show_synth(res, as_json, show_source)


def render_tune(t) -> None:
    from .models import in_words, times

    tab = Table("trial", "changed", "rounds", "vs default [95%]", "layer 2", "out",
                title=f"{t.id}: {t.target} on {', '.join(t.workloads)} (vs default: > 1 = better)")
    for x in t.trials:
        sp = (f"{in_words(x.speedup)} [{times(x.speedup_low)[:-1]}, {times(x.speedup_high)[:-1]}]"
              if x.speedup else "-")
        gate = "pass" if x.passed else "FAIL " + escape((x.failure_reason or "").split(":")[0])
        tab.add_row(x.candidate_id, x.label, str(x.rounds), sp, gate,
                    "" if x.eliminated_at_rung is None else f"rung {x.eliminated_at_rung}")
    console.print(tab)
    vs = (f"; best/defaults {t.vs_defaults:.3f} [{t.vs_defaults_low:.3f}, {t.vs_defaults_high:.3f}]"
          if t.vs_defaults is not None else "")
    console.print(f"best: {' '.join(f'{k}={v}' for k, v in sorted(t.best_params.items())) or '-'} "
                  f"({t.verdict}{vs}); {t.rounds_used}/{t.budget_rounds} rounds in {t.rungs} rungs, "
                  f"{t.seconds:.0f} s; report {t.best_report_id}")
    console.print(f"method: {t.method}")


def parse_space(items: tuple[str, ...]) -> dict[str, list[str]] | None:
    if not items:
        return None
    return {k: [v for v in vals.split(",") if v] for k, vals in parse_params(items).items()}


@main.command()
@click.argument("name", metavar="NAME|CANDIDATE")
@click.option("--workload", "workloads", multiple=True, help="sandbox workloads to tune on (default hackbench)")
@click.option("--goal", "goals", multiple=True, metavar="METRIC<=RATIO", help="gates each trial is judged by")
@click.option("--budget-rounds", "budget_rounds", default=None, type=click.IntRange(2, 200),
              help="paired baseline/candidate rounds, all trials together  [default: 12]")
@click.option("--budget", "old_budget", default=None, type=click.IntRange(2, 200), hidden=True,
              help="deprecated: ROUNDS here (not seconds); use --budget-rounds")
@click.option("--seconds", "budget_s", type=click.FloatRange(0, 7200, min_open=True), default=None,
              help="stop starting rungs after this long (the tune's budget_s)")
@click.option("--configs", default=4, show_default=True, type=click.IntRange(1, 64),
              help="configurations in the first rung")
@click.option("--space", multiple=True, metavar="NAME=V1,V2…", help="only try these values of a knob")
@click.option("--seed", default=0, show_default=True)
@background_option
@deadline_option
@json_option
def tune(name: str, workloads: tuple[str, ...], goals: tuple[str, ...], budget_rounds: int | None,
         old_budget: int | None, budget_s: float | None, configs: int, space: tuple[str, ...], seed: int,
         background: bool, deadline: float | None, as_json: bool) -> None:
    """Search a policy's parameters in the sandbox (successive halving, one VM boot).
    Exit 0 when the best is at least as good as the defaults, 1 when nothing ran, 2 usage."""
    from .operations import TuneRequest
    from .synth.tune import tune_job, tune_result

    if old_budget is not None:
        if budget_rounds is not None:
            raise click.UsageError("give --budget-rounds only (--budget is its deprecated spelling)")
        err_console.print("[yellow]--budget is deprecated here: it means paired ROUNDS in tune (seconds "
                          "everywhere else); use --budget-rounds (and --seconds for a time limit)[/yellow]")
        budget_rounds = old_budget
    budget_rounds = 12 if budget_rounds is None else budget_rounds
    req = TuneRequest(name=name, workloads=list(workloads) or None, goals=parse_goals(goals) or None,
                      budget_rounds=budget_rounds, budget_s=budget_s, configs=configs, space=parse_space(space),
                      seed=seed, actor="cli")
    job = tune_job(req, lane=_lane(background), complete_by_s=deadline)
    if background:
        return queued(job, as_json)
    with progress_bar("tune", not as_json) as bar:
        t = tune_result(run_to_end(job.id, bar))
    emit(t, as_json, render_tune)
    sys.exit(0 if t.best_params else 1)


# --- layer 3: token, deploy, status, rollback, audit ---------------------------------------------

@main.command()
@click.argument("report_id")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True)
@click.option("--ttl", default=3600, show_default=True, type=int,
              help="seconds until it expires (1 s .. 7 days; checked by deploy.tokens)")
@click.option("--scoped", is_flag=True, help="allow only a scoped deploy (partial mode: `deploy --scope`); "
              "the only token a report that harmed just the guard set gets")
@json_option
def token(report_id: str, target: str, ttl: int, scoped: bool, as_json: bool) -> None:
    """Issue a fresh deployment token for a report that passed layers 1 and 2."""
    from .deploy import tokens

    t = tokens.issue(report_id, target, ttl, actor="cli", scope="scoped" if scoped else "system")
    emit(t, as_json, lambda t: click.echo(t.token))


@main.command()
@click.option("--token", "token_", required=True, help="deployment token from validate / `schedcp token`")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True)
@click.option("--dry-run", is_flag=True, help="check the token and print what would happen")
@click.option("--metric-cmd", help="command printing a number, run in the target to watch the deploy")
@click.option("--metric-direction", type=click.Choice(["lower", "higher"]), default="lower",
              show_default=True)
@click.option("--max-degradation", type=click.FloatRange(1.0), default=None,
              help="roll back when the metric is this many times worse than the baseline... "
                   "(default: from the report's goals; 1.10 without goals)")
@click.option("--consecutive", default=3, show_default=True, type=COUNT, help="...for this many samples")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="monitor sampling period, s")
@click.option("--workload", help="background workload to keep running in the target")
@click.option("--scope", "scope_", metavar="pid:N|cgroup:PATH",
              help="load it in partial mode and move only these tasks to SCHED_EXT (or give `-- CMD`)")
@click.argument("command", nargs=-1, metavar="[-- CMD...]")
@json_option
def deploy(token_: str, target: str, dry_run: bool, metric_cmd: str | None, metric_direction: str,
           max_degradation: float | None, consecutive: int, interval: float, workload: str | None,
           scope_: str | None, command: tuple[str, ...], as_json: bool) -> None:
    """Deploy a validated scheduler with its token, then monitor it (automatic rollback). With a scope
    (`--scope pid:N`, `--scope cgroup:PATH` or `-- CMD`): in partial mode, only those tasks (and their
    children) on it; every other task stays on the default scheduler, and rollback moves them back."""
    from .reports import deployed_what
    from .deploy.deployments import DeployRequest, MonitorPolicy, deploy as do_deploy
    from .deploy.scope import parse as parse_scope

    mon = MonitorPolicy(metric_cmd=metric_cmd, metric_direction=metric_direction,
                        max_degradation_ratio=max_degradation, consecutive=consecutive,
                        interval_s=interval, workload_cmd=workload)
    req = DeployRequest(token=token_, target=target, dry_run=dry_run, monitor=mon,
                        scope=parse_scope(scope_, list(command) or None))
    with progress_bar("deploy", not as_json and not dry_run) as bar:
        bar("deploying", 0.2)
        d = do_deploy(req, actor="cli")

    def render(d):
        if getattr(d, "dry_run", False):
            console.print(f"[bold]dry run[/bold]: token valid for report {d.report_id} on {d.target}; "
                          "would:")
            for w in d.would:
                console.print(f"  - {w}")
        else:
            console.print(f"[green]deployed[/green] {d.id}: {escape(deployed_what(d.policy, d.report_id))} (ops {d.ops_name}) "
                          f"on {d.target}, {'scoped to ' + escape(d.scope) if d.scope else 'system-wide'}; "
                          f"baseline {d.monitor.metric_cmd!r} = {d.baseline}; monitor pid {d.monitor_pid}")

    emit(d, as_json, render)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--token", "token_", required=True, help="a deployment token (system or scoped); checked, not spent")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True)
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(2, 50), help="paired rounds per A/B")
@click.option("--no-aa", is_flag=True, help="skip the partial-mode A/A (a plain FIFO) beside it")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD...")
@json_option
def ab(token_: str, target: str, rounds: int, no_aa: bool, command: tuple[str, ...], as_json: bool) -> None:
    """A/B on the target by switching the workload's class: the candidate loaded in partial mode, CMD run
    in paired rounds as SCHED_EXT (candidate) and SCHED_NORMAL (default), with a plain FIFO's partial-mode
    A/A beside it (what the class order alone costs). Nothing stays deployed."""
    from .deploy.ab import ab as run_ab
    from .bench.validate import fmt_interval

    with progress_bar("ab", not as_json) as bar:
        res = run_ab(token_, list(command), target, rounds=rounds, aa=not no_aa, actor="cli",
                     progress=bar)

    def render(r) -> None:
        t = Table("scheduler (partial mode)", "SCHED_NORMAL median", "SCHED_EXT median",
                  "vs default [95% interval]", "verdict",
                  title=f"{escape(' '.join(r.command))} on {r.target}: {r.rounds} paired rounds each; "
                        "vs default: > 1 = better")
        for name, w in ((f"{r.ops_name} (candidate)", r.candidate), ("fifo (A/A: the class order)", r.aa)):
            if w is None:
                continue
            t.add_row(name, f"{w.baseline_stats.median:.3f} s" if w.baseline_stats else "-",
                      f"{w.candidate_stats.median:.3f} s" if w.candidate_stats else "-", fmt_interval(w), w.verdict)
        console.print(t)
        console.print(f"host load average {r.load_average}; {r.seconds:.0f} s")

    emit(res, as_json, render)


@main.command()
@json_option
def status(as_json: bool) -> None:
    """What is deployed where, since when, from which report, and the monitor's latest reading."""
    from .reports import deployed_what
    from .deploy.deployments import resume_monitors, status as get_status

    resume_monitors()
    s = get_status()

    def render(s):
        for name, st in s.targets.items():
            console.print(f"{name}: " + (f"sched_ext {st.state}, running scheduler: {st.ops or 'none'}"
                                         if not isinstance(st, str) else st))
        t = Table("deployment", "target", "policy", "status", "since", "report", "last reading")
        import datetime as dt

        for d in s.deployments:
            last = d.readings[-1] if d.readings else None
            t.add_row(d.id, d.target + (f" ({d.scope})" if d.scope else ""), deployed_what(d.policy, d.report_id),
                      d.status + (f": {d.end_reason}" if
                                                                          d.end_reason else ""),
                      dt.datetime.fromtimestamp(d.created_at).strftime("%H:%M:%S"), d.report_id,
                      f"{last.state} metric {last.metric} ({last.ratio}x)" if last else "-")
        console.print(t)

    emit(s, as_json, render)


@main.command()
@click.argument("deployment_id", required=False)
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True)
@click.option("--reason", default="operator requested rollback", show_default=True)
@json_option
def rollback(deployment_id: str | None, target: str, reason: str, as_json: bool) -> None:
    """Unload the deployed scheduler and restore the previous one (or the kernel default)."""
    from .deploy.deployments import rollback as do_rollback

    d = do_rollback(deployment_id, target, reason, actor="cli")
    emit(d, as_json, lambda d: console.print(f"rolled back {d.id}: {d.end_reason}"))


@main.command()
@click.option("--limit", default=50, show_default=True, type=COUNT)
@json_option
def audit(limit: int, as_json: bool) -> None:
    """The audit log: tokens issued, deploys, rollbacks, refusals."""
    from . import store

    def render(rows):
        import datetime as dt

        t = Table("time", "actor", "action", "artifact", "detail")
        for r in rows:
            t.add_row(dt.datetime.fromtimestamp(r["at"]).strftime("%Y-%m-%d %H:%M:%S"), r["actor"],
                      r["action"], (r["artifact_sha256"] or "")[:12], json.dumps(r["detail"])[:90])
        console.print(t)

    emit(store.audit_log(limit), as_json, render)


# --- learn --------------------------------------------------------------------------------------

@main.command()
@click.argument("subject_id")
@json_option
def feedback(subject_id: str, as_json: bool) -> None:
    """Feedback for a deployment (dep-…) or a validation report (rep-…)."""
    from .learn.feedback import get_feedback

    def render(f):
        console.print(escape(f.summary))
        if f.exit:
            console.print(f"scheduler exit: {escape(f.exit.describe())}")
        t = Table("metric", "baseline", "candidate", "vs default (> 1 = better)", "bound (cand/base)", "met",
                  title="each metric against the default scheduler")
        for m in f.metrics:
            met = "-" if m.met is None else "[green]yes[/green]" if m.met else "[red]no[/red]"
            t.add_row(m.metric, f"{m.baseline:.4g}", f"{m.candidate:.4g}", m.words,
                      "-" if m.target_ratio is None else f"{'<=' if m.direction == 'lower' else '>='} "
                      f"{m.target_ratio:g}", met)
        console.print(t)

    emit(get_feedback(subject_id), as_json, render)


@main.command()
@click.argument("report_id")
@click.option("--name", required=True)
@click.option("--description", required=True)
@click.option("--tag", "tags", multiple=True)
@json_option
def contribute(report_id: str, name: str, description: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Add a validated scheduler that met its goals to the policy repository.

    It is written to $SCHEDCP_HOME/policies and searched beside the shipped policies; the checkout
    or installed package is never written."""
    from .learn.contribute import contribute_policy

    p = contribute_policy(report_id, name, description, list(tags), actor="cli")
    emit(p, as_json, lambda p: console.print(f"added policy {p.name} at {p.path}"))


# --- the main job -------------------------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--workload", "workloads", multiple=True,
              help="sandbox workload to optimize for (repeatable; default: all of them)")
@click.option("--goal", "goals", multiple=True, metavar="METRIC<=RATIO",
              help="e.g. messaging_time_s<=0.9 (default: the profile's goals the workloads measure)")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True,
              help="host: stop before deploying and print the human's `schedcp deploy` command")
@click.option("--budget", "budget_s", default=600.0, show_default=True, type=click.FloatRange(0, 86400, min_open=True),
              help="seconds for the loop; each validation gets its share (more A/B rounds while "
                   "undecided)")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 10),
              help="interleaved A/B rounds per candidate")
@click.option("--max-candidates", default=3, show_default=True, type=click.IntRange(1, 10))
@click.option("--watch", "watch_s", default=20.0, show_default=True, type=click.FloatRange(0, 3600),
              help="seconds the deployment monitor runs before learning")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="where report.json and "
              "chart.png go (default: $SCHEDCP_HOME/optimize/<plan id>)")
@json_option
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def optimize(workloads: tuple[str, ...], goals: tuple[str, ...], target: str, budget_s: float,
             rounds: int, max_candidates: int, watch_s: float, out_dir: str | None, as_json: bool,
             cmd: tuple[str, ...]) -> None:
    """The whole loop (observe -> plan -> execute -> learn) through the MCP tools, each stage with
    only its agent's tools. `schedcp optimize --workload hackbench` or `schedcp optimize -- CMD…`.
    Exit 0 when a candidate passed and was deployed (or, --target host, is ready for a human), 1 when
    nothing beat the default scheduler."""
    from .candidates import check_goal_ratio, check_layer2_request

    parsed_goals = parse_goals(goals)  # the checks that need no server and no VM, first (fast)
    if not cmd:
        check_layer2_request(parsed_goals, list(workloads) or None, rounds, None)
    for g in parsed_goals:
        check_goal_ratio(g)
    import anyio

    from . import optimize as opt

    req = opt.OptimizeRequest(workloads=list(workloads), command=list(cmd) or None,
                              goals=parsed_goals, target=target, budget_s=budget_s,
                              rounds=rounds, max_candidates=max_candidates, watch_s=watch_s,
                              out_dir=out_dir)
    with progress_bar("optimize", not as_json) as bar:
        rep = anyio.run(opt.run, req, bar)
    emit(rep, as_json, lambda r: opt.render(r, console))
    sys.exit(rep.exit_code)


# --- watch ------------------------------------------------------------------------------------------

@main.command()
@click.option("--psi-above", type=click.FloatRange(0, 100), help="start a cycle when the CPU's pressure "
              "(PSI some avg10, %) rises above this")
@click.option("--reward-below", type=float, help="... when this deployment's reward falls below this "
              "(with --deployment)")
@click.option("--deployment", help="the deployment --reward-below watches (dep-…)")
@click.option("--unlike-profile", type=click.FloatRange(0, 1), help="... when the machine's behaviour's "
              "similarity to --profile falls below this (0..1)")
@click.option("--profile", help="the profile --unlike-profile compares with (prof-…)")
@click.option("--workload", "workloads", multiple=True, help="what each cycle optimizes for (repeatable)")
@click.option("--goal", "goals", multiple=True, metavar="METRIC<=RATIO")
@click.option("--target", type=click.Choice(["sandbox", "host"]), default="sandbox", show_default=True,
              help="a cycle deploys to the sandbox's staging VM, or (host) stops at the human's command")
@click.option("--budget", "budget_s", default=600.0, show_default=True,
              type=click.FloatRange(0, 86400, min_open=True), help="seconds per cycle")
@click.option("--max-candidates", default=3, show_default=True, type=click.IntRange(1, 10))
@click.option("--min-interval", "min_interval_s", default=3600.0, show_default=True,
              type=click.FloatRange(0), help="seconds from one cycle's start to the next's")
@click.option("--max-cycles", default=1, show_default=True, type=click.IntRange(1, 100))
@click.option("--interval", "interval_s", default=5.0, show_default=True,
              type=click.FloatRange(0, min_open=True), help="seconds between two evaluations")
@click.option("--for", "duration_s", type=click.FloatRange(0, min_open=True),
              help="stop watching after this many seconds (default: after --max-cycles)")
@json_option
def watch(psi_above, reward_below, deployment, unlike_profile, profile, workloads, goals, target,
          budget_s, max_candidates, min_interval_s, max_cycles, interval_s, duration_s, as_json) -> None:
    """Proactive optimize cycles: watch the machine and run `schedcp optimize` when a condition rises
    (CPU pressure up, a deployment's reward down, the workload no longer like its profile), at most
    --max-cycles times and never twice within --min-interval. Never deploys to the host. Exit 0 when
    every cycle found a winner, 1 otherwise (or when no condition rose)."""
    import anyio

    from . import optimize as opt
    from .candidates import check_layer2_request
    from .learn.callbacks import Condition
    from .proactive import WatchRequest, watch as run_watch

    conds = []
    if psi_above is not None:
        conds.append(Condition(kind="psi_cpu_above", threshold=psi_above, cooldown_s=0))
    if reward_below is not None:
        if not deployment:
            raise click.UsageError("--reward-below needs --deployment dep-…")
        from .records import get_deployment
        get_deployment(deployment)  # a wrong id fails now, not at the first evaluation
        conds.append(Condition(kind="reward_below", threshold=reward_below, deployment_id=deployment, cooldown_s=0))
    if unlike_profile is not None:
        if not profile:
            raise click.UsageError("--unlike-profile needs --profile prof-…")
        from .observe.profile import get_profile
        get_profile(profile)
        conds.append(Condition(kind="profile_changed", threshold=unlike_profile, profile_id=profile, cooldown_s=0))
    if not conds:
        raise click.UsageError("give a condition: --psi-above, --reward-below or --unlike-profile")
    parsed_goals = parse_goals(goals)
    check_layer2_request(parsed_goals, list(workloads) or None, 3, None)
    req = WatchRequest(conditions=conds, min_interval_s=min_interval_s, max_cycles=max_cycles,
                       interval_s=interval_s, duration_s=duration_s,
                       optimize=opt.OptimizeRequest(workloads=list(workloads), goals=parsed_goals, target=target,
                                                    budget_s=budget_s, max_candidates=max_candidates))

    async def one_cycle(r):
        with progress_bar("optimize", not as_json) as bar:
            return await opt.run(r, bar)

    say = (lambda m: None) if as_json else (lambda m: err_console.print(f"watch: {m}"))
    res = anyio.run(run_watch, req, one_cycle, say)
    emit(res, as_json, lambda r: console.print(
        f"{len(r.cycles)} cycle(s) after {r.evaluations} evaluation(s); {r.stopped}" + "".join(
            f"\n  {c.id}: exit {c.exit_code} — {c.trigger}; {c.why}" for c in r.cycles)))
    sys.exit(0 if res.cycles and all(c.exit_code == 0 for c in res.cycles) else 1)


# --- agents -----------------------------------------------------------------------------------------

@main.group()
def agents() -> None:
    """The four Claude Code subagents, the /optimize command and the plugin."""


@agents.command("generate")
@click.option("--check", is_flag=True, help="write nothing; exit 1 if a generated file is stale")
@json_option
def agents_generate(check: bool, as_json: bool) -> None:
    """Regenerate .claude/agents, .claude/commands and plugin/ from agents/*.md and the server's
    actual tool list."""
    from . import agents as ag

    if check:
        stale = ag.drift()
        emit({"stale": sorted(stale)}, as_json,
             lambda d: console.print("\n".join(stale.values()) + "\nstale: " + ", ".join(d["stale"])
                                     + "\nrun `schedcp agents generate`" if d["stale"]
                                     else "generated files are up to date"))
        sys.exit(1 if stale else 0)
    changed = ag.generate()
    missing = ag.unassigned_tools()
    emit({"changed": changed, "tools_without_a_role": missing}, as_json,
         lambda d: console.print((("wrote " + ", ".join(changed)) if changed else "nothing changed")
                                 + (f"\n[yellow]tools no role may use:[/yellow] {', '.join(missing)}"
                                    " (add each to the tools of one agents/*.md)" if missing else "")))


@agents.command("install")
@click.option("--scope", type=click.Choice(["project", "user"]), default="project", show_default=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="project directory (project scope, default: here) or home (user scope, default: ~)")
@click.option("--force", is_flag=True, help="overwrite files that exist with other content")
@json_option
def agents_install(scope: str, directory: Path | None, force: bool, as_json: bool) -> None:
    """Install the agents, the /optimize command and the MCP server registration into a project
    (or your user config) without the plugin system."""
    from . import agents as ag

    r = ag.install(scope, directory, force)
    emit(r, as_json, lambda r: console.print(
        f"installed into {r.directory}: {len(r.written)} written, {len(r.unchanged)} unchanged\n"
        f"MCP server: {r.mcp}"))
    for w in r.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(w)}")


@main.group()
def bench() -> None:
    """Benchmarks that print figures (not timed tests)."""


@bench.command("verify")
@click.option("--runs", type=click.IntRange(1, 20), default=3, show_default=True,
              help="cold verifies of each kind (restored, booted) to take the median of")
@json_option
def bench_verify(runs: int, as_json: bool) -> None:
    """Cold, warm and cached verify times (cold: restored and, as the baseline, booted).

    Cold starts a VM for a new object: restored from the image's saved idle guest, and booted as
    the baseline, interleaved in the same run; warm loads a new object in a running VM; cached
    answers the same source again from the store. The machine's load average is printed too."""
    from .bench.verify import bench_verify as run

    res = run(runs=runs, say=(lambda line: None) if as_json else None)
    if as_json:
        emit(res, True, lambda r: None)


@bench.command("tools")
@json_option
def bench_tools(as_json: bool) -> None:
    """What the MCP server costs an agent: tools/list bytes and each tool's default result for the
    README's worked examples (ids from this store), through a real stdio client."""
    from rich.table import Table

    from .bench.tools import LIST_MAX, bench_tools as run

    def render(b) -> None:
        console.print(f"tools/list: {b.list_bytes:,} bytes (~{b.list_tokens:,} tokens) for {b.tools} "
                      f"tools (limit {LIST_MAX:,}); largest: " + ", ".join(
                          f"{k} {v:,}" for k, v in list(b.definitions.items())[:3]))
        t = Table("tool", "arguments", "bytes", "shown", "~tokens", "limit")
        for r in b.results:
            t.add_row(r.tool, json.dumps(r.args)[:60], f"{r.bytes:,}", f"{r.shown:,}", str(r.tokens),
                      f"{r.limit:,}" + (" [red]OVER[/red]" if r.bytes > r.limit else "")
                      + (f" [red]{r.error[:60]}[/red]" if r.error else ""))
        console.print(t)

    b = run()
    emit(b.model_dump(mode="json"), as_json, lambda _: render(b))


def bench_job(job, label: str, background: bool, as_json: bool, answer=None) -> dict:
    """A benchmark job from the command line: its id (--background), or wait with a progress bar and
    print what it printed (under --json: its result). `answer`: what to read from the ended job."""
    from .bench.runs import show, without_printed

    if background:
        queued(job, as_json)
        sys.exit(0)
    with progress_bar(label, not as_json) as bar:
        res = (answer or queue_result)(run_to_end(job.id, bar))
    if as_json:
        click.echo(json.dumps(without_printed(res), indent=2))
    else:
        show(res, console)
    return res


@bench.command("synth")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 16),
              help="compile threads sharing the one VM")
@background_option
@deadline_option
@json_option
def bench_synth(workers: int, background: bool, deadline: float | None, as_json: bool) -> None:
    """The primitive matrix: render, compile and kernel-verify every spec in one VM boot."""
    from .bench.runs import synth_job

    res = bench_job(synth_job(workers, lane=_lane(background), actor="cli", complete_by_s=deadline),
                    "bench synth", background, as_json)
    sys.exit(0 if res["accepted"] == res["specs"] else 1)


@bench.command("jobs")
@click.option("--workers", "sizes", multiple=True, type=int, default=(2, 8), show_default=True,
              help="pool sizes to measure (repeatable)")
@click.option("--jobs", "n", default=2000, show_default=True, type=COUNT, help="trivial jobs per pool size")
@click.option("--vm-noise", is_flag=True, help="instead: A/A noise in a sandbox VM alone vs beside a busy "
              "second VM (what decides the default pool size; needs a quiet machine, ~2 min)")
@click.option("--campaign", "campaign_", is_flag=True, help="instead: wall time of a 6-candidate validation "
              "campaign with pool 1 vs 2, and its validations' A/A noise (needs a quiet machine, ~10 min)")
@json_option
def bench_jobs(sizes: tuple[int, ...], n: int, vm_noise: bool, campaign_: bool, as_json: bool) -> None:
    """The supervisor's throughput (jobs/s) and submit→start latency with trivial jobs."""
    from .bench.jobs import TARGET_JOBS_S, TARGET_P99_MS, bench_campaign, bench_jobs as run, bench_vm_noise

    if campaign_:
        from . import candidates

        names = ["fifo", "vtime_fair", "latency_boost", "batch", "local_sticky", "llc_aware"]

        def submit():
            return candidates.validate_campaign([{"policy": p} for p in names], workloads=["hackbench"],
                                                rounds=2, validation_budget_s=0, use_cache=False)

        def show_c(rs):
            t = Table("pool", "candidates", "wall time", "validations done", "A/A noise", "baseline hackbench",
                      title="6-candidate validation campaign (hackbench, 2 paired rounds each; A/A noise: "
                      "median (max-min)/median of each validation's baseline runs)")
            for r in rs:
                t.add_row(str(r.pool), str(r.candidates), f"{r.wall_s:.0f} s", str(r.validations_ok),
                          f"{r.aa_noise:.1%}" if r.aa_noise is not None else "-",
                          f"{r.baseline_s:.3f} s" if r.baseline_s is not None else "-")
            console.print(t)

        with progress_bar("campaign: pool 1, then pool 2", not as_json) as bar:
            bar("running", 0.05)
            rs = bench_campaign(submit, tuple(sorted(set(sizes))) if sizes != (2, 8) else (1, 2))
        emit(rs, as_json, show_c)
        return

    if vm_noise:
        def show(rs):
            t = Table("setting", "runs", "median hackbench", "spread (max-min)/median", "cv",
                      title="A/A noise in one sandbox VM (default scheduler against itself)")
            for r in rs:
                t.add_row(r.setting, str(r.runs), f"{r.median_s:.3f} s", f"{r.spread:.1%}", f"{r.cv:.1%}")
            console.print(t)

        with progress_bar("measuring A/A noise", not as_json) as bar:
            bar("two VMs, one after the other", 0.1)
            rs = bench_vm_noise()
        emit(rs, as_json, show)
        return

    def render(rs):
        t = Table("workers", "burst", "jobs/s", "paced at", "p50 submit→start", "p99 submit→start", "max",
                  "targets",
                  title=f"schedcp bench jobs (targets: ≥ {TARGET_JOBS_S:g} jobs/s, p99 ≤ {TARGET_P99_MS:g} ms)")
        for r in rs:
            t.add_row(str(r.workers), str(r.jobs), f"{r.jobs_per_s:.0f}", f"{r.paced_rate:.0f}/s",
                      f"{r.p50_submit_to_start_ms:.1f} ms",
                      f"{r.p99_submit_to_start_ms:.1f} ms", f"{r.max_submit_to_start_ms:.1f} ms",
                      "[green]met[/green]" if r.meets_targets else "[red]missed[/red]")
        console.print(t)

    emit(run(sizes, n), as_json, render)


@bench.command("policies")
@click.option("--rounds", default=3, show_default=True, type=ROUNDS, help="paired rounds per policy, at least")
@click.option("--budget", type=VALIDATION_BUDGET, default=None, help="seconds per validation [default: 240]")
@click.option("--policy", "names", multiple=True, help="only these (repository names or kernel:scx_simple)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--no-cache", is_flag=True, help="validate again even if an identical validation has a result")
@background_option
@deadline_option
@json_option
def bench_policies(rounds: int, budget: float | None, names: tuple[str, ...], out: Path, no_cache: bool,
                   background: bool, deadline: float | None, as_json: bool) -> None:
    """A/B intervals of every repository policy and the kernel's example schedulers on the sandbox
    workloads (table + PNG chart): a campaign of one validation per policy, then the report."""
    from .bench.runs import policies_campaign, report_of

    job = policies_campaign(list(names) or None, rounds, budget, out, use_cache=not no_cache,
                            width=console.width, lane=_lane(background), actor="cli", complete_by_s=deadline)
    bench_job(job, "bench policies", background, as_json, report_of)


@bench.command("peers", context_settings={"ignore_unknown_options": True})
@click.argument("program_args", nargs=-1, metavar="[-- ARGS...]")
@click.option("--peer", "peer_names", multiple=True, help="only these built peers (repeatable; default: every built one)")
@click.option("--program", help="a further scheduler program to put in the table; its arguments follow `--`")
@click.option("--policy", "policies", multiple=True, help="repository policies to compare (default: lean_preempt)")
@click.option("--workload", "workloads", multiple=True, help="only these workloads (repeatable; default: the default set)")
@click.option("--rounds", default=3, show_default=True, type=ROUNDS, help="paired rounds per row, at least")
@click.option("--budget", type=VALIDATION_BUDGET, default=None, help="seconds per validation [default: 240]; 0 = exactly --rounds")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--no-cache", is_flag=True, help="validate again even if an identical validation has a result")
@background_option
@deadline_option
@json_option
def bench_peers(program_args: tuple[str, ...], peer_names: tuple[str, ...], program: str | None,
                policies: tuple[str, ...], workloads: tuple[str, ...], rounds: int, budget: float | None, out: Path,
                no_cache: bool, background: bool, deadline: float | None, as_json: bool) -> None:
    """The repository's best policy against every peer program (the kernel's examples, started with their
    own userspace), each through the same validation; one table with every row's intervals (+ chart)."""
    from . import candidates
    from .bench.runs import peers_campaign, report_of

    if program_args and not program:
        raise click.UsageError("arguments after `--` belong to --program")
    candidates.check_layer2_request(None, list(workloads) or None, rounds, budget)
    job = peers_campaign(list(peer_names) or None, [(program, list(program_args))] if program else None,
                         list(policies) or None, rounds, budget, list(workloads) or None, out,
                         use_cache=not no_cache, width=console.width, lane=_lane(background), actor="cli",
                         complete_by_s=deadline)
    bench_job(job, "bench peers", background, as_json, report_of)


@bench.command("aa")
@click.option("--rounds", default=15, show_default=True, type=ROUNDS, help="paired rounds (at 10, an interval of a ~0.1-sd figure wanders ±3 % around 1 by itself)")
@click.option("--budget", type=VALIDATION_BUDGET, default=0.0, show_default=True,
              help="seconds: more rounds while a workload is undecided; 0 = exactly --rounds")
@click.option("--workload", "workloads", multiple=True, help="only these workloads (repeatable)")
@background_option
@deadline_option
@json_option
def bench_aa(rounds: int, budget: float | None, workloads: tuple[str, ...], background: bool,
             deadline: float | None, as_json: bool) -> None:
    """The default scheduler against itself in one boot: each workload's ratio interval, the smallest
    difference a validation can tell. Exit 1 when an interval is wider than ±10 %."""
    from .bench.runs import aa_job

    res = bench_job(aa_job(rounds, budget, list(workloads) or None, width=console.width, lane=_lane(background),
                           actor="cli", complete_by_s=deadline), "bench aa", background, as_json)
    sys.exit(0 if res["within_margin"] else 1)


@bench.command("stability")
@click.option("--policy", "policy", required=True, help="a repository policy (or kernel:scx_simple)")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 20),
              help="fresh VM boots, one validation each")
@click.option("--rounds", default=3, show_default=True, type=ROUNDS, help="paired rounds per run, at least")
@click.option("--budget", type=VALIDATION_BUDGET, default=None, help="seconds per validation [default: 240]")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write stability-<policy>.md/json here")
@background_option
@deadline_option
@json_option
def bench_stability(policy: str, runs: int, rounds: int, budget: float | None, out: Path | None,
                    background: bool, deadline: float | None, as_json: bool) -> None:
    """Validate one policy in N fresh boots (N validation jobs, never from the cache): each run's
    verdicts and how often a verdict flipped. Exit 1 when any verdict flipped."""
    from .bench.runs import report_of, stability_campaign

    if runs < 2:
        raise click.UsageError("--runs must be at least 2 to see a flip")
    job = stability_campaign(policy, runs, rounds, budget, out, width=console.width, lane=_lane(background),
                             actor="cli", complete_by_s=deadline)
    res = bench_job(job, "bench stability", background, as_json, report_of)
    sys.exit(0 if res["flips"] == 0 else 1)
