"""The BPF toolchain: the sandbox rootfs's clang/bpftool, run in a locked-down chroot.

`run()` is how untrusted scheduler C gets compiled, so each call gets:
  - a fresh private work dir `/w/<random>` inside the rootfs, removed afterwards;
  - a chroot into the rootfs (host files are unreachable; the rootfs holds no secrets), entered as
    `nobody` (65534) when we are root, so the compiler cannot undo the chroot;
  - new network, IPC, UTS and PID namespaces (no network at all; dies with its parent);
  - rlimits: CPU seconds, address space, file size, open files, processes;
  - a wall-clock timeout that kills the whole process group.
The allowlisted headers are in `/opt/schedcp/include` (see `image.INCLUDE_DIRS`): libbpf's bpf/*.h,
scx/*.h, bpf-compat, vmlinux.h and asm-generic/errno*.h; compile with `-nostdinc` and those `-I`s.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from ..errors import BadInput, InfrastructureError
from . import image

NOBODY = 65534
WORK_ROOT = "w"  # /w inside the rootfs


class ToolResult(BaseModel):
    rc: int
    stdout: str
    stderr: str
    outputs: dict[str, bytes] = Field(default_factory=dict)
    timed_out: bool = False
    duration_s: float


def rootfs() -> Path:
    return Path(image.ensure().paths.rootfs)


def include_dirs() -> list[str]:
    """The allowlisted -I directories, as paths inside the chroot."""
    return list(image.INCLUDE_DIRS)


def bpf_cflags() -> list[str]:
    """clang flags for a sched_ext BPF object (tools/sched_ext/Makefile's), with the allowlisted -Is."""
    return [*image.BPF_CFLAGS, *[f"-I{d}" for d in include_dirs()]]


def _check_rel(name: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or name.startswith("-"):
        raise BadInput(f"work file name {name!r} must be a relative path without '..'")


def run(argv: list[str], *, workdir_files: dict[str, bytes] | None = None, timeout_s: float = 60.0,
        mem_mb: int = 2048, outputs: list[str] | None = None, max_file_mb: int = 64,
        max_output_mb: int = 16) -> ToolResult:
    """Run `argv` in a fresh work dir inside the rootfs chroot, without network, under limits.

    `workdir_files` are written into the work dir first; `outputs` (paths relative to it) are read back
    when they exist. stdout/stderr are cut at max_output_mb."""
    root = rootfs()
    files = workdir_files or {}
    outs = outputs or []
    for n in list(files) + outs:
        _check_rel(n)
    base = root / WORK_ROOT
    base.mkdir(mode=0o711, exist_ok=True)
    os.chmod(base, 0o711)
    name = secrets.token_hex(8)
    work = base / name
    work.mkdir(mode=0o700)
    as_root = os.geteuid() == 0
    try:
        for n, data in files.items():
            p = work / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        if as_root:
            for p in [work, *work.rglob("*")]:
                os.lchown(p, NOBODY, NOBODY)
        inner = ["/usr/bin/env", "-i", f"--chdir=/{WORK_ROOT}/{name}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                 "HOME=/tmp", "LC_ALL=C", "TMPDIR=/" + WORK_ROOT + "/" + name, *argv]
        if as_root:
            jail = ["unshare", "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child",
                    "chroot", f"--userspec={NOBODY}:{NOBODY}", "--groups=", str(root), *inner]
        else:
            jail = ["unshare", "--user", "--map-root-user", "--net", "--ipc", "--uts", "--pid", "--fork",
                    "--kill-child", "chroot", str(root), *inner]
        limits = ["prlimit", f"--cpu={max(1, int(timeout_s))}", f"--as={mem_mb << 20}",
                  f"--fsize={max_file_mb << 20}", "--nofile=256", "--core=0"]
        if as_root:
            limits.append("--nproc=64")  # counted per uid: nobody's processes
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(limits + jail, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError as e:
            raise InfrastructureError(f"cannot run the toolchain jail: {e.filename} is missing",
                                      hint="install util-linux and coreutils") from e
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
        cap = max_output_mb << 20
        result = ToolResult(rc=proc.returncode if not timed_out else -signal.SIGKILL,
                            stdout=out[:cap].decode(errors="replace"),
                            stderr=_unjail(err[:cap].decode(errors="replace"), name),
                            timed_out=timed_out, duration_s=time.monotonic() - t0)
        for o in outs:
            p = work / o
            if p.is_file() and not p.is_symlink():
                result.outputs[o] = p.read_bytes()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unjail(text: str, name: str) -> str:
    """Diagnostics name files by their chroot path; show them relative to the work dir."""
    return re.sub(rf"/{WORK_ROOT}/{name}/", "", text)
