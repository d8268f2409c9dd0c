"""Layer 3: token-gated deploy, status, rollback, and the deployment record.

deploy(token): check and spend the token -> check the target is ready (host: sched_ext, BPF
permission, and a human at the CLI or a server started with --allow-host-deploy) -> record the
previous state -> measure the baseline metric -> load -> confirm `enabled` + ops name (on any failure
restore the previous state) -> start the monitor. Every step that changes a kernel is audited.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field

from .. import config, store
from ..errors import BadInput, InfrastructureError, NotFound, SchedcpError
from ..learn.feedback import record_deployment_outcome
from ..models import Deployment, DeploymentStatus, MonitorPolicy, ScxState
from ..records import active, get_deployment, list_deployments, save
from ..reports import get_report, invalidate
from ..verify.verifier import host_missing
from . import scope as scope_mod
from . import tokens
from .scope import Scope
from .targets import HostTarget, SandboxTarget, Target, get_target

DEFAULT_METRIC = "hackbench -g 2 -l 100"


class DryRun(BaseModel):
    dry_run: bool = True
    report_id: str
    artifact_sha256: str
    target: str
    would: list[str]
    current_state: ScxState | None = None


def host_allowed(actor: str) -> str | None:
    """Why a host deploy is not allowed for this actor (None = allowed)."""
    missing = host_missing()
    if actor != "cli" and os.environ.get("SCHEDCP_ALLOW_HOST_DEPLOY") != "1":
        missing.append("no one allowed MCP clients to deploy to the host (a human runs `schedcp deploy "
                       "--token T --target host`, or starts the server with --allow-host-deploy)")
    return "; ".join(missing) or None


def threshold_from_goals(goals) -> float:
    """How much worse than the pre-deploy baseline a deployment may get before it is rolled back.
    A do-no-harm goal gives its own bound (`wall_time_s lower 1.3` -> 1.3; `throughput higher 0.8`
    -> 1/0.8); an improvement goal (lower < 1 or higher > 1) tolerates only noise; no bound is below
    1.05 (the noise of a monitor sample); the tightest goal wins; no goals: 1.10."""
    if not goals:
        return 1.10
    bounds = []
    for g in goals:
        r = g.target_ratio
        if r is None:
            bounds.append(1.05)
        elif g.direction == "lower":
            bounds.append(max(r, 1.05))
        else:
            bounds.append(max(1 / r, 1.05) if r > 0 else 1.05)
    return round(min(bounds), 4)


def command_argv(cmd: str, what: str) -> list[str]:
    """A metric or workload command as the argv that is both checked and run (shell words, split
    once; no shell ever parses it afterwards: use `sh -c '…'` explicitly for shell syntax)."""
    from ..access import argv

    return argv(cmd, what)


def _median_metric(t: Target, cmd: str, n: int = 3) -> float:
    words = command_argv(cmd, "metric command")
    return statistics.median(t.run_metric(words) for _ in range(n))


class DeployRequest(BaseModel):
    """What a deployment is asked (the MCP deploy tool and `schedcp deploy` build it): the single-use
    token, the target, a dry run or not, the monitor, and the scope (None: system-wide)."""
    token: str
    target: Literal["sandbox", "host"] = "sandbox"
    dry_run: bool = False
    monitor: MonitorPolicy = Field(default_factory=MonitorPolicy)
    scope: Scope | None = None


def deploy(token: str | DeployRequest, target: str = "sandbox", *, actor: str = "cli", dry_run: bool = False,
           monitor: MonitorPolicy | None = None, start_monitor: bool = True,
           scope: Scope | None = None) -> Deployment | DryRun:
    """Deploy a validated scheduler with its token (a DeployRequest, or its fields). `scope`
    (deploy.scope): load it in partial mode and move only those tasks to SCHED_EXT; None: system-wide
    (the token must allow it)."""
    if isinstance(token, DeployRequest):
        token, target, dry_run, monitor, scope = token.token, token.target, token.dry_run, token.monitor, token.scope
    monitor = monitor or MonitorPolicy()
    scoped = scope is not None
    if target == "host":
        why = host_allowed(actor)
        if why:
            tokens.check(token, target, actor, spend=False)  # a bad token is reported first
            store.audit(actor, "deploy_refused", {"why": why, "target": target})
            raise tokens.TokenRefused(f"host deploy refused: {why}",
                                      "deploy to the sandbox target, or fix what is missing")
        from ..access import check_command

        for cmd, what in ((monitor.metric_cmd, "metric command"), (monitor.workload_cmd, "workload command"),
                          (shlex.join(scope.command) if scope and scope.command else None, "scoped command")):
            if cmd:  # these run on the host itself: the very argv checked here is the one executed
                check_command(command_argv(cmd, what), actor, what)
    # check first, spend only when the target can take it: a refusal must not burn the token
    payload, report = tokens.check(token, target, actor, spend=False, scoped=scoped)
    if scoped and report.layer1.program_args is not None:
        raise BadInput("a scheduler program sets its own partial mode (e.g. scx_qmap -p): a scoped deploy "
                       "loads a BPF object with the loader's --partial", "deploy the program system-wide, "
                       "or validate and deploy a BPF object")
    if monitor.max_degradation_ratio is None:
        monitor = monitor.model_copy(update={"max_degradation_ratio": threshold_from_goals(report.goals)})
    obj = Path(report.object_path).read_bytes()
    t = get_target(target)
    if dry_run:
        cur = t.state() if t.running() else None
        would = [f"record the current scheduler state ({cur.state if cur else 'staging VM not running'})"]
        if monitor.workload_cmd:
            would.append(f"start the background workload: {monitor.workload_cmd}")
        if scoped:
            would.append(f"load it in partial mode (SCX_OPS_SWITCH_PARTIAL) and move {scope.describe()} to "
                         "SCHED_EXT; every other task stays on the default scheduler")
        would += [f"measure the baseline: {monitor.metric_cmd or DEFAULT_METRIC} x3",
                  f"load {report.policy or 'source'} (ops {report.ops_name}, artifact "
                  f"{report.artifact_sha256[:12]}) into the {target} kernel with params {report.params}",
                  "confirm sched_ext state=enabled and root/ops",
                  f"monitor every {monitor.interval_s}s; roll back after {monitor.consecutive} samples "
                  f"worse than {monitor.max_degradation_ratio}x baseline or if the kernel disables it"]
        store.audit(actor, "deploy_dry_run", {"report_id": report.id, "target": target},
                    report.artifact_sha256)
        return DryRun(report_id=report.id, artifact_sha256=report.artifact_sha256, target=target,
                      would=would, current_state=cur)

    # never two schedulers: ours already active here is unloaded first (superseded); one we did not
    # load is left alone — we could not restore it after a rollback
    prev_dep = active(target)
    current = t.state()
    if current.enabled and (prev_dep is None or current.ops != prev_dep.ops_name):
        # the loser of two concurrent deploys of one token sees the winner's scheduler: say what
        # really happened (this raises "token was already used" when it was)
        tokens.check(token, target, actor, spend=False, scoped=scoped)
        store.audit(actor, "deploy_refused", {"why": f"foreign scheduler {current.ops} running",
                                              "target": target}, report.artifact_sha256)
        raise InfrastructureError(
            f"another sched_ext scheduler ({current.ops}) is running on {target}, not deployed by "
            "this schedcp", "stop it first; the token was not spent")
    payload, report = tokens.check(token, target, actor, spend=True, scoped=scoped)
    if prev_dep is not None:
        end_deployment(prev_dep, "superseded", f"superseded by a deploy of report {report.id}", actor)
    previous = current
    if monitor.workload_cmd:
        t.start_workload(command_argv(monitor.workload_cmd, "workload command"))
    metric_cmd = monitor.metric_cmd or DEFAULT_METRIC
    monitor = monitor.model_copy(update={"metric_cmd": metric_cmd})
    baseline = _median_metric(t, metric_cmd)
    d = Deployment(id=store.new_id("dep"), created_at=time.time(), report_id=report.id,
                   artifact_sha256=report.artifact_sha256, policy=report.policy, params=report.params,
                   ops_name=report.ops_name, target=target, actor=actor, token_jti=payload.jti,
                   previous=previous, baseline=baseline, monitor=monitor,
                   scope=scope.describe() if scope else None)
    started = t.load(obj, report.params, program_args=report.layer1.program_args, partial=scoped)
    now = t.state()
    if not started.running or not now.enabled or (report.ops_name and now.ops != report.ops_name):
        why = started.error or (f"after loading, sched_ext state is {now.state!r} with ops {now.ops!r} "
                                f"(expected enabled / {report.ops_name})")
        end_deployment(d, "failed", f"the scheduler did not start: {why}", actor)
        raise InfrastructureError(d.end_reason, f"`schedcp feedback {d.id} --json` has the scheduler's exit")
    if scope is not None:
        try:
            r = t.sh(scope_mod.move_script(t.run_dir, scope), 60, {"schedcp-setclass": scope_mod.setclass_binary()})
            d.scope_pid = scope_mod.check_moved(r.stdout + r.stderr, r.rc, scope)
        except SchedcpError as e:
            end_deployment(d, "failed", f"the scope could not be moved to the scheduler: {e.message}", actor)
            raise
    save(d)
    store.audit(actor, "deploy", {"deployment_id": d.id, "report_id": report.id, "target": target,
                                  "ops": report.ops_name, "baseline": baseline, "scope": d.scope or "system",
                                  "previous": previous.model_dump()}, d.artifact_sha256)
    if start_monitor:
        spawn_monitor(d)
    return d


def end_deployment(d: Deployment, status: DeploymentStatus, reason: str, actor: str) -> Deployment:
    """End a deployment, the one way: unload its scheduler (when its target is still up), read why
    the scheduler stopped in its own and the kernel's words, stop the background workload, put the
    previous scheduler back (after a rollback or a failed start), and record it all: the deployment,
    the audit log and the learning outcome. A reason gets the scheduler's exit appended when the
    scheduler ended with an error."""
    t = get_target(d.target, start=False)
    if t.running():  # a staging VM that is gone took the scheduler with it
        try:
            t.unload()
            if d.scope:  # the kernel leaves SCHED_EXT tasks at policy 7 after the unload: put them back
                t.sh(scope_mod.restore_script(t.run_dir), 60)
            ex = t.read_exit(d.ops_name)
            d.exit_info = ex.raw[-2000:] or d.exit_info
            if ex.exit.kind != "unknown":
                d.exit = ex.exit
        except SchedcpError:
            pass
        if d.monitor.workload_cmd and status != "superseded":
            try:
                t.stop_workload()
            except SchedcpError:
                pass
        if status in ("rolled_back", "failed"):
            _restore_previous(t, d, actor)
    if d.exit and d.exit.is_error and d.exit.describe() not in reason:
        reason = f"{reason}: {d.exit.describe()}"
    d.status, d.ended_at, d.end_reason = status, time.time(), reason
    save(d)
    if status in ("rolled_back", "failed"):  # it hurt or did not start: no token for it again
        try:  # without a new validation
            invalidate(d.report_id, f"deployment {d.id} {status.replace('_', ' ')}: {reason}"[:500], actor)
        except SchedcpError:
            pass  # the report is gone: nothing to redeploy from
    store.audit(actor, {"rolled_back": "rollback", "failed": "deploy_failed"}.get(status, status),
                {"deployment_id": d.id, "reason": reason, "target": d.target,
                 "exit": d.exit.model_dump() if d.exit else None}, d.artifact_sha256)
    record_deployment_outcome(d)
    return d


def _restore_previous(t: Target, d: Deployment, actor: str) -> None:
    """A deployment `d` superseded is loaded again; otherwise the kernel default stays."""
    for p in list_deployments(50, d.target):
        if p.status == "superseded" and p.id != d.id and p.ops_name == d.previous.ops:
            r = get_report(p.report_id)
            t.load(Path(r.object_path).read_bytes(), r.params)
            p.status, p.ended_at, p.end_reason = "active", None, None
            save(p)
            spawn_monitor(p)
            store.audit(actor, "restore_previous", {"deployment_id": p.id}, p.artifact_sha256)
            return


def rollback(deployment_id: str | None = None, target: str = "sandbox", reason: str = "requested",
             actor: str = "cli") -> Deployment:
    d = get_deployment(deployment_id) if deployment_id else active(target)
    if d is None:
        raise NotFound(f"nothing is deployed on {target}", "see `schedcp status`")
    if d.target == "host" and actor != "cli" and os.environ.get("SCHEDCP_ALLOW_HOST_DEPLOY") != "1":
        raise tokens.TokenRefused("rolling back changes this host's kernel, and no one allowed MCP clients "
                                  "to do that", "a human runs `schedcp rollback --target host`, or starts "
                                  "the server with --allow-host-deploy")
    if d.status != "active":
        raise BadInput(f"deployment {d.id} is not active ({d.status}: {d.end_reason})", "")
    return end_deployment(d, "rolled_back", reason, actor)


# --- the monitor process -----------------------------------------------------------------------

def spawn_monitor(d: Deployment) -> int:
    """Start the monitor as its own process (it outlives the CLI and survives server restarts)."""
    log = config.open_private(config.home() / f"monitor-{d.id}.log")
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp.deploy.monitor", d.id],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "SCHEDCP_HOME": str(config.home())})
    d.monitor_pid = p.pid
    save(d)
    return p.pid


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def resume_monitors() -> list[str]:
    """Restart the monitor of every active deployment whose monitor process is gone."""
    resumed = []
    for d in list_deployments():
        if d.status == "active" and not _pid_alive(d.monitor_pid):
            spawn_monitor(d)
            store.audit("server", "monitor_resumed", {"deployment_id": d.id}, d.artifact_sha256)
            resumed.append(d.id)
    return resumed


class StatusReport(BaseModel):
    deployments: list[Deployment]
    targets: dict[str, ScxState | str]


def status() -> StatusReport:
    deps = [d for d in list_deployments(20)]
    targets: dict[str, ScxState | str] = {}
    try:
        targets["host"] = HostTarget().state()
    except Exception as e:  # noqa: BLE001 - status must always answer
        targets["host"] = f"unreadable: {e}"
    sb = SandboxTarget(start=False)
    if sb.running():
        try:
            targets["sandbox"] = sb.state()
        except SchedcpError as e:
            targets["sandbox"] = f"staging VM busy or unreachable: {e.message}"
    else:
        targets["sandbox"] = "staging VM not running"
    return StatusReport(deployments=deps, targets=targets)

