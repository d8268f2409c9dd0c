"""The BPF toolchain: the sandbox rootfs's clang/bpftool, run in a locked-down jail.

`run()` is how untrusted scheduler C gets compiled, so each call gets:
  - its own mount namespace whose root is an empty, read-only tmpfs holding only the rootfs's `/usr`
    (the toolchain: compilers, their libraries and libc headers; read-only), the allowlisted headers
    `/opt/schedcp/include` (read-only), a fresh private work dir `/w/<random>` and an empty `/tmp`.
    Nothing else exists in there: no `/etc`, no `/proc`, no host file, no other job's work dir — so no
    spelling of an include, `.incbin` or pragma can read a file that is not the toolchain's own;
  - a chroot into that root, entered as its own uid (JAIL_ID, not `nobody`) when we are root, so the compiler cannot
    undo the chroot (as another user: a user namespace, mapped to root inside);
  - new network, IPC, UTS and PID namespaces (no network at all; dies with its parent);
  - rlimits: CPU seconds, address space, file size, open files, processes;
  - a wall-clock timeout that kills the whole process group, and stdout/stderr capped while read.
The allowlisted headers are in `/opt/schedcp/include` (see `image.INCLUDE_DIRS`): libbpf's bpf/*.h,
scx/*.h, bpf-compat, vmlinux.h and asm-generic/errno*.h; compile with `-nostdinc` and those `-I`s.
"""

from __future__ import annotations

import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from ..errors import BadInput, InfrastructureError
from . import image

#: the jail's own uid and gid when we are root: unused on any ordinary system (not `nobody`, which
#: other daemons share: a compiler running as nobody could signal or ptrace them, and they it);
#: $SCHEDCP_JAIL_ID picks another when this one is taken
JAIL_ID = int(os.environ.get("SCHEDCP_JAIL_ID") or 2_118_123_456)
WORK_ROOT = "w"  # /w inside the rootfs


def _jail_id() -> int:
    """JAIL_ID, refused when an account of this system has it (the jail would share its processes
    and files)."""
    import grp
    import pwd

    for lookup, what in ((pwd.getpwuid, "user"), (grp.getgrgid, "group")):
        try:
            name = lookup(JAIL_ID)[0]
        except KeyError:
            continue
        raise InfrastructureError(f"the compile jail's id {JAIL_ID} belongs to {what} {name!r} on this system",
                                  "set SCHEDCP_JAIL_ID to an unused uid/gid")
    return JAIL_ID


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


# Builds the jail's root inside the new mount namespace, then enters it. $1 root mount point,
# $2 rootfs, $3 work dir, $4 its name, $5 "drop" to run as $JAIL_ID; the command follows.
# As few programs as it takes (each costs a few ms, twice per compile): `mount -o bind,ro` binds
# and remounts read-only in one (util-linux >= 2.27), one `ln` makes the four links.
_JAIL_SH = r"""
set -e
J=$1 R=$2 W=$3 N=$4 DROP=$5
shift 5
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev schedcp-jail "$J"
mkdir -p "$J/usr" "$J/opt/schedcp/include" "$J/w/$N" "$J/tmp" "$J/dev"
ln -s usr/bin usr/lib usr/lib64 usr/sbin "$J/"
mount --rbind -o ro "$R/usr" "$J/usr"
mount --bind -o ro "$R/opt/schedcp/include" "$J/opt/schedcp/include"
mount --bind "$W" "$J/w/$N"
: >"$J/dev/null"
mount --bind /dev/null "$J/dev/null"
mount -t tmpfs -o mode=1777,size=64m,nosuid,nodev schedcp-tmp "$J/tmp"
mount -o remount,bind,ro "$J"
if [ "$DROP" = drop ]; then
  exec chroot --userspec="$JAIL_ID:$JAIL_ID" --groups= "$J" "$@"
fi
exec chroot "$J" "$@"
"""


def _communicate_capped(proc: subprocess.Popen, timeout_s: float, cap: int
                        ) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr as they come, keeping at most `cap` bytes of each (the rest is read
    and dropped, so a flood of warnings costs no memory). (stdout, stderr, timed out)."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(min(left, 1.0)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            if len(buf) < cap:
                buf += chunk[: cap - len(buf)]
    sel.close()
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(max(0.1, deadline - time.monotonic()) if not timed_out else 10)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out


def run(argv: list[str], *, workdir_files: dict[str, bytes] | None = None, timeout_s: float = 60.0,
        mem_mb: int = 2048, outputs: list[str] | None = None, max_file_mb: int = 64,
        max_output_mb: int = 16) -> ToolResult:
    """Run `argv` in a fresh work dir inside the toolchain jail, without network, under limits.

    `workdir_files` are written into the work dir first; `outputs` (paths relative to it) are read back
    when they exist. stdout/stderr are cut at max_output_mb while they are read."""
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
    jail_root = base / f"{name}.root"  # an empty mount point; the jail's root is mounted on it
    work.mkdir(mode=0o700)
    jail_root.mkdir(mode=0o700)
    as_root = os.geteuid() == 0
    try:
        for n, data in files.items():
            p = work / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        if as_root:
            for p in [work, *work.rglob("*")]:
                os.lchown(p, _jail_id(), _jail_id())
        inner = ["/usr/bin/env", "-i", f"--chdir=/{WORK_ROOT}/{name}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                 "HOME=/tmp", "LC_ALL=C", "TMPDIR=/tmp", *argv]
        ns = ["--mount", "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child"]
        if not as_root:
            ns = ["--user", "--map-root-user", *ns]
        jail = ["unshare", *ns, "/bin/sh", "-c", _JAIL_SH, "jail", str(jail_root), str(root), str(work),
                name, "drop" if as_root else "keep", *inner]
        limits = ["prlimit", f"--cpu={max(1, int(timeout_s))}", f"--as={mem_mb << 20}",
                  f"--fsize={max_file_mb << 20}", "--nofile=256", "--core=0"]
        if as_root:
            limits.append("--nproc=64")  # counted per uid: the jails' processes only
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(limits + jail, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    env={**os.environ, "JAIL_ID": str(JAIL_ID)})
        except FileNotFoundError as e:
            raise InfrastructureError(f"cannot run the toolchain jail: {e.filename} is missing",
                                      hint="install util-linux and coreutils") from e
        out, err, timed_out = _communicate_capped(proc, timeout_s, max_output_mb << 20)
        result = ToolResult(rc=proc.returncode if not timed_out else -signal.SIGKILL,
                            stdout=out.decode(errors="replace"),
                            stderr=_unjail(err.decode(errors="replace"), name),
                            timed_out=timed_out, duration_s=time.monotonic() - t0)
        for o in outs:
            p = work / o
            if p.is_file() and not p.is_symlink():
                result.outputs[o] = p.read_bytes()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            jail_root.rmdir()
        except OSError:
            pass


def _unjail(text: str, name: str) -> str:
    """Diagnostics name files by their chroot path; show them relative to the work dir."""
    return re.sub(rf"/{WORK_ROOT}/{name}/", "", text)
