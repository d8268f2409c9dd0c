"""Scoped deployment: a canary that harms nobody else.

A scheduler loaded in partial mode (the loader's `--partial`: `SCX_OPS_SWITCH_PARTIAL` in the ops
flags) runs only the tasks whose policy is SCHED_EXT; every other task stays on the default scheduler.
A scope says which tasks are moved there: `pid:N` (every thread of N; its future children inherit the
policy), `cgroup:PATH` (every thread in a cgroup v2 directory), or a command started under SCHED_EXT
(`-- CMD`). On rollback every task whose policy is SCHED_EXT goes back to SCHED_NORMAL (the kernel
leaves the policy at 7 when a scheduler is unloaded: those tasks would join the next partial scheduler).

`schedcp-setclass` (setclass.c, static, built in the toolchain jail and cached by its source hash) does
the moving with sched_setattr(2): util-linux's chrt has no SCHED_EXT. It is copied to the target at
deploy time; nothing in the sandbox image changes for it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pydantic import BaseModel, Field

from ..errors import BadInput, InfrastructureError

SRC = Path(__file__).parent / "setclass.c"
SCHED_EXT = 7


class Scope(BaseModel):
    kind: str = Field(description="pid | cgroup | command")
    pid: int | None = None
    cgroup: str | None = None
    command: list[str] | None = None

    def describe(self) -> str:
        if self.kind == "pid":
            return f"pid:{self.pid}"
        if self.kind == "cgroup":
            return f"cgroup:{self.cgroup}"
        return "command: " + shlex.join(self.command or [])


def parse(scope: str | None, command: list[str] | None = None) -> Scope | None:
    """`pid:N`, `cgroup:PATH`, or a command (`-- CMD…`); None = system-wide."""
    if command:
        if scope:
            raise BadInput("give --scope pid:N|cgroup:PATH or a command after `--`, not both")
        return Scope(kind="command", command=list(command))
    if not scope:
        return None
    kind, _, val = scope.partition(":")
    if kind == "pid" and re.fullmatch(r"[1-9]\d{0,9}", val):
        return Scope(kind="pid", pid=int(val))
    if kind == "cgroup" and val.startswith("/") and ".." not in val.split("/") and "\n" not in val:
        return Scope(kind="cgroup", cgroup=val.rstrip("/") or "/")
    raise BadInput(f"scope {scope!r} is not pid:N, cgroup:/ABSOLUTE/PATH or `-- CMD`",
                   "e.g. --scope pid:1234, --scope cgroup:/sys/fs/cgroup/canary, or -- stress-ng --cpu 1")


def setclass_binary() -> bytes:
    """The static schedcp-setclass, built by the sandbox toolchain and cached by its source hash."""
    from ..workloads import built_in_toolchain

    return built_in_toolchain(SRC, "schedcp-setclass",
                              ["gcc", "-O2", "-Wall", "-static", "-o", "schedcp-setclass", "setclass.c"],
                              mem_mb=1024, mode=0o755).read_bytes()


def move_script(run_dir: str, s: Scope) -> str:
    """Move the scope's tasks to SCHED_EXT (the scheduler is already loaded in partial mode). Prints
    `moved N` (pid/cgroup) or `@@SCOPEPID P` (the command, started in its own session)."""
    tool = f"{run_dir}/schedcp-setclass"
    head = f"mkdir -p {run_dir}; cp schedcp-setclass {tool}; chmod 0755 {tool}\n"
    if s.kind == "pid":
        return head + f"{tool} ext pid {s.pid}\n"
    if s.kind == "cgroup":
        return head + f"{tool} ext cgroup {shlex.quote(s.cgroup or '')}\n"
    # setclass returns once the command has been exec'd on SCHED_EXT (or says why it could not be)
    return head + f"{tool} ext start {run_dir}/scope.out {shlex.join(s.command or [])} </dev/null 3>&-\n"


def restore_script(run_dir: str) -> str:
    """Every SCHED_EXT task back to SCHED_NORMAL (after the unload)."""
    return f"[ -x {run_dir}/schedcp-setclass ] && {run_dir}/schedcp-setclass normal all\n"


def check_moved(out: str, rc: int, s: Scope) -> int | None:
    """The command's pid (a command scope), after checking the move worked."""
    if s.kind == "command":
        m = re.search(r"^@@SCOPEPID (\d+)$", out, re.M)
        if not m:
            raise BadInput(f"could not start the scoped command: {out.strip()[-300:]}",
                           "is the command installed on the target and runnable as root?")
        return int(m.group(1))
    m = re.search(r"^moved (\d+)$", out, re.M)
    if rc != 0 or not m or int(m.group(1)) == 0:
        raise InfrastructureError(f"could not move {s.describe()} to SCHED_EXT: {out.strip()[-300:]}",
                                  "is the pid alive / the cgroup a cgroup v2 directory with tasks?")
    return None
