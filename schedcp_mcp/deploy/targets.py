"""Where a deployed scheduler runs: the sandbox staging VM or this host. One interface:
state, load (keep attached), unload, exit, run a metric command, start a background workload.

Both targets run the same shell steps (sandbox/scheduler.py owns them): the sandbox through the
staging VM's agent, the host through /bin/sh. The sandbox target is the long-lived named VM
"staging" (started on demand; `schedcp sandbox stop` or its idle timeout ends it), so deploy ->
monitor -> rollback works on machines without sched_ext. The host target loads into this kernel and
is only reachable through a valid token (deploy/deployments.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .. import config
from ..errors import InfrastructureError
from ..models import ScxState
from ..sandbox import image, program, scheduler
from ..sandbox.vm import VM

STAGING = "staging"
RUN_DIR = "/run/schedcp"  # in the guest


@dataclass
class ShellResult:
    rc: int
    stdout: str
    stderr: str


def parse_metric(text: str) -> float:
    """The metric is the last number a metric command prints (hackbench's 'Time: 1.23' works)."""
    nums = re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)
    if not nums:
        raise InfrastructureError(f"the metric command printed no number: {text.strip()[-200:]!r}",
                                  "a metric command must print a number, e.g. hackbench's time")
    return float(nums[-1])


class Target:
    """A kernel a scheduler is deployed into. Subclasses say how a shell script runs there, where
    the loader keeps its files and which loader binary to use; the steps are the same."""

    name: str
    run_dir: str

    def sh(self, script: str, timeout_s: float = 60, files: dict[str, bytes] | None = None) -> ShellResult:
        """Run a shell script in the target (with the scheduler-control helpers defined)."""
        return self._shell(scheduler.PRELUDE + script, timeout_s, files or {})

    def _shell(self, script: str, timeout_s: float, files: dict[str, bytes]) -> ShellResult:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def loader(self) -> str:
        return scheduler.LOADER

    @property
    def files(self) -> scheduler.Files:
        return scheduler.Files(self.run_dir)

    def state(self) -> ScxState:
        return scheduler.parse_state(self.sh(scheduler.STATE_SCRIPT, 30).stdout)

    @property
    def program_files(self) -> scheduler.Files:
        """Where a deployed scheduler program keeps its pid, stdout and stderr."""
        return scheduler.Files(self.run_dir, "program")

    def load(self, obj: bytes, params: dict[str, str], timeout_ms: int | None = None,
             program_args: list[str] | None = None, partial: bool = False) -> scheduler.Started:
        """Start the scheduler and wait for the kernel to enable it (or for the loader to end).
        With `program_args` (a list), `obj` is a scheduler program started with those arguments."""
        if program_args is not None:
            f = self.program_files
            script = (f"mkdir -p {self.run_dir}; cp prog {self.run_dir}/deploy.prog; chmod 0755 {self.run_dir}/deploy.prog\n"
                      + program.start_script(f"{self.run_dir}/deploy.prog", program_args, f))
            r = self.sh(script, scheduler.START_WAIT_S + 30, {"prog": obj})
            s = program.parse_start(r.stdout)
            return scheduler.Started(running=s.running, error=s.error)
        script = (f"mkdir -p {self.run_dir}; cp obj.bpf.o {self.run_dir}/deploy.bpf.o\n"
                  + scheduler.start_script(f"{self.run_dir}/deploy.bpf.o", params, self.files,
                                           timeout_ms, loader=self.loader(), partial=partial))
        r = self.sh(script, scheduler.START_WAIT_S + 30, {"obj.bpf.o": obj})
        if r.rc != 0:
            raise InfrastructureError(f"loading in the {self.name} target failed: {r.stderr.strip()[-300:]}")
        return scheduler.parse_start(r.stdout)

    def unload(self) -> scheduler.Stopped:
        """Stop what a deploy started: a scheduler program (SIGINT, then the kernel's own disable), or
        the loader (SIGTERM)."""
        f = self.program_files
        script = (f"if [ -s {f.pid} ]; then\n{program.stop_script(f)}\nelse\n{scheduler.stop_script(self.files)}\nfi\n")
        return scheduler.parse_stop(self.sh(script, 2 * scheduler.STOP_WAIT_S + scheduler.DISABLE_WAIT_S + 15).stdout)

    def read_exit(self, ops_name: str | None = None) -> scheduler.ExitRead:
        return scheduler.parse_exit(self.sh(scheduler.exit_script(self.files), 30).stdout, ops_name)

    # Metric and workload commands are argv lists, and the target runs exactly those words: the
    # shell below only ever sees them quoted (shlex.join) or as "$@", never as text to parse, so
    # what an allowlist checked (access.check_command) is what runs.

    def run_metric(self, argv: list[str], timeout_s: float = 120) -> float:
        r = self.sh(shlex.join(argv), timeout_s)
        if r.rc != 0:
            raise InfrastructureError(f"metric command failed (rc {r.rc}): {r.stderr.strip()[-300:]}")
        return parse_metric(r.stdout)

    def start_workload(self, argv: list[str]) -> None:
        self.sh(f"mkdir -p {self.run_dir}; setsid sh -c 'while :; do \"$@\"; done' sh {shlex.join(argv)} "
                f">/dev/null 2>&1 </dev/null 3>&- & echo $! >{self.run_dir}/workload.pid", 30)

    def stop_workload(self) -> None:
        self.sh(f"pid=$(cat {self.run_dir}/workload.pid 2>/dev/null); "
                f"[ -n \"$pid\" ] && kill -TERM -$pid 2>/dev/null; rm -f {self.run_dir}/workload.pid; true", 30)


