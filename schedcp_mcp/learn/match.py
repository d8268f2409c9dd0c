"""Which sandbox workloads stand for a workload profiled on the host.

A candidate scheduler is judged in the sandbox VM on its benchmark workloads; a workload that runs
only on the host (a user's command) is matched to the sandbox workloads whose profiles look most
like it. Each sandbox workload's reference profile is made by running its benchmark command here,
on the host, once per $SCHEDCP_HOME (the newest stored profile of that exact command is reused), and
compared with the same similarity the learning history uses.
"""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, Field

from ..errors import BadInput
from ..observe.profile import WorkloadProfile, get_profile, list_profiles, profile_workload, repeated
from ..workloads import ensure_probe, get_workloads
from .history import similarity

Progress = Callable[[str, float], None]

#: a sandbox workload is a good stand-in at this similarity or above
GOOD_MATCH = 0.75
FEATURE_WORDS = {"wakeup_intensity": "sleep/wake rate", "fork_intensity": "process creation rate",
                 "cpu_utilization": "CPU utilization", "preemption": "preemption rate",
                 "io": "I/O rate"}


class WorkloadMatch(BaseModel):
    workload: str
    similarity: float = Field(description="0..1, 1 = same feature vector")
    reference_profile_id: str = Field(description="the sandbox workload's own profile (run on the host)")
    good: bool = Field(description=f"similarity >= {GOOD_MATCH}")
    reason: str


#: a benchmark run is repeated for at least this long when profiled: one run of a sandbox workload
#: takes well under a second on a host, too short for steady process-tree rates at 10 Hz sampling
MIN_PROFILE_S = 3


def host_command(workload: str) -> list[str]:
    """A sandbox workload's benchmark as it runs on the host (`$PROBE` is our probe binary),
    repeated for MIN_PROFILE_S seconds."""
    w = get_workloads([workload])[0]
    probe = f"PROBE={ensure_probe()}; " if "$PROBE" in w.command else ""
    return repeated(w.command, MIN_PROFILE_S, setup=probe)


def profile_sandbox_workload(workload: str, duration_s: float = 30.0,
                             progress: Progress | None = None) -> WorkloadProfile:
    """Profile a sandbox workload's benchmark by running it on the host. The command is the
    workload's own (chosen by name), never a client's, so it needs no operator permission."""
    return profile_workload(host_command(workload), None, duration_s, progress=progress,
                            actor="schedcp")


def reference_profile(workload: str, progress: Progress | None = None) -> WorkloadProfile:
    cmd = host_command(workload)
    for p in list_profiles(500):
        if p.command == cmd:
            return p
    return profile_workload(cmd, None, 30.0, progress=progress, actor="schedcp")


def explain(target: WorkloadProfile, ref: WorkloadProfile) -> str:
    fa, fb = target.characteristics.features, ref.characteristics.features
    diffs = sorted(((abs(fa.get(k, 0.0) - fb.get(k, 0.0)), k) for k in sorted(set(fa) | set(fb))))
    close = [f"{FEATURE_WORDS.get(k, k)} {fa.get(k, 0):.2f} vs {fb.get(k, 0):.2f}"
             for d, k in diffs if d <= 0.1][:3]
    far = [f"{FEATURE_WORDS.get(k, k)} {fa.get(k, 0):.2f} vs {fb.get(k, 0):.2f}"
           for d, k in reversed(diffs) if d > 0.1][:2]
    ca, cb = target.characteristics, ref.characteristics
    shared = [name for name, a, b in (("latency-sensitive", ca.latency_sensitive, cb.latency_sensitive),
                                      ("CPU-bound", ca.cpu_bound, cb.cpu_bound),
                                      ("fork-heavy", ca.many_short_lived_processes,
                                       cb.many_short_lived_processes),
                                      ("I/O-heavy", ca.io_heavy, cb.io_heavy)) if a and b]
    parts = []
    if shared:
        parts.append("both " + ", ".join(shared))
    if close:
        parts.append("close on " + "; ".join(close))
    if far:
        parts.append("differs on " + "; ".join(far))
    return ". ".join(parts) or "no feature in common"


def match_workloads(profile_id: str, limit: int = 5,
                    progress: Progress | None = None) -> list[WorkloadMatch]:
    """Sandbox workloads ranked by similarity to a stored profile, each with the reason."""
    if not 1 <= limit <= 20:
        raise BadInput(f"limit={limit} out of range", "use 1..20")
    target = get_profile(profile_id)
    # the default set: the opt-in real workloads need the guest (compile's source tree is in the image)
    names = [w.name for w in get_workloads(None)]
    out = []
    for i, name in enumerate(names):
        if progress:
            progress(f"reference profile of {name}", i / len(names))
        ref = reference_profile(name)
        sim = round(similarity(target, ref), 3)
        out.append(WorkloadMatch(workload=name, similarity=sim, reference_profile_id=ref.id,
                                 good=sim >= GOOD_MATCH, reason=explain(target, ref)))
    out.sort(key=lambda m: -m.similarity)
    return out[:limit]
