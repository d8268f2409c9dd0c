"""Where a deployed scheduler runs: the sandbox staging VM or this host. One interface:
state, load (keep attached), unload, exit info, run a metric command, start a background workload.

The sandbox target is the long-lived named VM "staging" (started on demand; `schedcp sandbox stop`
or its idle timeout ends it), so deploy -> monitor -> rollback works on machines without sched_ext.
The host target loads into this kernel and is only reachable through a valid token (deploy.py).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from .. import config
from ..errors import InfrastructureError
from ..models import ScxState
from ..verify import verifier

STAGING = "staging"
RUN_DIR = "/run/schedcp"  # in the guest
SCX = verifier.SCX_SYSFS

STATE_SCRIPT = f"""
echo "state=$(cat {SCX}/state 2>/dev/null)"
echo "ops=$(cat {SCX}/root/ops 2>/dev/null)"
echo "enable_seq=$(cat {SCX}/enable_seq 2>/dev/null)"
echo "psi=$(head -1 /proc/pressure/cpu 2>/dev/null)"
echo "ctxt=$(grep '^ctxt ' /proc/stat | cut -d' ' -f2)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
"""


def parse_state(text: str) -> ScxState:
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    psi = re.search(r"avg10=([\d.]+)", kv.get("psi", ""))
    num = lambda k, f=int: f(kv[k]) if kv.get(k, "").replace(".", "", 1).isdigit() else None  # noqa: E731
    return ScxState(state=kv.get("state") or "absent", ops=kv.get("ops") or None,
                    enable_seq=num("enable_seq"), psi_some_avg10=float(psi[1]) if psi else None,
                    ctxt=num("ctxt"), uptime_s=num("uptime", float))


def parse_metric(text: str) -> float:
    """The metric is the last number a metric command prints (hackbench's 'Time: 1.23' works)."""
    nums = re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)
    if not nums:
        raise InfrastructureError(f"the metric command printed no number: {text.strip()[-200:]!r}",
                                  "a metric command must print a number, e.g. hackbench's time")
    return float(nums[-1])


def loader_args(obj_path: str, params: dict[str, str], timeout_ms: int | None) -> list[str]:
    args = [obj_path, "--run", *verifier.loader_args(params)]
    if timeout_ms:
        args += ["--timeout-ms", str(timeout_ms)]
    return args


class Target(Protocol):
    name: str

    def running(self) -> bool: ...
    def state(self) -> ScxState: ...
    def load(self, obj: bytes, params: dict[str, str], timeout_ms: int | None = None) -> None: ...
    def unload(self) -> None: ...
    def exit_info(self) -> str: ...
    def run_metric(self, cmd: str, timeout_s: float = 120) -> float: ...
    def start_workload(self, cmd: str) -> None: ...
    def stop_workload(self) -> None: ...


