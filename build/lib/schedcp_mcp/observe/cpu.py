"""`get_cpu_stats`: what the CPUs and the scheduler are doing right now, over one interval.

Sources: psutil (per-CPU times, context switches, interrupts), /proc/stat (run queue), /proc/schedstat
(run and wait time per CPU, only when the kernel has SCHEDSTATS), /proc/pressure/cpu (PSI).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
    7: "SCHED_EXT",
}


class CpuTimesSplit(BaseModel):
    cpu: int
    user: float = Field(description="% of the interval")
    nice: float
    system: float
    iowait: float
    irq: float
    softirq: float
    steal: float
    idle: float
    busy: float = Field(description="100 - idle - iowait")


class SchedstatCpu(BaseModel):
    cpu: int
    run_ms_per_s: float = Field(description="time tasks spent running on this CPU, ms per second")
    wait_ms_per_s: float = Field(description="time runnable tasks waited on its run queue, ms per s")
    timeslices_per_s: float


class Schedstat(BaseModel):
    available: bool
    reason: str | None = None
    cpus: list[SchedstatCpu] = []
    avg_wait_per_timeslice_us: float | None = Field(
        None, description="mean scheduling delay: run-queue wait divided by timeslices")


class Psi(BaseModel):
    available: bool
    reason: str | None = None
    some_avg10: float | None = None
    some_avg60: float | None = None
    some_avg300: float | None = None
    full_avg10: float | None = None
    full_avg60: float | None = None
    full_avg300: float | None = None


class TopProcess(BaseModel):
    pid: int
    name: str
    cpu_percent: float = Field(description="% of one CPU over the interval")
    policy: str
    nice: int
    num_threads: int


class CpuStats(BaseModel):
    interval_s: float
    ncpus: int
    per_cpu: list[CpuTimesSplit]
    total_busy_percent: float
    load_avg: tuple[float, float, float]
    ctx_switches_per_s: float
    interrupts_per_s: float
    soft_interrupts_per_s: float
    forks_per_s: float
    procs_running: int = Field(description="runnable tasks right now (/proc/stat procs_running)")
    procs_blocked: int
    schedstat: Schedstat
    psi_cpu: Psi
    top_processes: list[TopProcess]


def read_proc_stat() -> dict[str, int]:
    """Counters from /proc/stat: ctxt, intr, processes, procs_running, procs_blocked, softirq."""
    out: dict[str, int] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("ctxt", "intr", "softirq", "processes", "procs_running",
                                  "procs_blocked"):
            out[parts[0]] = int(parts[1])
    return out


def read_psi(resource: str = "cpu") -> Psi:
    path = Path(f"/proc/pressure/{resource}")
    if not path.exists():
        return Psi(available=False, reason=f"{path} missing (kernel without CONFIG_PSI or psi=0)")
    vals: dict[str, float] = {}
    try:
        for line in path.read_text().splitlines():
            kind, *fields = line.split()
            for f in fields:
                k, v = f.split("=")
                if k.startswith("avg"):
                    vals[f"{kind}_{k}"] = float(v)
    except OSError as e:
        return Psi(available=False, reason=f"cannot read {path}: {e.strerror}")
    return Psi(available=True, **vals)


def read_schedstat() -> dict[int, tuple[int, int, int]] | None:
    """cpuN -> (run_ns, wait_ns, timeslices) from /proc/schedstat, or None without SCHEDSTATS."""
    path = Path("/proc/schedstat")
    if not path.exists():
        return None
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0].startswith("cpu") and parts[0][3:].isdigit() and len(parts) >= 10:
            out[int(parts[0][3:])] = (int(parts[7]), int(parts[8]), int(parts[9]))
    return out


def _policy(pid: int) -> str:
    try:
        return POLICY_NAMES.get(os.sched_getscheduler(pid), "unknown")
    except OSError:
        return "unknown"


def get_cpu_stats(interval_s: float = 1.0, top_n: int = 10) -> CpuStats:
    """Sample for `interval_s` seconds and return rates and splits over that interval."""
    interval_s = max(0.1, min(float(interval_s), 60.0))
    procs = {}
    for p in psutil.process_iter(["pid", "name"]):
        try:
            p.cpu_percent(None)
            procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    t0 = psutil.cpu_times(percpu=True)
    s0, ss0 = read_proc_stat(), read_schedstat()
    w0 = time.monotonic()
    time.sleep(interval_s)
    t1 = psutil.cpu_times(percpu=True)
    s1, ss1 = read_proc_stat(), read_schedstat()
    dt = time.monotonic() - w0

    per_cpu = []
    for i, (a, b) in enumerate(zip(t0, t1)):
        d = {f: max(0.0, getattr(b, f) - getattr(a, f)) for f in a._fields}
        total = sum(d.values()) or 1e-9
        pct = {f: round(100.0 * d.get(f, 0.0) / total, 2) for f in
               ("user", "nice", "system", "iowait", "irq", "softirq", "steal", "idle")}
        per_cpu.append(CpuTimesSplit(cpu=i, busy=round(100.0 - pct["idle"] - pct["iowait"], 2), **pct))

    if ss0 is None or ss1 is None:
        schedstat = Schedstat(available=False,
                              reason="/proc/schedstat missing: kernel built without CONFIG_SCHEDSTATS")
    else:
        cpus, wait_total, slices_total = [], 0, 0
        for cpu, (r1, w1, n1) in sorted(ss1.items()):
            r0, w0_, n0 = ss0.get(cpu, (r1, w1, n1))
            wait_total += w1 - w0_
            slices_total += n1 - n0
            cpus.append(SchedstatCpu(cpu=cpu, run_ms_per_s=round((r1 - r0) / 1e6 / dt, 3),
                                     wait_ms_per_s=round((w1 - w0_) / 1e6 / dt, 3),
                                     timeslices_per_s=round((n1 - n0) / dt, 1)))
        schedstat = Schedstat(available=True, cpus=cpus, avg_wait_per_timeslice_us=round(
            wait_total / 1e3 / slices_total, 2) if slices_total else None)

    top = []
    for pid, p in procs.items():
        try:
            with p.oneshot():
                top.append(TopProcess(pid=pid, name=p.name(), cpu_percent=p.cpu_percent(None),
                                      policy=_policy(pid), nice=p.nice(),
                                      num_threads=p.num_threads()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    top.sort(key=lambda t: t.cpu_percent, reverse=True)

    def rate(key: str) -> float:
        return round((s1.get(key, 0) - s0.get(key, 0)) / dt, 1)

    return CpuStats(
        interval_s=round(dt, 3),
        ncpus=len(per_cpu),
        per_cpu=per_cpu,
        total_busy_percent=round(sum(c.busy for c in per_cpu) / max(1, len(per_cpu)), 2),
        load_avg=os.getloadavg(),
        ctx_switches_per_s=rate("ctxt"),
        interrupts_per_s=rate("intr"),
        soft_interrupts_per_s=rate("softirq"),
        forks_per_s=rate("processes"),
        procs_running=s1.get("procs_running", 0),
        procs_blocked=s1.get("procs_blocked", 0),
        schedstat=schedstat,
        psi_cpu=read_psi("cpu"),
        top_processes=top[:top_n],
    )
