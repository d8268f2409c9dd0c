"""The real kernel verifier: load the object with the sandbox's loader and read what the kernel said.

The loader (`sandbox/guest/loader.c`) runs in the sandbox VM, or on the host when the host kernel
has sched_ext and we may load BPF. In `--verify` mode it fills the `__SCX_*` enum rodata, sets the
parameters, loads every program (the verifier runs here), attaches the ops (the scheduler's
`init` runs here) and detaches at once; with `--load-only` (the host) it stops after the load and
never attaches. It prints one JSON object; its `log` holds libbpf's output,
which for a rejected program contains the kernel verifier log between
`-- BEGIN PROG LOAD LOG --` and `-- END PROG LOAD LOG --`, with `; <source> @ file:line`
annotations when the object was built with `-g`.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InfrastructureError
from ..models import SchedulerExit
from ..sandbox import scheduler
from ..sandbox.scheduler import host_missing
from .models import Stage, VerifyError
_BEGIN = re.compile(r"prog '([^']+)': -- BEGIN PROG LOAD LOG --")
_END = "-- END PROG LOAD LOG --"
_INSN = re.compile(r"^(\d+): \(")
_SRC = re.compile(r"^; (.*?) @ (\S+):(\d+)\s*$")
_PROCESSED = re.compile(r"^processed (\d+) insns")
_STATE = re.compile(r"^(\d+: [RF]\w|from \d+ to \d+:|func#\d+ @\d+|Live regs before insn:|\s*\d+: \.)")
_EXTERN = re.compile(r"libbpf: (extern \([^)]*\) '([^']+)': not found in kernel[^\n]*)")


@dataclass
class VerifierVerdict:
    accepted: bool
    errors: list[VerifyError] = field(default_factory=list)
    log: str = ""                 # the kernel verifier log of the failing program (or libbpf's output)
    verified_insns: dict[str, int] = field(default_factory=dict)
    ops_name: str | None = None
    uei: dict | None = None
    raw: dict = field(default_factory=dict)  # the loader's JSON
    stage: Stage = "verifier"     # where it failed: verifier, or attach/init after the verifier passed
    exit: SchedulerExit | None = None  # why the scheduler stopped, when it was attached and stopped

    @property
    def verifier_accepted(self) -> bool:
        """Every program passed the kernel verifier (also when attaching or init failed later)."""
        return self.accepted or self.stage in ("attach", "init")


def parse_verifier_log(text: str) -> tuple[str | None, str, VerifyError | None]:
    """From libbpf output: (failing program, its verifier log, the error the kernel reported).

    The kernel's message is the lines between the last instruction and `processed N insns`; the
    instruction index is that last instruction's; the source line is the last `; ... @ file:line`
    annotation before it.
    """
    m = _BEGIN.search(text)
    if not m:
        return None, "", None
    prog = m.group(1)
    body = text[m.end():]
    end = body.find(_END)
    log = (body[:end] if end >= 0 else body).strip("\n")
    lines = log.splitlines()

    stop = next((i for i, ln in enumerate(lines) if _PROCESSED.match(ln)), len(lines))
    msg_lines: list[str] = []
    i = stop - 1
    while i >= 0 and not (_INSN.match(lines[i]) or _SRC.match(lines[i]) or _STATE.match(lines[i])):
        if lines[i].strip():
            msg_lines.append(lines[i].strip())
        i -= 1
    msg_lines.reverse()
    insn = src = None
    for j in range(i, -1, -1):
        if insn is None and (mi := _INSN.match(lines[j])):
            insn = int(mi.group(1))
        if (ms := _SRC.match(lines[j])):
            src = ms
            break
    message = " ".join(msg_lines) or (lines[stop - 1].strip() if stop else "rejected by the verifier")
    err = VerifyError(stage="verifier", code="verifier_rejected", message=message, program=prog,
                      insn=insn, file=src.group(2) if src else None,
                      line=int(src.group(3)) if src else None,
                      snippet=src.group(1).strip() if src else None)
    return prog, log, err


def verdict_from_loader(result: dict, kernel_log: list[str] | None = None) -> VerifierVerdict:
    """Turn the loader's JSON (and the kernel's sched_ext lines of that load) into a verdict with
    structured errors. A scheduler whose programs all passed the verifier but that could not start
    fails at stage `attach` (the kernel refused the ops) or `init` (the scheduler started and
    exited), with the scheduler's own exit reason."""
    log = result.get("log") or ""
    progs = {p["name"]: p["verified_insns"] for p in result.get("programs") or []
             if p.get("loaded") and "verified_insns" in p}
    v = VerifierVerdict(accepted=bool(result.get("ok")), log=log, verified_insns=progs,
                        ops_name=result.get("ops_name") or None, uei=result.get("uei"), raw=result)
    if v.accepted:
        return v
    stage = result.get("stage") or "?"
    error = result.get("error") or "the loader failed"
    if stage == "load":
        prog, vlog, err = parse_verifier_log(log)
        if err is not None:
            v.log = vlog
            v.errors.append(err)
        for m in _EXTERN.finditer(log):
            v.errors.append(VerifyError(stage="verifier", code="missing_kfunc", message=m.group(1)))
        if not v.errors:
            # a load failure outside the verifier (map creation, BTF, relocation): libbpf's most
            # specific line, e.g. "map 'pair_ctx': failed to create: Invalid argument(-22)"
            lines = [ln.removeprefix("libbpf: ").strip() for ln in log.splitlines()
                     if ln.startswith("libbpf: ")]
            specific = [ln for ln in lines if not ln.startswith(("failed to load object", "Error in "))
                        and "Retrying" not in ln]
            v.errors.append(VerifyError(stage="verifier", code="load_failed",
                                        message=(specific or lines or [error])[0]))
    elif stage in ("attach", "enabled", "run"):
        ex = scheduler.exit_of(scheduler.loader_exit(result), kernel_log or [], v.ops_name)
        v.exit = ex
        started = stage != "attach" or ex.kind != "unknown"
        v.stage = "init" if started else "attach"
        what = ("the scheduler exited as it started" if started else
                "the kernel refused to attach the scheduler")
        v.errors.append(VerifyError(
            stage=v.stage, code="init_failed" if started else "attach_failed",
            message=f"the kernel verifier accepted every program, but {what}: {error}"
                    + (f" (scheduler exit: {ex.describe()})" if ex.kind != "unknown" else
                       " (the scheduler left no exit reason)")))
        if (result.get("uei") or {}).get("dump"):  # the kernel's dump of the scheduler at exit
            v.log = (log + "\n" if log else "") + "--- scheduler exit dump ---\n" + result["uei"]["dump"]
    else:
        code = {"params": "bad_param", "usage": "loader_usage", "kernel": "no_sched_ext"}.get(stage, "loader_failed")
        v.errors.append(VerifyError(stage="verifier", code=code, message=error))
    return v


