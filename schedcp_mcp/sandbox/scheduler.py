"""Reading how a sched_ext scheduler ended: the loader's exit JSON (with the scheduler's UEI), the
kernel log's `disabled (...)` line, and clean-versus-error classification.

Every layer that watches a scheduler stop (layer 1's short attach, layer 2's runs, layer 3's
monitor) reads the exit here, so they all say the same thing in the same words.
"""

from __future__ import annotations

import json
import re

from ..models import LoaderExit, SchedulerExit, Uei

#: enum scx_exit_kind (include/linux/sched/ext.h): >= 1024 are errors
SCX_EXIT_ERROR = 1024
SCX_EXIT_ERROR_STALL = 1026
#: `sched_ext: BPF scheduler "NAME" disabled (REASON)` in the kernel log
DISABLED_RE = re.compile(r'sched_ext: BPF scheduler "([^"]*)" disabled \(([^)]*)\)')
#: exit reasons that are not the scheduler's fault (kernel/sched/ext.c scx_exit_reason())
CLEAN_REASONS = ("unregistered from user space", "unregistered from BPF", "unregistered from the main kernel")
STALL_REASON = "runnable task stall"


def last_json(text: str) -> dict | None:
    """The last JSON object line of a loader's output (it prints exactly one, last)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def loader_exit(d: dict) -> LoaderExit:
    """The loader's JSON as a LoaderExit (the libbpf log left out; a long exit dump cut)."""
    sx = d.get("sched_ext") or {}
    uei = d.get("uei")
    if isinstance(uei, dict):
        dump = uei.get("dump") or ""
        uei = Uei(kind=int(uei.get("kind") or 0), kind_name=uei.get("kind_name") or "",
                  exit_code=int(uei.get("exit_code") or 0), reason=uei.get("reason") or "",
                  message=uei.get("message") or "",
                  dump=dump if len(dump) <= 4000 else dump[:4000] + "\n[… cut]")
    return LoaderExit(ok=bool(d.get("ok")), stage=d.get("stage") or "", error=d.get("error"),
                      ops_name=d.get("ops_name") or "", root_ops=sx.get("root_ops") or "",
                      state_attached=sx.get("state_attached") or "", uei=uei,
                      run_s=float(d.get("run_s") or 0.0), stop_reason=d.get("stop_reason"))


def disabled_lines(kernel_log: list[str] | str, ops_name: str | None = None) -> list[tuple[str, str]]:
    """(reason, line) for each `BPF scheduler "X" disabled (reason)` line, of `ops_name` if given."""
    lines = kernel_log.splitlines() if isinstance(kernel_log, str) else kernel_log
    out = []
    for ln in lines:
        m = DISABLED_RE.search(ln)
        if m and (ops_name is None or m[1] == ops_name):
            out.append((m[2], ln.strip()))
    return out


def is_stall(uei: Uei | None) -> bool:
    return uei is not None and (uei.kind == SCX_EXIT_ERROR_STALL or STALL_REASON in uei.reason)


def is_error(uei: Uei | None) -> bool:
    return uei is not None and uei.kind >= SCX_EXIT_ERROR


def exit_of(loader: LoaderExit | None, kernel_log: list[str] | str = (),
            ops_name: str | None = None) -> SchedulerExit:
    """Why the scheduler stopped, from the loader's UEI and the kernel's last disable line."""
    uei = loader.uei if loader else None
    lines = disabled_lines(kernel_log, ops_name)
    reason_k, line = lines[-1] if lines else ("", "")
    if uei is not None and uei.kind:
        kind = "stall" if is_stall(uei) else "error" if is_error(uei) else "clean"
        return SchedulerExit(kind=kind, kind_name=uei.kind_name, reason=uei.reason or reason_k,
                             message=uei.message, kernel_line=line)
    if line:
        kind = ("stall" if STALL_REASON in reason_k else
                "clean" if reason_k in CLEAN_REASONS else "error")
        return SchedulerExit(kind=kind, reason=reason_k, kernel_line=line)
    return SchedulerExit(kind="unknown")