class SandboxTarget(Target):
    """The staging VM. Each operation attaches, works and detaches, so the monitor process, the
    CLI and the server can take turns."""

    name = "sandbox"
    run_dir = RUN_DIR

    def __init__(self, vm_name: str = STAGING, start: bool = True):
        self.vm_name = vm_name
        self.start = start

    @contextmanager
    def vm(self) -> Iterator[VM]:
        st = VM.named_status(self.vm_name)
        if st is not None and self.start and st.get("build_id") != image.ensure().build_id:
            # a staging VM from an older image speaks an older agent protocol: replace it
            VM.stop_named(self.vm_name)
            st = None
        if st is None:
            if not self.start:
                raise InfrastructureError(f"the {self.vm_name} VM is not running",
                                          "deploy to the sandbox starts it")
            v = VM.start_named(self.vm_name, full=True)
        else:
            v = VM.attach(self.vm_name, wait_s=120)
        try:
            yield v
        finally:
            v.detach()

    def _shell(self, script: str, timeout_s: float, files: dict[str, bytes]) -> ShellResult:
        with self.vm() as v:
            r = v.run(script, files=files, timeout_s=timeout_s)
        return ShellResult(r.rc, r.stdout, r.stderr)

    def running(self) -> bool:
        return VM.named_status(self.vm_name) is not None


class HostTarget(Target):
    """This machine's kernel. Loads with the sandbox's static loader (it needs no libraries)."""

    name = "host"

    def __init__(self) -> None:
        d = config.home() / "host"
        d.mkdir(exist_ok=True)
        self.run_dir = str(d)

    def running(self) -> bool:
        return True

    def loader(self) -> str:
        return image.ensure().paths.loader

    def _shell(self, script: str, timeout_s: float, files: dict[str, bytes]) -> ShellResult:
        """`files` are written to a fresh work directory the script runs in, as in the guest."""
        with tempfile.TemporaryDirectory(dir=self.run_dir) as work:
            for name, data in files.items():
                with open(f"{work}/{name}", "wb") as f:
                    f.write(data)
            p = subprocess.run(["sh", "-c", script], cwd=work, capture_output=True, text=True,
                               timeout=timeout_s, stdin=subprocess.DEVNULL)
        return ShellResult(p.returncode, p.stdout, p.stderr)

    def run_metric(self, argv: list[str], timeout_s: float = 120) -> float:
        """On this host no shell at all: the argv is executed as it is."""
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InfrastructureError(f"metric command {shlex.join(argv)[:200]!r} did not run: {e}") from None
        if p.returncode != 0:
            raise InfrastructureError(f"metric command failed (rc {p.returncode}): {p.stderr.strip()[-300:]}")
        return parse_metric(p.stdout)

    def start_workload(self, argv: list[str]) -> None:
        """Repeated in its own session; the loop's shell gets the words as "$@", never as text."""
        p = subprocess.Popen(["sh", "-c", 'while :; do "$@"; done', "sh", *argv], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config.write_private(Path(self.run_dir) / "workload.pid", f"{p.pid}\n".encode())


def get_target(name: str, start: bool = True) -> Target:
    """`start=False`: never boot the staging VM (monitors and rollbacks of a VM that is gone)."""
    if name == "sandbox":
        return SandboxTarget(start=start)
    if name == "host":
        return HostTarget()
    raise InfrastructureError(f"unknown target {name!r}", "use sandbox or host")
