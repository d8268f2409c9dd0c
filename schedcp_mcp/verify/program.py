"""Layer 1 for a scheduler program (a binary with its own userspace loader, e.g. the kernel's
scx_simple): does it attach to the sandbox kernel?

Steps: the file is read on the host and inspected, never run (an x86-64 ELF executable; its
interpreter and DT_NEEDED libraries); it is kept content-addressed in the object store; a full sandbox
VM boots; the libraries it needs are checked in the guest and any it lacks are named before anything
runs (stage `libraries`); then it is started in the guest with its arguments and must bring
`/sys/kernel/sched_ext/state` to `enabled` with a `root/ops` within `scheduler.START_WAIT_S`; then it
is stopped (SIGINT, then the kernel's own disable). Its stdout and stderr are kept in the report: a
program whose BPF the verifier rejects has libbpf print the verifier's log on its stderr, which becomes
the report's `verifier_log`.

Verdicts: accepted (stage done) when it attached; rejected at `libraries` (the guest lacks what it
needs), `verifier` (libbpf printed a verifier log), `init` (the kernel enabled and disabled it: the
kernel's `disabled (...)` line is the reason) or `attach` (it exited, or ran without ever attaching).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

from .. import config
from ..errors import BadInput, InfrastructureError
from ..sandbox import program, scheduler
from ..sandbox.vm import VM, GuestTimeout
from .models import Layer1Report, VerifyError

Progress = Callable[[str, float], None]
RUN_DIR = "/run/l1p"
MAX_ARGS = 64


def check_args(args: list[str]) -> list[str]:
    args = [str(a) for a in args]
    if len(args) > MAX_ARGS or any(len(a) > 4096 or "\0" in a or "\n" in a for a in args):
        raise BadInput(f"a program's arguments: at most {MAX_ARGS}, each one line under 4 kB")
    return args


def save_program(data: bytes) -> tuple[str, str]:
    """Keep the program content-addressed beside the compiled objects (layer 2 and deploy ship it
    from here, by hash). Never executed on the host."""
    from .pipeline import object_store

    sha = hashlib.sha256(data).hexdigest()
    path = object_store() / f"{sha}.prog"
    if not path.exists():
        config.write_private(path, data)
    return sha, str(path)


def stored_program(sha: str | None) -> bytes | None:
    """A scheduler program from the object store by its hash, only if its bytes still hash to it."""
    from .pipeline import stored_bytes

    return stored_bytes(sha, ".prog")


def read_program(path: str | Path) -> bytes:
    p = Path(path)
    try:
        if not p.is_file():
            raise BadInput(f"{p} is not a file", "give the path of a compiled scheduler program")
        return p.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read {p}: {e.strerror}") from None


def verify_program(data: bytes, args: list[str], *, name: str = "program", vm=None,
                   progress: Progress | None = None) -> Layer1Report:
    """Layer 1 for a program's bytes and arguments; `vm` a running full sandbox VM (default: boot one)."""
    say = progress or (lambda msg, frac: None)
    t_start = time.monotonic()
    args = check_args(args)
    info = program.inspect_elf(data, name)
    sha, path = save_program(data)
    r = Layer1Report(verdict="error", stage="libraries", source_sha256=sha, object_sha256=sha, object_path=path,
                     program_args=args, program_name=name, libraries=info.needed, license=None)
    own = vm is None
    try:
        if own:
            say("booting the sandbox VM", 0.1)
            t0 = time.monotonic()
            vm = VM(full=True).start()
            r.durations["vm_boot"] = round(time.monotonic() - t0, 3)
        if not getattr(vm, "full", True):
            raise BadInput("a program needs the full sandbox image (its shared libraries are there)")
        r.kernel_version = getattr(vm, "kernel_version", None) or None
        say("checking the guest has the program's shared libraries", 0.5)
        out = vm.run(program.libraries_script(info), timeout_s=30).stdout
        missing = program.parse_missing(out)
        if missing:
            r.verdict = "rejected"
            r.errors.append(VerifyError(stage="libraries", code="missing_libraries",
                                        message=f"the sandbox guest lacks what {name} needs: {', '.join(missing)} "
                                                "(nothing was run)"))
            return r
        say(f"starting {name} in the guest (attach within {scheduler.START_WAIT_S} s)", 0.6)
        files = scheduler.Files(RUN_DIR, "prog")
        t0 = time.monotonic()
        marker = f"schedcp-l1p {sha[:12]} {time.time_ns()}"
        out = _start(vm, data, args, files, marker)
        started = program.parse_start(out)
        r.durations["attach"] = round(time.monotonic() - t0, 3)
        say("stopping it (SIGINT, then the kernel's own disable)", 0.8)
        stop = program.parse_stop(vm.run(scheduler.PRELUDE + program.stop_script(files), timeout_s=60).stdout)
        r.program_stdout = (stop.stdout or started.stdout)[-program.KEEP_OUTPUT:]
        r.program_stderr = (stop.stderr or started.stderr)[-program.KEEP_OUTPUT:]
        klog = vm.run(f"dmesg | sed -n '/{marker}/,$p' | grep -i sched_ext | tail -n 20\n", timeout_s=30).stdout
        klines = [ln.strip() for ln in klog.splitlines() if ln.strip()]
        r.verifier_log = program.verifier_log(r.program_stderr)
        if started.running:
            r.verdict, r.stage, r.ops_name, r.verifier_accepted = "accepted", "done", started.ops, True
            if stop.how == "sysrq":
                r.warnings.append(VerifyError(stage="done", severity="warning", code="ignored_sigint",
                                              message=f"{name} did not exit within {scheduler.STOP_WAIT_S} s of "
                                                      "SIGINT: the kernel's own disable (SysRq-S) stopped it"))
            return r
        r.verdict = "rejected"
        ex = scheduler.exit_of(None, klines)
        enabled_once = any("enabled" in ln and "BPF scheduler" in ln for ln in klines)
        if r.verifier_log:
            r.stage = "verifier"
        elif enabled_once or ex.kind not in ("unknown",):
            r.stage, r.verifier_accepted, r.exit = "init", True, ex
        else:
            r.stage = "attach"
        r.errors.append(VerifyError(stage=r.stage, code="not_attached", message=started.error or "did not attach"))
        return r
    except GuestTimeout as e:
        r.verdict = "rejected"
        r.stage = "attach"
        r.errors.append(VerifyError(stage="attach", code="timeout", message=e.message))
        return r
    except InfrastructureError:
        raise
    finally:
        r.total_s = round(time.monotonic() - t_start, 3)
        if own and vm is not None:
            vm.close()


def _start(vm, data: bytes, args: list[str], files: scheduler.Files, marker: str) -> str:
    script = (scheduler.PRELUDE + scheduler.stop_any_script() +
              f"mkdir -p {RUN_DIR} && cp prog {RUN_DIR}/prog && chmod +x {RUN_DIR}/prog\n"
              f"echo '<6>{marker}' >/dev/kmsg\n" + program.start_script(f"{RUN_DIR}/prog", args, files))
    return vm.run(script, files={"prog": data}, timeout_s=scheduler.START_WAIT_S + 60).stdout