class SandboxTarget:
    """The staging VM. Each operation attaches, works and detaches, so the monitor process, the
    CLI and the server can take turns."""

    name = "sandbox"

    def __init__(self, vm_name: str = STAGING, start: bool = True):
        self.vm_name = vm_name
        self.start = start

    @contextmanager
    def vm(self) -> Iterator[object]:
        from ..sandbox import image
        from ..sandbox.vm import VM

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

    def _sh(self, script: str, timeout_s: float = 60, files: dict[str, bytes] | None = None):
        with self.vm() as v:
            return v.run(script, files=files or {}, timeout_s=timeout_s)

    def running(self) -> bool:
        from ..sandbox.vm import VM

        return VM.named_status(self.vm_name) is not None

    def state(self) -> ScxState:
        return parse_state(self._sh(STATE_SCRIPT, 30).stdout)

    def load(self, obj: bytes, params: dict[str, str], timeout_ms: int | None = None) -> None:
        args = " ".join(shlex.quote(a) for a in loader_args(f"{RUN_DIR}/deploy.bpf.o", params, timeout_ms))
        r = self._sh(f"""
mkdir -p {RUN_DIR}; cp obj.bpf.o {RUN_DIR}/deploy.bpf.o
rm -f {RUN_DIR}/loader.json {RUN_DIR}/loader.log
setsid schedcp-loader {args} >{RUN_DIR}/loader.json 2>{RUN_DIR}/loader.log </dev/null 3>&- &
echo $! >{RUN_DIR}/loader.pid
i=0
while [ $i -lt 100 ]; do
  [ "$(cat {SCX}/state)" = enabled ] && break
  kill -0 $(cat {RUN_DIR}/loader.pid) 2>/dev/null || break
  sleep 0.1; i=$((i+1))
done
cat {SCX}/state; cat {SCX}/root/ops
""", 60, {"obj.bpf.o": obj})
        if r.rc != 0:
            raise InfrastructureError(f"loading in the staging VM failed: {r.stderr.strip()[-300:]}")

    def unload(self) -> None:
        self._sh(f"""
pid=$(cat {RUN_DIR}/loader.pid 2>/dev/null)
[ -n "$pid" ] && kill -TERM $pid 2>/dev/null
i=0
while [ $i -lt 50 ] && [ "$(cat {SCX}/state)" != disabled ]; do sleep 0.1; i=$((i+1)); done
[ -n "$pid" ] && kill -KILL $pid 2>/dev/null
i=0
while [ $i -lt 50 ] && [ "$(cat {SCX}/state)" != disabled ]; do sleep 0.1; i=$((i+1)); done
rm -f {RUN_DIR}/loader.pid
cat {SCX}/state
""", 30)

    def exit_info(self) -> str:
        r = self._sh(f"cat {RUN_DIR}/loader.json 2>/dev/null; echo; "
                     "dmesg | grep -i 'sched_ext' | tail -n 8", 30)
        return r.stdout.strip()

    def run_metric(self, cmd: str, timeout_s: float = 120) -> float:
        r = self._sh(cmd, timeout_s)
        if r.rc != 0:
            raise InfrastructureError(f"metric command failed (rc {r.rc}): {r.stderr.strip()[-300:]}")
        return parse_metric(r.stdout)

    def start_workload(self, cmd: str) -> None:
        self._sh(f"mkdir -p {RUN_DIR}; setsid sh -c {shlex.quote(f'while :; do {cmd}; done')} "
                 f">/dev/null 2>&1 </dev/null 3>&- & echo $! >{RUN_DIR}/workload.pid", 30)

    def stop_workload(self) -> None:
        self._sh(f"pid=$(cat {RUN_DIR}/workload.pid 2>/dev/null); "
                 f"[ -n \"$pid\" ] && kill -TERM -$pid 2>/dev/null; rm -f {RUN_DIR}/workload.pid; true",
                 30)


class HostTarget:
    """This machine's kernel. Loads with the sandbox's static loader (it needs no libraries)."""

    name = "host"

    def running(self) -> bool:
        return True

    def __init__(self) -> None:
        self.dir = config.home() / "host"
        self.dir.mkdir(exist_ok=True)

    def state(self) -> ScxState:
        r = subprocess.run(["sh", "-c", STATE_SCRIPT], capture_output=True, text=True, timeout=10)
        return parse_state(r.stdout)

    def _loader(self) -> str:
        from ..sandbox import image

        return image.ensure().paths.loader

    def load(self, obj: bytes, params: dict[str, str], timeout_ms: int | None = None) -> None:
        path = self.dir / "deploy.bpf.o"
        path.write_bytes(obj)
        out = open(self.dir / "loader.json", "wb")
        err = open(self.dir / "loader.log", "wb")
        p = subprocess.Popen([self._loader(), *loader_args(str(path), params, timeout_ms)],
                             stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        (self.dir / "loader.pid").write_text(str(p.pid))
        for _ in range(100):
            if self.state().enabled or p.poll() is not None:
                break
            time.sleep(0.1)

    def unload(self) -> None:
        try:
            pid = int((self.dir / "loader.pid").read_text())
        except (OSError, ValueError):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            for _ in range(50):
                if not self.state().enabled:
                    break
                time.sleep(0.1)
        (self.dir / "loader.pid").unlink(missing_ok=True)

    def exit_info(self) -> str:
        try:
            return (self.dir / "loader.json").read_text()
        except OSError:
            return ""

    def run_metric(self, cmd: str, timeout_s: float = 120) -> float:
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise InfrastructureError(f"metric command failed (rc {r.returncode}): {r.stderr[-300:]}")
        return parse_metric(r.stdout)

    def start_workload(self, cmd: str) -> None:
        p = subprocess.Popen(["sh", "-c", f"while :; do {cmd}; done"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        (self.dir / "workload.pid").write_text(str(p.pid))

    def stop_workload(self) -> None:
        try:
            os.killpg(int((self.dir / "workload.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def get_target(name: str, start: bool = True) -> Target:
    """`start=False`: never boot the staging VM (monitors and rollbacks of a VM that is gone)."""
    if name == "sandbox":
        return SandboxTarget(start=start)
    if name == "host":
        return HostTarget()
    raise InfrastructureError(f"unknown target {name!r}", "use sandbox or host")
