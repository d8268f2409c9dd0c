"""Saved VM states: a booted, idle sandbox guest frozen to a file, restored instead of booting.

Booting the sched_ext kernel under TCG is most of a cold verify (~3.5 s of ~4 s on a quiet 2-core
machine). A guest restored from a state saved right after its agent said READY is at the same
point in a fraction of that: qemu starts with `-incoming defer`, the host connects the agent's
socket, and `migrate-incoming` reads the state (QMP). Only the verify path asks for it
(`VM(restore=True)`); the first such VM of an image boots as before and saves the state before any
candidate runs in it.

One file per image build and guest variant, `<sandbox>/vmstate/<build_id>-<variant>.vmstate`: a
4 KiB header (`SCHEDCP-VMSTATE 1 {key}`, padded) and then qemu's migration stream. The key is what
must match for the state to be usable: the image build, the qemu version, the machine arguments
(the qemu command line with this VM's own paths blanked), the CPU count, the memory and the
accelerator. A state whose key differs is refused with the field that differs and the VM boots
(then saves a state that matches, replacing it); states of other image builds are removed when a
new one is saved. A state is written to a temporary file and renamed into place, so two processes
saving at once never leave a torn file (the last rename wins; both are valid), and a reader holds
its file open, so a replacement under it does not disturb a restore in progress.

Why this is safe for verdicts: every restore starts from the same clean idle guest (its memory is
all there is: the image is an initramfs, there are no disks), a restored VM serves one owner and is
killed afterwards, and nothing a candidate does is ever saved back. So nothing leaks from one
candidate to the next — a candidate cannot plant a program, a pinned map or a file for the next one
to find. The state is as trusted as the image it was made from: it lives beside it, 0600 in a 0700
directory. What restores share: the guest's KASLR layout and the state of its random number
generator at the save (each restore draws the same numbers until the guest gathers new entropy);
that matters to no verdict. The guest's wall clock stands still at the save (its monotonic clock
goes on from there), so the first command after a restore sets it from the host.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .. import config
from ..errors import InfrastructureError

MAGIC = b"SCHEDCP-VMSTATE 1 "
HEADER_SIZE = 4096
SUFFIX = ".vmstate"
#: the key's fields, in the order a refusal names them, with the words it uses
FIELDS = {"build_id": "image build", "qemu": "qemu version", "accel": "accelerator", "cpus": "CPU count",
          "mem_mb": "memory (MiB)", "host_cpu": "host CPU", "machine": "machine arguments"}


def state_dir() -> Path:
    """$SCHEDCP_VMSTATE_DIR, else `vmstate/` beside the image (one image per sandbox dir)."""
    p = Path(os.environ.get("SCHEDCP_VMSTATE_DIR") or config.sandbox_dir() / "vmstate")
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def state_path(build_id: str, variant: str) -> Path:
    return state_dir() / f"{build_id}-{variant}{SUFFIX}"


@functools.lru_cache(maxsize=8)
def _qemu_version(qemu: str, mtime: float) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def qemu_version(qemu: str) -> str:
    """`QEMU emulator version 7.2.22 (…)` of the binary `qemu` (cached per binary and mtime)."""
    path = shutil.which(qemu)
    try:
        mtime = os.stat(path).st_mtime if path else 0.0
    except OSError:
        mtime = 0.0
    return _qemu_version(path or qemu, mtime)


def host_cpu() -> str:
    """The host CPU model: a KVM guest (`-cpu host`) restores only on the same kind of CPU."""
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else "unknown"
    except OSError:
        return "unknown"


def mismatch(saved: dict, key: dict) -> str | None:
    """Why a state saved with key `saved` cannot stand in for a boot with `key` (None: it can)."""
    for f, words in FIELDS.items():
        a, b = saved.get(f), key.get(f)
        if a == b:
            continue
        if f == "machine" and isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            x = a[i] if i < len(a) else "(nothing)"
            y = b[i] if i < len(b) else "(nothing)"
            return f"the machine arguments differ at argument {i}: saved {x!r}, this VM {y!r}"
        return f"the {words} differs: saved {a!r}, this VM {b!r}"
    return None


def open_state(path: Path, key: dict) -> tuple[int | None, dict, str]:
    """(fd, saved key, "") with the fd of the state file at `path` positioned at its migration
    stream, when its key matches `key`; else (None, {}, why not). The caller owns the fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, {}, f"no saved VM state {path.name} yet"
    except OSError as e:
        return None, {}, f"cannot open the saved VM state {path}: {e.strerror}"
    try:
        head = os.read(fd, HEADER_SIZE)
        if len(head) != HEADER_SIZE or not head.startswith(MAGIC):
            raise ValueError("not a schedcp VM state (bad header)")
        saved = json.loads(head[len(MAGIC):].rstrip(b" \n\0"))
        if os.fstat(fd).st_size <= HEADER_SIZE:
            raise ValueError("it holds no guest state")
    except (OSError, ValueError) as e:
        os.close(fd)
        return None, {}, f"the saved VM state {path.name} is unreadable: {e}"
    why = mismatch(saved, key)
    if why is not None:
        os.close(fd)
        return None, {}, f"the saved VM state {path.name} was refused: {why}"
    return fd, saved, ""


