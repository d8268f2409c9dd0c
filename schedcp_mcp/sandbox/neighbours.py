"""What else used the host's CPUs while a validation measured.

A same-boot A/B pairs every candidate run with a default-scheduler run, so a steady neighbour slows
both sides alike; a neighbour that comes and goes (another validation, the staging VM under its
monitor, a build) widens the intervals and can leave a verdict undecided or flip a close one. The
report says so in figures instead of leaving the user to guess: per-process CPU time taken at the
start and the end of the measurement, everything that is not this validation (this process, its
VM and the VM's children) summed and the largest named, plus the hypervisor's steal time. Processes
that started and ended between the two snapshots are not seen (an underestimate).
"""

from __future__ import annotations

import os
import time

import psutil
from pydantic import BaseModel, Field

#: above this many CPUs' worth of others' use (mean over the measurement) a report carries a warning
WARN_OTHERS_CPU = 0.15
#: ...or of the hypervisor's steal time
WARN_STEAL_CPU = 0.1
#: how the warning starts (what `schedcp optimize` picks out of a report's warnings)
BUSY = "busy host"


class HostShare(BaseModel):
    """The host's CPUs while one validation measured."""

    seconds: float
    cpus: int
    others_cpu: float = Field(description="CPUs' worth used by processes other than this validation's "
                              "(mean over the measurement)")
    steal_cpu: float = Field(0.0, description="CPUs' worth the hypervisor took (steal time)")
    busiest: list[str] = Field([], description="the largest other users: `name[pid] 0.21 CPU`")
    load_avg: list[float] = Field([], description="the 1-minute load average at the start and the end")

    def warning(self) -> str | None:
        if self.others_cpu < WARN_OTHERS_CPU and self.steal_cpu < WARN_STEAL_CPU:
            return None
        who = f" (most: {self.busiest[0]})" if self.busiest else ""
        steal = f", the hypervisor {self.steal_cpu:.2f}" if self.steal_cpu >= WARN_STEAL_CPU else ""
        return (f"{BUSY}: others used {self.others_cpu:.2f} of {self.cpus} CPUs while this measured{who}"
                f"{steal}; intervals are wider than on a quiet machine. A staging VM (`schedcp status`) "
                "stops with `schedcp rollback` and `schedcp sandbox stop`")


def _cpu_of(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _snapshot() -> dict[int, tuple[str, float, float]]:
    """pid -> (name, create_time, CPU seconds so far)."""
    out = {}
    for p in psutil.process_iter(["name", "create_time"]):
        try:
            out[p.pid] = (p.info["name"] or "?", p.info["create_time"] or 0.0, _cpu_of(p))
        except psutil.Error:
            continue
    return out


def _own(pids: set[int]) -> set[int]:
    """These processes and all their descendants."""
    out = set(pids)
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return out


class Watch:
    """Snapshot now; `stop(vm_pid)` says what everyone else used since."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.procs = _snapshot()
        self.steal0 = getattr(psutil.cpu_times(), "steal", 0.0)
        self.load0 = os.getloadavg()[0]

    def stop(self, vm_pid: int | None) -> HostShare:
        secs = max(1e-3, time.monotonic() - self.t0)
        now = _snapshot()
        # this process itself, and the validation's VM with its children; not this process's other
        # children: another job's VM in the same pool, or a staging VM this server started, competes
        own = _own({vm_pid} if vm_pid else set()) | {os.getpid()}
        used: dict[int, tuple[str, float]] = {}
        for pid, (name, created, cpu) in now.items():
            if pid in own:
                continue
            before = self.procs.get(pid)
            same = before is not None and abs(before[1] - created) < 1.0  # not a reused pid
            d = cpu - (before[2] if same else 0.0)
            if d > 0:
                used[pid] = (name, d)
        top = sorted(used.items(), key=lambda kv: -kv[1][1])[:3]
        steal = getattr(psutil.cpu_times(), "steal", 0.0) - self.steal0
        return HostShare(seconds=round(secs, 1), cpus=psutil.cpu_count() or 1,
                         others_cpu=round(sum(d for _, d in used.values()) / secs, 3),
                         steal_cpu=round(max(0.0, steal) / secs, 3),
                         busiest=[f"{n}[{pid}] {d / secs:.2f} CPU" for pid, (n, d) in top if d / secs >= 0.02],
                         load_avg=[round(self.load0, 2), round(os.getloadavg()[0], 2)])
