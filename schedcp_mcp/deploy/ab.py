"""A/B on the target by switching the workload's class (issue #26 part 2).

With the candidate loaded in partial mode (only SCHED_EXT tasks on it), the user's own command runs in
interleaved paired rounds as SCHED_EXT (the candidate) and as SCHED_NORMAL (the default scheduler),
same boot, same machine, the order alternating (ABBA) so that running first or second falls on both
sides. In partial mode the ext class runs below the fair class (a SCHED_EXT task runs only when no fair
task is runnable on its CPU), so part of any difference is the class order and not the policy: the same
rounds are run once more with a plain FIFO (the repository's `fifo`) in partial mode, an A/A of the
mechanism, reported beside the candidate's figure.

The target is the staging VM (`--target sandbox`) or the host (the same code behind the token; a host
needs sched_ext and root). The token is checked, not spent: nothing is deployed, the candidate is
unloaded after its rounds, and every task is back on SCHED_NORMAL at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import time

from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput, InfrastructureError
from ..validate.gates import summarize
from ..validate.models import Workload, WorkloadResult
from ..validate.workloads import ensure_probe, parse_probe_time
from . import scope as scope_mod
from . import tokens
from .targets import Target, get_target

AA_POLICY = "fifo"


class ABResult(BaseModel):
    target: str
    command: list[str]
    report_id: str
    ops_name: str | None
    rounds: int
    candidate: WorkloadResult = Field(description="the command as SCHED_EXT under the candidate (partial) "
                                      "against SCHED_NORMAL")
    aa: WorkloadResult | None = Field(None, description="the same under a plain FIFO in partial mode: what the "
                                      "class order alone does")
    load_average: str = ""
    seconds: float = 0.0


def _workload(command: list[str]) -> Workload:
    return Workload(name="command", description=shlex.join(command), command=shlex.join(command),
                    metric="wall_time_s", unit="s", direction="lower", parser="probe_time")


def _run(t: Target, command: list[str], ext: bool, timeout_s: float) -> float:
    d = t.run_dir
    wrap = [f"{d}/schedcp-setclass", "ext", "exec"] if ext else []
    r = t.sh(shlex.join([*wrap, f"{d}/schedcp-probe", "time", *command]) + " 2>&1", timeout_s)
    try:
        return parse_probe_time(r.stdout)["build_time_s"]
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise InfrastructureError(f"the command failed {'as SCHED_EXT' if ext else 'as SCHED_NORMAL'}: {e}",
                                  "run it by hand in the target to see why") from None


def _side_by_side(t: Target, obj: bytes, params: dict[str, str], command: list[str], rounds: int,
                  timeout_s: float, say) -> tuple[list[float], list[float]]:
    """(SCHED_NORMAL, SCHED_EXT) figures per round, with `obj` loaded in partial mode."""
    started = t.load(obj, params, partial=True)
    if not started.running:
        raise InfrastructureError(f"the scheduler did not start in partial mode: {started.error}")
    normal, ext = [], []
    try:
        for r in range(1, rounds + 1):
            say(f"round {r}/{rounds}", (r - 1) / rounds)
            order = (False, True) if r % 2 else (True, False)
            got = {}
            for e in order:
                got[e] = _run(t, command, e, timeout_s)
            if not t.state().enabled:
                raise InfrastructureError("the kernel disabled the scheduler during the A/B",
                                          "`schedcp feedback` / the kernel log say why")
            normal.append(got[False])
            ext.append(got[True])
    finally:
        t.unload()
        t.sh(scope_mod.restore_script(t.run_dir), 60)
    return normal, ext


def ab(token: str, command: list[str], target: str = "sandbox", *, rounds: int = 5, aa: bool = True,
       timeout_s: float = 120, actor: str = "cli", progress=None) -> ABResult:
    say = progress or (lambda msg, fraction=0.0: None)  # progress(message, fraction done)
    if not command:
        raise BadInput("give the command to measure after `--`", "e.g. schedcp ab --token T -- hackbench -g 2 -l 60")
    if not 2 <= rounds <= 50:
        raise BadInput(f"rounds must be 2..50, not {rounds}")
    if target == "host":
        from ..access import check_command
        from .deployments import host_allowed

        why = host_allowed(actor)
        if why:
            raise tokens.TokenRefused(f"host A/B refused: {why}", "use --target sandbox")
        check_command(list(command), actor, "A/B command")
    _, report = tokens.check(token, target, actor, spend=False, scoped=True)
    if report.layer1.program_args is not None:
        raise BadInput("a scheduler program sets its own partial mode: `schedcp ab` loads a BPF object "
                       "with the loader's --partial")
    t0 = time.monotonic()
    t = get_target(target)
    st = t.state()
    if st.enabled:
        raise InfrastructureError(f"a sched_ext scheduler ({st.ops}) is running on {target}",
                                  "roll it back first (`schedcp rollback`): an A/B needs the default scheduler")
    t.sh(f"mkdir -p {t.run_dir}; cp schedcp-probe schedcp-setclass {t.run_dir}/; "
         f"chmod 0755 {t.run_dir}/schedcp-probe {t.run_dir}/schedcp-setclass", 60,
         {"schedcp-probe": ensure_probe().read_bytes(), "schedcp-setclass": scope_mod.setclass_binary()})
    store.audit(actor, "ab", {"report_id": report.id, "target": target, "command": command, "rounds": rounds},
                report.artifact_sha256)
    w = _workload(command)
    obj = open(report.object_path or "", "rb").read()
    share = 0.5 if aa else 1.0  # of the whole run: the candidate's rounds, then the A/A's
    say(f"{report.ops_name} in partial mode: the command as SCHED_EXT and as SCHED_NORMAL", 0.0)
    n, e = _side_by_side(t, obj, report.params, command, rounds, timeout_s,
                         lambda m, f: say(f"candidate: {m}", f * share))
    out = ABResult(target=target, command=list(command), report_id=report.id, ops_name=report.ops_name,
                   rounds=rounds, candidate=summarize(w, n, e))
    if aa:
        from ..verify.pipeline import verify_policy

        fifo = verify_policy(AA_POLICY)
        if not fifo.accepted or not fifo.object_path:
            raise InfrastructureError(f"the A/A's {AA_POLICY} did not pass layer 1: {fifo.verdict} at {fifo.stage}")
        say(f"A/A: {AA_POLICY} in partial mode, the same rounds", share)
        n, e = _side_by_side(t, open(fifo.object_path, "rb").read(), fifo.params, command, rounds, timeout_s,
                             lambda m, f: say(f"A/A: {m}", share + f * share))
        out.aa = summarize(w, n, e)
    out.load_average = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out.seconds = round(time.monotonic() - t0, 1)
    return out