def _header(key: dict) -> bytes:
    body = MAGIC + json.dumps(key, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > HEADER_SIZE - 1:
        raise InfrastructureError("the VM state key does not fit its header (machine arguments too long)")
    return body + b" " * (HEADER_SIZE - 1 - len(body)) + b"\n"


def save(qmp: "QMP", path: Path, key: dict, timeout_s: float = 120.0) -> float:
    """Freeze the running guest behind `qmp` into `path` (a temporary file renamed into place), then
    let it run on. Seconds taken. States of other image builds of the same variant are removed."""
    t0 = time.monotonic()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(key))
        qmp.cmd("migrate", uri=f"exec:cat >> {shlex.quote(str(tmp))}")
        st = qmp.wait_migration(time.monotonic() + timeout_s)
        if st.get("status") != "completed":
            raise InfrastructureError(f"saving the VM state failed: {st.get('error-desc') or st.get('status')}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if qmp.cmd("query-status").get("status") != "running":
            qmp.cmd("cont")  # a completed migration leaves the source paused; a failed one running
    variant = path.name.split("-", 1)[1] if "-" in path.name else ""
    for old in path.parent.glob(f"*-{variant}"):
        if old != path:
            old.unlink(missing_ok=True)  # another (older) image's state: never used again
    return time.monotonic() - t0


def restore(qmp: "QMP", fd: int, deadline: float) -> None:
    """Load the state from `fd` (inherited by qemu) into the waiting `-incoming defer` qemu."""
    qmp.cmd("migrate-incoming", uri=f"fd:{fd}")
    st = qmp.wait_migration(deadline)
    if st.get("status") != "completed":
        raise InfrastructureError(f"restoring the VM state failed: {st.get('error-desc') or st.get('status')}")


class QMP:
    """A minimal QMP client (qemu's JSON control socket), every read bounded by a deadline."""

    def __init__(self, path: Path, deadline: float, alive):
        while True:
            if not alive():
                raise ConnectionError("qemu exited during start-up")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("no QMP socket")
                time.sleep(0.01)
        self.deadline, self.alive, self.buf = deadline, alive, b""
        self._line()  # the greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("qemu's QMP did not answer in time")
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if not self.alive():
                    raise ConnectionError("qemu exited")
                continue
            if not chunk:
                raise ConnectionError("qemu closed its QMP socket")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name: str, **args) -> dict:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._line()
            if "error" in r:
                raise InfrastructureError(f"qemu refused {name}: {r['error'].get('desc', r['error'])}")
            if "return" in r:
                return r["return"]
            # an event (STOP, RESUME, MIGRATION): not an answer

    def wait_migration(self, deadline: float) -> dict:
        self.deadline = max(self.deadline, deadline)
        while True:
            st = self.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError("the VM state was not saved or loaded in time")
            time.sleep(0.005)

    def agent_connected(self, label: str = "agent") -> bool:
        """Has qemu accepted our connection to the chardev `label` (its name loses `disconnected:`)?"""
        for c in self.cmd("query-chardev"):
            if c.get("label") == label:
                return not str(c.get("filename", "")).startswith("disconnected:")
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
