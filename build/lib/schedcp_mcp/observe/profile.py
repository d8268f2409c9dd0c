"""`profile_workload`: run (or attach to) a workload, measure it, and store a WorkloadProfile.

What is measured, each only where the machine can:
- psutil process-tree sampling: threads, processes seen (forks), voluntary / involuntary context
  switches, CPU time, I/O bytes;
- system-wide /proc/stat deltas (forks, context switches) and PSI cpu pressure;
- `perf stat` software counters (and hardware counters where a PMU exists);
- a run-queue latency histogram from libbpf-tools `runqlat` (CO-RE; needs BTF and root).
Each source that could not run says why in `sources`.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput, NotFound
from ..models import Goal
from .cpu import read_proc_stat, read_psi
from .system import tools

KIND = "profile"


class Source(BaseModel):
    name: str
    used: bool
    detail: str = ""


class ProcessTreeMetrics(BaseModel):
    processes_seen: int = Field(description="distinct processes observed in the tree")
    max_threads: int
    avg_threads: float
    cpu_time_s: float
    voluntary_ctx_switches: int
    involuntary_ctx_switches: int
    read_bytes: int | None = None
    write_bytes: int | None = None


class RunqlatHistogram(BaseModel):
    unit: str = "usecs"
    buckets: list[tuple[int, int, int]] = Field(description="(low, high, count)")
    p50_us: float | None = None
    p99_us: float | None = None


class Characteristics(BaseModel):
    cpu_bound: bool
    latency_sensitive: bool
    many_short_lived_processes: bool
    parallelism: float = Field(description="average CPUs kept busy by the workload")
    io_heavy: bool
    cpu_utilization: float = Field(description="workload CPU time / (wall time x CPUs), 0..1")
    voluntary_switch_rate: float = Field(description="voluntary context switches per second")
    involuntary_switch_rate: float
    fork_rate: float = Field(description="new processes per second")
    features: dict[str, float] = Field(
        description="normalized 0..1 feature vector used for profile similarity")


class WorkloadProfile(BaseModel):
    id: str
    created_at: float
    command: list[str] | None = None
    pid: int | None = None
    duration_s: float
    exit_code: int | None = None
    ncpus: int
    summary: str
    characteristics: Characteristics
    process_tree: ProcessTreeMetrics
    system: dict[str, float] = Field(description="system-wide rates during the run")
    perf_counters: dict[str, float] = {}
    runqlat: RunqlatHistogram | None = None
    goals: list[Goal]
    resource_needs: dict[str, float | int | str]
    sources: list[Source]


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class _TreeSampler:
    """Accumulates per-process counters; a process's last reading stands after it exits."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, int, int, int, int, int]] = {}
        self.thread_samples: list[int] = []

    def sample(self, procs: list[psutil.Process]) -> None:
        threads = 0
        for p in procs:
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    cs = p.num_ctx_switches()
                    n = p.num_threads()
                    try:
                        io = p.io_counters()
                        rb, wb = io.read_bytes, io.write_bytes
                    except (psutil.AccessDenied, AttributeError):
                        rb = wb = 0
                self.last[p.pid] = (ct.user + ct.system, cs.voluntary, cs.involuntary, n, rb, wb)
                threads += n
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass
        self.thread_samples.append(threads)

    def metrics(self, children_cpu: float = 0.0) -> ProcessTreeMetrics:
        v = list(self.last.values())
        return ProcessTreeMetrics(
            processes_seen=len(v),
            max_threads=max(self.thread_samples or [0]),
            avg_threads=round(sum(self.thread_samples) / max(1, len(self.thread_samples)), 2),
            cpu_time_s=round(max(sum(x[0] for x in v), children_cpu), 3),
            voluntary_ctx_switches=sum(x[1] for x in v),
            involuntary_ctx_switches=sum(x[2] for x in v),
            read_bytes=sum(x[4] for x in v), write_bytes=sum(x[5] for x in v))


