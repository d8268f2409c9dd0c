"""The deployment monitor: one process per active deployment (`python -m schedcp_mcp.deploy.monitor
DEPLOYMENT_ID`), state in SQLite, so it survives a server restart (and `resume_monitors` restarts it
if it died).

Every `interval_s` it samples the target: sched_ext state and ops, CPU PSI, context-switch rate and
the deployment's metric command, compared with the baseline measured before the deploy. It rolls back
when the kernel disabled the scheduler (the kernel's reason, e.g. `runnable task stall`, is recorded)
or when the metric is worse than `max_degradation_ratio` x baseline for `consecutive` samples.
"""

from __future__ import annotations

import sys
import time

from .. import store
from ..errors import SchedcpError
from ..models import Deployment, Reading
from ..records import get_deployment, save
from .deployments import command_argv, end_deployment
from .targets import SandboxTarget, get_target

MAX_READINGS = 200


def degraded(d: Deployment, value: float) -> tuple[bool, float | None]:
    if not d.baseline:
        return False, None
    ratio = value / d.baseline
    worse = ratio if d.monitor.metric_direction == "lower" else (1 / ratio if ratio else float("inf"))
    return worse > d.monitor.max_degradation_ratio, round(ratio, 4)


def sample_once(d: Deployment, prev_ctxt: tuple[float, int] | None = None) -> tuple[Reading, tuple[float, int] | None]:
    t = get_target(d.target, start=False)  # never boot a VM: if it is gone, so is the deployment
    st = t.state()
    r = Reading(at=time.time(), state=st.state, ops=st.ops, psi_some_avg10=st.psi_some_avg10)
    if st.ctxt is not None and st.uptime_s is not None:
        if prev_ctxt and st.uptime_s > prev_ctxt[0]:
            r.ctx_switches_per_s = round((st.ctxt - prev_ctxt[1]) / (st.uptime_s - prev_ctxt[0]), 1)
        prev_ctxt = (st.uptime_s, st.ctxt)
    if not st.enabled or (d.ops_name and st.ops != d.ops_name):
        r.note = "scheduler no longer enabled"
        return r, prev_ctxt
    if d.monitor.metric_cmd:
        try:
            r.metric = t.run_metric(command_argv(d.monitor.metric_cmd, "metric command"))
            r.degraded, r.ratio = degraded(d, r.metric)
        except SchedcpError as e:
            r.note = f"metric failed: {e.message}"
    return r, prev_ctxt


def monitor_loop(dep_id: str, max_samples: int | None = None) -> Deployment:
    prev = None
    n = 0
    while True:
        d = get_deployment(dep_id)
        if d.status != "active":
            return d
        if d.target == "sandbox" and not SandboxTarget(start=False).running():
            return end_deployment(d, "stopped", "the staging VM was stopped", "monitor")
        try:
            reading, prev = sample_once(d, prev)
        except SchedcpError as e:  # the VM is busy or gone: note it and try again
            reading = Reading(at=time.time(), state="unknown", note=f"sample failed: {e.message}")
        d = get_deployment(dep_id)  # someone may have rolled back meanwhile
        if d.status != "active":
            return d
        d.readings = (d.readings + [reading])[-MAX_READINGS:]
        d.consecutive_bad = d.consecutive_bad + 1 if reading.degraded else 0
        save(d)
        if reading.state not in ("enabled", "unknown") or (
                reading.state == "enabled" and d.ops_name and reading.ops != d.ops_name):
            return end_deployment(d, "rolled_back", "the kernel disabled the scheduler", "monitor")
        if d.consecutive_bad >= d.monitor.consecutive:
            why = (f"degradation: {d.monitor.metric_cmd!r} was worse than "
                   f"{d.monitor.max_degradation_ratio}x the baseline {d.baseline} for "
                   f"{d.consecutive_bad} consecutive samples (last {reading.metric}, ratio {reading.ratio})")
            return end_deployment(d, "rolled_back", why, "monitor")
        n += 1
        if max_samples is not None and n >= max_samples:
            return d
        time.sleep(d.monitor.interval_s)


def main() -> None:
    dep_id = sys.argv[1]
    store.audit("monitor", "monitor_started", {"deployment_id": dep_id})
    d = monitor_loop(dep_id)
    store.audit("monitor", "monitor_stopped", {"deployment_id": dep_id, "status": d.status})


if __name__ == "__main__":
    main()
