"""What layer 1 (static checks, compile, ELF/BTF checks, kernel verifier) says about a scheduler."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from ..models import SchedulerExit

Verdict = Literal["accepted", "rejected", "error"]
#: attach: the verifier accepted every program but the kernel refused the ops; init: the scheduler
#: started and exited (its init failed, or the kernel disabled it at once)
Stage = Literal["source_check", "compile", "elf", "btf", "verifier", "attach", "init", "done", "libraries"]
Target = Literal["sandbox", "host"]


class VerifyError(BaseModel):
    """One finding. `line`/`column` point into the submitted source when known."""

    stage: Stage
    message: str = Field(description="What is wrong, in the words of the check (or the kernel/compiler)")
    code: str = Field("", description="Short machine-readable reason, e.g. include_not_allowed")
    severity: Literal["error", "warning", "note"] = "error"
    file: str | None = None
    line: int | None = None
    column: int | None = None
    program: str | None = Field(None, description="BPF program (function) the finding is about")
    insn: int | None = Field(None, description="Instruction index in the program (verifier errors)")
    snippet: str | None = Field(None, description="The source line(s) the finding points at")


class ProgramInfo(BaseModel):
    name: str = Field(description="Program (C function) name")
    section: str = Field(description="ELF section, e.g. struct_ops/fifo_enqueue")
    callback: str | None = Field(None, description="sched_ext_ops member it implements, e.g. enqueue")
    insns: int = Field(description="Instructions in the object (before the verifier)")
    subprog_insns: int = Field(0, description="Instructions of the non-inlined functions it calls "
                               "(BPF-to-BPF calls, transitively)")
    verified_insns: int | None = Field(None, description="Instructions the kernel verifier processed")


class Layer1Report(BaseModel):
    verdict: Verdict = Field(description="accepted: the kernel verifier loaded it; rejected: a check or "
                             "the verifier refused it (see errors); error: the check could not run")
    stage: Stage = Field(description="Last stage reached; 'done' when every stage passed")
    errors: list[VerifyError] = []
    warnings: list[VerifyError] = []
    verifier_log: str = Field("", description="Raw kernel verifier log (of the failing program)")
    verifier_accepted: bool = Field(False, description="Every program passed the kernel verifier "
                                    "(true also when the scheduler then failed to attach or start)")
    exit: SchedulerExit | None = Field(None, description="Why the scheduler stopped when it was "
                                       "attached and could not start (stage attach/init)")
    programs: list[ProgramInfo] = []
    ops_name: str | None = None
    callbacks: list[str] = []
    kfuncs: list[str] = []
    missing_kfuncs: list[str] = Field([], description="kfuncs the target kernel's BTF does not have")
    missing_callbacks: list[str] = Field([], description="ops members the target kernel does not have")
    helpers: list[str] = []
    license: str | None = None
    hot_path_insns: int = Field(0, description="Instructions in enqueue/dispatch/select_cpu/running/"
                                "stopping and the functions they call (object size, before the "
                                "verifier): an overhead hint")
    kernel_version: str | None = None
    source_sha256: str = ""
    object_sha256: str | None = None
    object_path: str | None = Field(None, description="Content-addressed copy of the compiled object")
    params: dict[str, str] = {}
    policy: str | None = None
    target: Target = "sandbox"
    program_args: list[str] | None = Field(None, description="a scheduler program's arguments (None: a BPF "
                                           "object loaded by schedcp's loader)")
    program_name: str | None = Field(None, description="the program's file name (a scheduler program)")
    program_stdout: str = Field("", description="the end of the program's stdout in its attach check")
    program_stderr: str = Field("", description="the end of the program's stderr (libbpf prints the "
                                "verifier's log there)")
    libraries: list[str] = Field([], description="the shared libraries the program needs (DT_NEEDED)")
    cached: bool = False
    durations: dict[str, float] = Field({}, description="Seconds per stage")
    total_s: float = 0.0
    created_at: float = Field(default_factory=time.time)

    @property
    def accepted(self) -> bool:
        return self.verdict == "accepted"