def _parse_perf_csv(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[0] and not parts[0].startswith("<"):
            try:
                out[parts[2]] = float(parts[0])
            except ValueError:
                pass
    return out


def parse_runqlat(text: str) -> RunqlatHistogram | None:
    buckets = []
    for m in re.finditer(r"^\s*(\d+)\s*->\s*(\d+)\s*:\s*(\d+)", text, re.M):
        buckets.append((int(m[1]), int(m[2]), int(m[3])))
    if not buckets:
        return None
    total = sum(b[2] for b in buckets)

    def pct(q: float) -> float | None:
        if not total:
            return None
        acc = 0
        for lo, hi, n in buckets:
            acc += n
            if acc >= q * total:
                return float(hi)
        return float(buckets[-1][1])

    return RunqlatHistogram(buckets=buckets, p50_us=pct(0.5), p99_us=pct(0.99))


#: rates become features on a log scale (10/s and 10000/s must differ more than 5000/s and 10000/s
#: do); a feature reaches 1.0 at 10**decades events (or bytes) per second
RATE_DECADES = {"wakeup_intensity": 4, "preemption": 4, "fork_intensity": 3, "io": 9}


def scale_rate(feature: str, per_s: float) -> float:
    """A per-second rate as a 0..1 similarity feature (shared with the live callbacks watcher)."""
    return round(min(1.0, math.log10(1 + max(per_s, 0.0)) / RATE_DECADES[feature]), 3)


def characterize(tree: ProcessTreeMetrics, wall: float, ncpus: int,
                 sys_forks: float) -> Characteristics:
    wall = max(wall, 1e-3)
    util = min(1.0, tree.cpu_time_s / (wall * ncpus))
    parallelism = tree.cpu_time_s / wall
    vol = tree.voluntary_ctx_switches / wall
    invol = tree.involuntary_ctx_switches / wall
    forks = max(tree.processes_seen - 1, sys_forks) / wall
    io_rate = ((tree.read_bytes or 0) + (tree.write_bytes or 0)) / wall
    features = {
        "cpu_utilization": round(util, 3),
        "wakeup_intensity": scale_rate("wakeup_intensity", vol),
        "preemption": scale_rate("preemption", invol),
        "fork_intensity": scale_rate("fork_intensity", forks),
        "io": scale_rate("io", io_rate),
    }
    return Characteristics(
        # CPU-bound: it keeps at least half a CPU busy and rarely sleeps per CPU-second it gets
        # (utilization alone would call a hog "light" on a machine busy with other work)
        cpu_bound=parallelism >= 0.5 and vol / max(parallelism, 0.01) < 200,
        latency_sensitive=vol >= 1000,
        many_short_lived_processes=forks >= 20,
        parallelism=round(parallelism, 2),
        io_heavy=features["io"] >= 0.75,  # >= ~10 MB/s of reads + writes
        cpu_utilization=round(util, 3),
        voluntary_switch_rate=round(vol, 1),
        involuntary_switch_rate=round(invol, 1),
        fork_rate=round(forks, 1),
        features=features,
    )


def derive_goals(c: Characteristics, has_command: bool) -> list[Goal]:
    goals: list[Goal] = []
    if c.latency_sensitive:
        goals.append(Goal(metric="wakeup_latency_us", direction="lower", target_ratio=0.9,
                          why=f"{c.voluntary_switch_rate:.0f} voluntary switches/s: tasks sleep and "
                              "wake often, so wakeup latency dominates"))
    if c.cpu_bound or c.many_short_lived_processes:
        goals.append(Goal(metric="throughput", direction="higher", target_ratio=1.0,
                          why="CPU-bound or fork-heavy: keep total work per second at least "
                              "the default scheduler's"))
    if has_command:
        goals.append(Goal(metric="wall_time_s", direction="lower", target_ratio=1.0,
                          why="the workload should not finish later than under the default"))
    if not goals:
        goals.append(Goal(metric="wakeup_latency_us", direction="lower", target_ratio=1.0,
                          why="light workload: do no harm to responsiveness"))
    return goals


def summarize(c: Characteristics, tree: ProcessTreeMetrics, wall: float, ncpus: int,
              what: str) -> str:
    kinds = [k for k, on in (("CPU-bound", c.cpu_bound), ("latency-sensitive", c.latency_sensitive),
                             ("fork/exec-heavy", c.many_short_lived_processes),
                             ("I/O-heavy", c.io_heavy)) if on] or ["light"]
    return (f"{what} ran {wall:.1f}s and is {', '.join(kinds)}: it kept {c.parallelism:.2f} of "
            f"{ncpus} CPUs busy ({c.cpu_utilization:.0%} utilization), used up to "
            f"{tree.max_threads} threads in {tree.processes_seen} processes, "
            f"{c.voluntary_switch_rate:.0f} voluntary and {c.involuntary_switch_rate:.0f} involuntary "
            f"context switches/s, {c.fork_rate:.1f} new processes/s.")


def repeated(shell_command: str, min_s: float, setup: str = "") -> list[str]:
    """`shell_command` run again and again (at least once) until `min_s` seconds have passed: a
    benchmark that ends in a fraction of a second is too short for steady rates at the process
    tree's 10 Hz sampling. Its output goes to /dev/null."""
    return ["sh", "-c", f"{setup}end=$(($(date +%s) + {int(math.ceil(min_s))})); "
                        f"while [ $(date +%s) -lt $end ]; do {shell_command} >/dev/null; done"]


def profile_workload(command: list[str] | str | None = None, pid: int | None = None,
                     duration_s: float = 10.0, *, use_perf: bool = True, use_runqlat: bool = True,
                     progress: Callable[[str, float], None] | None = None,
                     actor: str = "cli", repeat_s: float = 0.0) -> WorkloadProfile:
    """Profile `command` (run to completion, at most `duration_s`; with `repeat_s`, run again and
    again until that many seconds have passed) or attach to `pid` for `duration_s`; store and
    return the WorkloadProfile. An MCP client (`actor="mcp"`) may run only the commands the
    operator allowed (`access.check_command`). The command's whole process tree is ended with the
    profile, and none of its output is kept: only the measured figures."""
    from .. import access, config

    if (command is None) == (pid is None):
        raise BadInput("give exactly one of command or pid",
                       "e.g. `schedcp profile -- hackbench -g 4` or `--pid 1234` "
                       "(MCP: command=['hackbench','-g','4'] or pid=1234)")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
        raise BadInput(f"pid={pid!r} is not a process id", "give a positive pid of a running process")
    duration_s = float(duration_s)
    if not 0.2 <= duration_s <= 3600:
        raise BadInput(f"duration_s={duration_s} out of range", "use 0.2 .. 3600 seconds")
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as e:
            raise BadInput(f"cannot parse the command: {e}") from None
    if command is not None and not command:
        raise BadInput("empty command", "give the program and its arguments")
    if command is not None:
        access.check_command(command, actor)
        if shutil.which(command[0]) is None:
            raise BadInput(f"command not found: {command[0]!r}", "give a program on PATH or a path")
        if repeat_s:
            if not 0 < repeat_s <= duration_s:
                raise BadInput(f"repeat_s={repeat_s} must be within 0 < repeat_s <= duration_s "
                               f"({duration_s:g})", "e.g. repeat_s=3 for a sub-second benchmark")
            command = repeated(shlex.join(command), repeat_s)
    with tempfile.TemporaryDirectory(prefix="prof-", dir=config.runtime_dir()) as tmp:
        prof = _profile(command, pid, duration_s, Path(tmp), use_perf, use_runqlat, progress)
    store.put(KIND, prof)
    return prof


def _contain_prefix() -> list[str]:
    """Run a workload as init of its own pid namespace: when that process ends, the kernel ends
    every process left in the namespace (daemons and setsid children included). Empty where
    namespaces are not available; then its session and every descendant seen are killed."""
    global _CONTAIN
    if _CONTAIN is None:
        prefix = ["unshare", "--pid", "--fork", "--kill-child"]
        if os.geteuid() != 0:
            prefix.insert(1, "--map-current-user")
        try:
            ok = subprocess.run([*prefix, "true"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        _CONTAIN = prefix if ok else []
    return _CONTAIN


_CONTAIN: list[str] | None = None


def _is_unshare(p: psutil.Process) -> bool:
    try:
        return p.name() == "unshare"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _drain(f) -> None:
    with f:
        while f.read(65536):
            pass


def _end_tree(proc: subprocess.Popen, seen: dict[int, float]) -> None:
    """SIGKILL what is left of a workload: its session, then any descendant seen while sampling
    (matched by start time, so a recycled pid is left alone)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p_pid, created in seen.items():
        try:
            p = psutil.Process(p_pid)
            if p.create_time() == created:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _profile(command: list[str] | None, pid: int | None, duration_s: float, tmp: Path,
             use_perf: bool, use_runqlat: bool,
             progress: Callable[[str, float], None] | None) -> WorkloadProfile:
    """Start the system-wide probes, run (or watch) the workload while sampling its process tree,
    then read the probes and characterize what was seen."""
    avail = {t.name: t for t in tools()}
    sources: list[Source] = []
    ncpus = psutil.cpu_count() or 1
    perf_out = tmp / "perf.csv"
    perf_ok = use_perf and avail.get("perf") is not None and avail["perf"].usable
    events = "task-clock,context-switches,cpu-migrations,page-faults"
    if perf_ok and avail.get("perf-hw-counters") and avail["perf-hw-counters"].usable:
        events += ",cycles,instructions"
    if pid is not None:
        try:
            psutil.Process(pid)
        except psutil.NoSuchProcess:
            raise NotFound(f"no process with pid {pid}", "list processes with `schedcp stats`") from None

    runqlat = _start_runqlat(avail, use_runqlat, duration_s, sources)
    s0, t0_cpu = read_proc_stat(), psutil.cpu_times()
    try:
        perf_cmd = [avail["perf"].path, "stat", "-x,", "-o", str(perf_out), "-e", events] if perf_ok else None
        wall, exit_code, sampler = _run_and_sample(command, pid, duration_s, perf_cmd, progress)
    except BaseException:
        _stop(runqlat)
        raise
    s1, t1_cpu = read_proc_stat(), psutil.cpu_times()

    perf = {}
    if perf_ok:
        perf = _parse_perf_csv(perf_out.read_text() if perf_out.exists() else "")
        sources.append(Source(name="perf stat", used=bool(perf), detail=f"events: {events}; "
                              + avail["perf"].detail))
    else:
        sources.append(Source(name="perf stat", used=False,
                              detail=(avail["perf"].detail if "perf" in avail else "not installed")
                              if use_perf else "disabled"))
    hist = _read_runqlat(runqlat, max(3.0, duration_s - wall + 5), sources)
    sources.append(Source(name="psutil process tree", used=True,
                          detail=f"{len(sampler.thread_samples)} samples at 10 Hz"))
    sources.append(Source(name="/proc/stat", used=True))
    bcc = avail.get("bcc")
    sources.append(Source(name="bcc", used=False, detail=bcc.detail if bcc else "not installed"))

    if command is not None and exit_code not in (0, None) and wall < duration_s:
        raise BadInput(f"the workload failed: {shlex.join(command)[:200]} exited with {exit_code}",
                       "run it by hand to see why (its output is not kept)")

    tree = sampler.metrics(children_cpu=perf.get("task-clock", 0.0) / 1000.0)
    ch = characterize(tree, wall, ncpus, s1["processes"] - s0["processes"] if command else 0)
    what = shlex.join(command) if command else f"pid {pid}"
    return WorkloadProfile(
        id=store.new_id("prof"), created_at=time.time(), command=command, pid=pid,
        duration_s=round(wall, 3), exit_code=exit_code, ncpus=ncpus,
        summary=summarize(ch, tree, wall, ncpus, what), characteristics=ch, process_tree=tree,
        system=_system_rates(s0, s1, t0_cpu, t1_cpu, wall), perf_counters=perf, runqlat=hist,
        goals=derive_goals(ch, command is not None),
        resource_needs={"cpus": max(1, round(ch.parallelism + 0.49)),
                        "threads": tree.max_threads, "cpu_time_s": tree.cpu_time_s},
        sources=sources)


def _start_runqlat(avail: dict, use_runqlat: bool, duration_s: float,
                   sources: list[Source]) -> subprocess.Popen | None:
    """libbpf-tools runqlat, system-wide, for the run (when it works here)."""
    rq = avail.get("libbpf-tools/runqlat")
    if use_runqlat and rq and rq.usable:
        p = subprocess.Popen([rq.path, str(max(1, int(duration_s))), "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(0.3)  # let it attach before the workload starts
        return p
    if use_runqlat:
        sources.append(Source(name="runqlat", used=False,
                              detail=rq.detail if rq else "libbpf-tools not installed"))
    return None


def _read_runqlat(runqlat: subprocess.Popen | None, timeout_s: float,
                  sources: list[Source]) -> RunqlatHistogram | None:
    if runqlat is None:
        return None
    if runqlat.poll() is None:  # SIGINT makes runqlat print what it has so far and exit
        os.killpg(runqlat.pid, signal.SIGINT)
    try:
        out, err = runqlat.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(runqlat)
        sources.append(Source(name="runqlat", used=False, detail="runqlat did not finish"))
        return None
    hist = parse_runqlat(out)
    sources.append(Source(name="runqlat", used=hist is not None,
                          detail="libbpf-tools runqlat, system-wide" if hist else err[-300:]))
    return hist


def _run_and_sample(command: list[str] | None, pid: int | None, duration_s: float,
                    perf_cmd: list[str] | None, progress: Callable[[str, float], None] | None
                    ) -> tuple[float, int | None, "_TreeSampler"]:
    """Run `command` contained (or watch `pid`) for at most `duration_s`, sampling its process tree
    at 10 Hz; perf stat counts it when `perf_cmd` is given. Returns (wall seconds, exit code,
    sampler). Whatever the command left running is killed."""
    start = time.monotonic()
    proc: subprocess.Popen | None = None
    perf_attach: subprocess.Popen | None = None
    exit_code = None
    contain: list[str] = []
    seen: dict[int, float] = {}
    wrappers: set[int] = set()
    try:
        if command is not None:
            contain = _contain_prefix()
            # perf stays outside the namespace (inside it, it sometimes reports exit 0 for a failed
            # workload); a shell is the namespace's init, so the workload still gets our SIGINT
            contained = [*contain, "sh", "-c", '"$@"; exit $?', "sh", *command] if contain else command
            argv = [*perf_cmd, "--", *contained] if perf_cmd else contained
            # no output of the workload is kept or returned: only what we measure. (stdout is a
            # drained pipe, not /dev/null: `perf stat` exits 0 whatever the workload did when its
            # stdout is /dev/null.)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            root = psutil.Process(proc.pid)
        else:
            root = psutil.Process(pid)
            if perf_cmd:
                perf_attach = subprocess.Popen([*perf_cmd, "-p", str(pid), "--", "sleep", str(duration_s)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True)
        sampler = _TreeSampler()
        while True:
            elapsed = time.monotonic() - start
            procs = _tree(root)
            if contain:  # unshare and the namespace's init shell are ours, not the workload's
                for p in procs:
                    if p.pid not in wrappers and _is_unshare(p):
                        wrappers.add(p.pid)
                        wrappers.update(c.pid for c in _children(p))
                procs = [p for p in procs if p.pid not in wrappers]
            if proc is not None:
                for p in procs:
                    try:
                        seen.setdefault(p.pid, p.create_time())
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
            sampler.sample(procs)
            if progress:
                progress("profiling", min(1.0, elapsed / duration_s))
            if proc is not None and proc.poll() is not None:
                break
            if elapsed >= duration_s:
                break
            if pid is not None and not root.is_running():
                break
            time.sleep(0.1)
        wall = time.monotonic() - start
        if proc is not None:
            if proc.poll() is None:  # ran past duration_s: stop it, the profile covers what we saw
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            exit_code = proc.returncode
        if perf_attach is not None:
            perf_attach.wait(duration_s + 10)
    except BaseException:
        _stop(perf_attach)
        raise
    finally:
        if proc is not None:
            _end_tree(proc, seen)
    return wall, exit_code, sampler


def _system_rates(s0: dict, s1: dict, t0_cpu, t1_cpu, wall: float) -> dict[str, float]:
    """System-wide rates over the run: context switches, forks, iowait, CPU pressure."""
    dcpu = {f: getattr(t1_cpu, f) - getattr(t0_cpu, f) for f in t0_cpu._fields}
    rates = {
        "ctx_switches_per_s": round((s1["ctxt"] - s0["ctxt"]) / wall, 1),
        "forks_per_s": round((s1["processes"] - s0["processes"]) / wall, 1),
        "iowait_percent": round(100.0 * dcpu.get("iowait", 0.0) / max(sum(dcpu.values()), 1e-9), 2),
    }
    psi = read_psi("cpu")
    if psi.available and psi.some_avg10 is not None:
        rates["psi_cpu_some_avg10"] = psi.some_avg10
    return rates


def _stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def list_profiles(limit: int = 20) -> list[WorkloadProfile]:
    return store.list_records(KIND, WorkloadProfile, limit=limit)


def get_profile(profile_id: str) -> WorkloadProfile:
    return store.require(KIND, profile_id, WorkloadProfile, "workload profile",
                         "no profiles yet: run profile_workload first")