# --- running the loader ---------------------------------------------------------------------------

def _loader_result(stdout: str, stderr: str, rc: int) -> dict:
    d = scheduler.last_json(stdout)
    if d is None:
        raise InfrastructureError(f"the loader printed no result (exit {rc}): {(stderr or stdout)[-500:]}",
                                  "see the sandbox log; `schedcp sandbox build --force` rebuilds the loader")
    return d


def run_in_vm(vm, obj: bytes, params: dict[str, str], *, timeout_s: float = 60,
              load_only: bool = False) -> VerifierVerdict:
    """Load `obj` with the loader inside a running sandbox VM (and attach it for a moment, unless
    `load_only`: then exactly what the host target does)."""
    res = vm.run(scheduler.verify_script("obj.bpf.o", params, load_only), files={"obj.bpf.o": obj},
                 timeout_s=timeout_s)
    out, kernel_log = scheduler.parse_verify(res.stdout)
    return verdict_from_loader(_loader_result(out, res.stderr, res.rc), kernel_log)


def run_on_host(obj_path: Path, params: dict[str, str], *, loader: Path,
                timeout_s: float = 60) -> VerifierVerdict:
    """Load `obj_path` in the host kernel with `--load-only`: the verifier runs, nothing is attached.

    In the sandbox `--verify` also attaches the scheduler for a moment (its `init` runs), which is
    the point there. On the host that moment would put an unvalidated scheduler in charge of the
    real machine (a deploy without a token), so the host only ever gets `--load-only`; a scheduler
    already running on the host is not disturbed by it."""
    if missing := host_missing():
        raise InfrastructureError("the host cannot load the scheduler: " + "; ".join(missing),
                                  "use --target sandbox")
    argv = [str(loader)] + scheduler.verify_argv(str(obj_path), params, load_only=True)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise InfrastructureError(f"the loader did not finish in {timeout_s:.0f} s") from e
    except OSError as e:
        raise InfrastructureError(f"cannot run the loader {loader}: {e}",
                                  "`schedcp sandbox build --force` rebuilds it") from e
    return verdict_from_loader(_loader_result(p.stdout, p.stderr, p.returncode))
