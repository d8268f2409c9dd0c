"""The sandbox VM: qemu booting the sched_ext kernel with a tiny guest agent, driven from the host.

    with VM() as vm:                                   # small image: busybox + loader (verify)
        r = vm.run("schedcp-loader --verify obj.o", files={"obj.o": data}, timeout_s=30)
    with VM(full=True) as vm:                          # + stress-ng, hackbench, perf (workloads)
        ...

The guest's init (`guest/init.sh`) mounts the kernel filesystems and hands PID 1 to `schedcp-agent`
(`guest/agent.c`), which serves a line + exact-length-body protocol over a virtio-serial port
(`org.schedcp.agent`; virtio-pci and virtio-console are built into the Debian cloud kernel) bound to a
host unix socket: a request carries the script, its files and the names of the outputs wanted; the
reply carries rc, stdout, stderr and those files. One boot serves any number of commands (the warm
path); the agent forks once per command, which matters under TCG where a fork costs tens of ms.

Every boot, command and shutdown is bounded by a timeout; on a timeout or a dead guest the qemu
process group is killed and `InfrastructureError` (`GuestTimeout` for a hung command) is raised. An
ephemeral VM never outlives its owner: close() / the context manager / a finalizer / atexit kill it,
and should the owner die without running any of them (SIGKILL), the guest sees the channel close and
powers itself off.

Named VMs are long-lived and shared between processes (`VM.start_named("staging")`,
`VM.attach("staging")`, `VM.stop_named("staging")`): their pid, socket and console log live in
`$SCHEDCP_HOME/vms/<name>/` (one set per home: the deployments
recorded in that home's database own them), one process is attached at a time (an flock), and the guest powers itself off
after `idle_timeout_s` without requests, so a forgotten one ends by itself.

Restore instead of boot (`VM(restore=True)`, the verify path): the guest is restored from a saved
state of a booted, idle guest of this image (see vmstate.py) in a fraction of a boot; when there is
no usable state the VM boots, and saves one before anything runs in it. `vm.boot_path` says which
("restore" or "boot") and `vm.restore_note` why it booted. `$SCHEDCP_VM_RESTORE=0` turns it off.

Acceleration: KVM when a quick probe boot works (nested KVM on some hosts exists but faults), TCG
(`-accel tcg,thread=single -cpu max`: multi-threaded TCG crashed the guest while
switching schedulers, see _cmdline) otherwise; the probe result is cached in `<sandbox>/accel.json`.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import signal
import socket
import subprocess
import struct
import tempfile
import time
import weakref
from pathlib import Path, PurePosixPath

import psutil
from pydantic import BaseModel, ConfigDict, Field

from .. import config
from ..errors import BadInput, InfrastructureError, TransientError
from ..jobs import kinds
from . import image, vmstate

AGENT_PORT = "org.schedcp.agent"
QEMU = os.environ.get("SCHEDCP_QEMU", "qemu-system-x86_64")
#: qemu's minimal firmware: it hands over to the kernel faster than SeaBIOS (measured under TCG)
QBOOT = Path("/usr/share/qemu/qboot.rom")


def restore_enabled() -> bool:
    """Whether the verify path restores saved VM states ($SCHEDCP_VM_RESTORE=0: always boot)."""
    return os.environ.get("SCHEDCP_VM_RESTORE", "1") != "0"


class GuestTimeout(TransientError):
    """A guest command (or the boot) did not finish in time; the VM was killed."""


class GuestResult(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    rc: int
    stdout: str
    stderr: str
    outputs: dict[str, bytes] = Field(default_factory=dict, description="requested output files that existed")
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


# ---------------------------------------------------------------- the byte channel


class _Channel:
    """A unix-socket stream with line and exact-length reads bounded by deadlines."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, deadline: float, alive) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                if not alive():
                    raise ConnectionError("the VM exited")
                continue
            if not chunk:
                raise ConnectionError("the VM closed the agent channel")
            self.buf.extend(chunk)
            return

    def readline(self, deadline: float, alive) -> str:
        while b"\n" not in self.buf:
            self._fill(deadline, alive)
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return line.decode(errors="replace").strip()

    def readexact(self, n: int, deadline: float, alive) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline, alive)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def send(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            self.sock.sendall(data)
        except socket.timeout as e:
            raise TimeoutError from e


# ---------------------------------------------------------------- acceleration probe


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_accel(refresh: bool = False) -> str:
    """"kvm" when a probe VM boots and runs a command under KVM, else "tcg". Cached per host/image.

    $SCHEDCP_ACCEL=kvm|tcg overrides the probe."""
    forced = os.environ.get("SCHEDCP_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not _kvm_usable():
        return "tcg"
    m = image.ensure()
    key = {"host_kernel": os.uname().release, "qemu": shutil.which(QEMU) or QEMU, "kernel": m.kernel_version}
    cache = config.sandbox_dir() / "accel.json"
    if not refresh:
        try:
            c = json.loads(cache.read_text())
            if c.get("key") == key:
                return c["accel"]
        except (OSError, ValueError, KeyError):
            pass
    accel = "tcg"
    try:
        with VM(accel="kvm", boot_timeout_s=20) as vm:
            if vm.run("echo ok", timeout_s=10).stdout.strip() == "ok":
                accel = "kvm"
    except InfrastructureError:
        accel = "tcg"
    cache.write_text(json.dumps({"key": key, "accel": accel, "probed_at": time.time()}))
    return accel


# ---------------------------------------------------------------- who owns a running qemu

#: the job the VMs booted in this context belong to (set by the supervisor's workers): cancelling
#: the job kills them, from any process on this host (kill_job_vms, registered with the jobs below)
current_job = kinds.current_job


def _run_dir() -> Path:
    p = config.home() / "vms" / "run"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _proc_start(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _register(vm: "VM") -> Path:
    """A pidfile per ephemeral VM under the home: qemu's pid and socket, its owner and job."""
    path = _run_dir() / f"{vm.pid}.json"
    path.write_text(json.dumps({"pid": vm.pid, "sock": str(vm.sock_path), "owner_pid": os.getpid(),
                                "owner_start": _proc_start(os.getpid()), "job": current_job.get()}))
    return path


def _registered() -> list[tuple[Path, dict]]:
    out = []
    for p in _run_dir().glob("*.json"):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            p.unlink(missing_ok=True)
    return out


def _stop_registered(path: Path, e: dict) -> bool:
    alive = _pid_alive(e["pid"], e["sock"])
    if alive:
        _kill_group(e["pid"])
    path.unlink(missing_ok=True)
    return alive


def kill_job_vms(job_ids) -> int:
    """Kill the running VMs that belong to these jobs (a cancelled or abandoned job's). How many."""
    ids = set(job_ids)
    return sum(_stop_registered(p, e) for p, e in _registered() if e.get("job") in ids)


def reap_orphans() -> int:
    """Kill the VMs whose owner process is gone (it was SIGKILLed: no finalizer ran). How many."""
    n = 0
    for p, e in _registered():
        owner_alive = abs(_proc_start(e["owner_pid"]) - e["owner_start"]) < 1.0 and e["owner_start"]
        if not owner_alive or not _pid_alive(e["pid"], e["sock"]):
            n += _stop_registered(p, e)
    return n


kinds.on_release(kill_job_vms, reap_orphans)  # a job's VMs end with the job


def running_vms() -> list[dict]:
    """The ephemeral VMs this home knows to be running (pid, owner, job)."""
    return [e for _, e in _registered() if _pid_alive(e["pid"], e["sock"])]


# ---------------------------------------------------------------- VM

_LIVE: "weakref.WeakSet[VM]" = weakref.WeakSet()


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGKILL,):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _finalize(proc: subprocess.Popen | None, tmpdir: str | None) -> None:
    if proc is not None and proc.poll() is None:
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


@atexit.register
def _kill_all_at_exit() -> None:
    for vm in list(_LIVE):
        try:
            vm.close(graceful=False)
        except Exception:  # noqa: BLE001 — best effort at interpreter exit
            pass


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 40:
        raise BadInput(f"bad VM name {name!r}", hint="use letters, digits, - and _")
    return name


def _named_dir(name: str) -> Path:
    # per schedcp home, not per image: a staging VM belongs with the deployments recorded beside it
    return config.home() / "vms" / _check_name(name)


def _sock_path(vmdir: Path) -> Path:
    p = vmdir / "agent.sock"
    if len(str(p)) < 100:
        return p
    # a socket path must stay under ~108 bytes; a shared /tmp name is only used when it is ours:
    # a directory (not a link) owned by this user and closed to others (else another user could
    # plant it, or listen on our socket's name)
    short = config.private_dir(Path(tempfile.gettempdir()) / f"schedcp-{os.getuid()}")
    return short / (hashlib.sha256(str(vmdir).encode()).hexdigest()[:16] + ".sock")


def _lock(d: Path, wait_s: float, name: str):
    """The named VM's attachment lock (an flock on <dir>/lock), waiting up to wait_s for it."""
    f = open(d / "lock", "w")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise InfrastructureError(f"the sandbox VM {name!r} is busy (another process is attached)",
                                          hint="wait for it, or stop the VM")
            time.sleep(0.1)


def _pid_alive(pid: int, sock: str) -> bool:
    """Is `pid` still our qemu (and not a recycled pid)?"""
    try:
        return sock.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _sweep_stale_tmpdirs(min_age_s: float = 120) -> None:
    """Remove the temporary dirs of ephemeral VMs whose owner died without cleaning up."""
    for d in Path(tempfile.gettempdir()).glob("schedcp-vm-*"):
        try:
            st = d.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # only our own: never another user's VM, never through a link
            if time.time() - st.st_mtime < min_age_s:
                continue
            pid = int((d / "qemu.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid, str(d)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _realtime_if_asked(pid: int | None) -> None:
    """SCHEDCP_VM_RT=1: run every qemu thread SCHED_FIFO (priority 1), for A/B figures on a host other
    work shares: a TCG guest's clock keeps running while the host preempts its vCPU thread, and on a
    loaded 2-core host that made the same scheduler's timings vary ±100 % between rounds (A/A:
    ±12-42 % with it). Needs CAP_SYS_NICE; silently skipped without it."""
    if not pid or os.environ.get("SCHEDCP_VM_RT") != "1":
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            return


class VM:
    """A sched_ext sandbox VM. See the module docstring."""

    def __init__(self, *, full: bool = False, accel: str | None = None, mem_mb: int = 1536, cpus: int = 2,
                 boot_timeout_s: float | None = None, idle_timeout_s: int = 0, extra_cmdline: str = "",
                 restore: bool = False, _vmdir: Path | None = None, _detached: bool = False, _manifest: image.Manifest | None = None):
        self.manifest = _manifest or image.ensure()
        self.full = full
        self.accel = accel or probe_accel()
        self.mem_mb = mem_mb
        self.cpus = cpus
        self.boot_timeout_s = boot_timeout_s or (30.0 if self.accel == "kvm" else 90.0)
        self.idle_timeout_s = idle_timeout_s
        self.extra_cmdline = extra_cmdline
        self.name: str | None = None
        self.kernel_version: str = ""
        self.boot_s: float = 0.0
        #: restore from a saved state of a booted idle guest instead of booting (ephemeral VMs only)
        self.restore = restore and not _detached
        self.boot_path: str = ""        # "restore" or "boot", once started
        self.restore_note: str = ""     # why a restore=True VM booted (and whether it saved a state)
        self.state_save_s: float = 0.0
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self._chan: _Channel | None = None
        self._lock_f = None
        self._detached = _detached
        self._tmpdir: str | None = None
        if _vmdir is None:
            _sweep_stale_tmpdirs()
            self._tmpdir = tempfile.mkdtemp(prefix="schedcp-vm-")
            _vmdir = Path(self._tmpdir)
        self.dir = _vmdir
        self.sock_path = _sock_path(self.dir)
        self.console_path = self.dir / "console.log"
        self.qmp_path = self.sock_path.with_name(self.sock_path.stem + ".qmp")
        self._finalizer = None
        self._killed = False

    # ------------------------------------------------------------ lifecycle

    def _cmdline(self, incoming: bool = False) -> list[str]:
        m = self.manifest
        initrd = m.paths.initramfs_full if self.full else m.paths.initramfs
        # quiet: a serial console is slow under TCG; panic=-1 + -no-reboot: a panic ends qemu
        append = (f"console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests "
                  f"schedcp.idle={int(self.idle_timeout_s)} schedcp.ephemeral={0 if self._detached else 1}")
        if self.extra_cmdline:
            append += " " + self.extra_cmdline
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            # single-threaded TCG: with thread=multi the guest kernel oopsed (int3 in try_to_wake_up,
            # text poking racing the other vCPU thread) in 1 of 3 boots that switched schedulers 68
            # times; thread=single: 0 in 96 switches, and no slower on this 2-core machine
            # (2.6 s vs 2.9 s per load/unload cycle under stress).
            accel = ["-accel", "tcg,thread=single", "-cpu", "max"]
        return [
            QEMU, "-name", f"schedcp-{self.name or 'vm'}", *accel, "-smp", str(self.cpus), "-m", str(self.mem_mb),
            *(["-bios", str(QBOOT)] if QBOOT.exists() else []),
            "-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-no-reboot",
            "-kernel", m.paths.boot_kernel, "-initrd", initrd, "-append", append,
            "-chardev", f"file,id=con,path={self.console_path}", "-serial", "chardev:con",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=agent,path={self.sock_path},server=on,wait=off",
            "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
            "-pidfile", str(self.dir / "qemu.pid"),
            # QMP (not a guest device): to save this guest's state, or to restore one into it
            *(["-qmp", f"unix:{self.qmp_path},server=on,wait=off"] if self.restore else []),
            *(["-incoming", "defer"] if incoming else []),
        ]

    @property
    def variant(self) -> str:
        return "full" if self.full else "small"

    def state_key(self) -> dict:
        """What a saved state must have been saved with to stand in for this VM's boot: the image
        build, qemu, the accelerator, CPUs, memory and the machine arguments (this VM's own paths
        blanked: they are the host's side, not the guest's)."""
        argv = self._cmdline()
        if "-qmp" in argv:
            i = argv.index("-qmp")
            del argv[i:i + 2]
        norm = [a.replace(str(self.sock_path), "<agent.sock>").replace(str(self.dir), "<vmdir>") for a in argv[1:]]
        return {"build_id": self.manifest.build_id, "qemu": vmstate.qemu_version(QEMU), "accel": self.accel,
                "cpus": self.cpus, "mem_mb": self.mem_mb,
                "host_cpu": vmstate.host_cpu() if self.accel == "kvm" else "", "machine": norm}

    def state_path(self) -> Path:
        return vmstate.state_path(self.manifest.build_id, self.variant)

    def start(self) -> "VM":
        if self.proc is not None:
            return self
        if shutil.which(QEMU) is None:
            raise InfrastructureError(f"{QEMU} is not installed", hint="apt-get install qemu-system-x86")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.restore:
            # a VM whose owner was SIGKILLed while its state was being saved stays paused (it cannot
            # see its host go): the next restore=True start in this home ends it
            reap_orphans()
            key = self.state_key()
            try:
                fd, saved, why = vmstate.open_state(self.state_path(), key)
            except OSError as e:  # no state directory (a read-only sandbox dir): just boot
                fd, saved, why, key = None, {}, f"no place for saved VM states: {e}", None
            if fd is not None:
                try:
                    self._restore(fd, saved)
                    return self
                except (InfrastructureError, TimeoutError, ConnectionError, OSError, ValueError) as e:
                    why = f"restoring the saved VM state {self.state_path().name} failed: {e}{self._qemu_log()}"
                    stopped = self._killed  # by its owner (a cancelled verify): do not boot then
                    self._discard()
                    if stopped:
                        raise TransientError("the sandbox VM was stopped while it was being restored") from e
                    self.dir.mkdir(parents=True, exist_ok=True)
                finally:
                    os.close(fd)
            self.restore_note = why
        self._boot()
        if self.restore and key is not None:
            self._save_state(key)
        return self

    def _spawn(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        for p in (self.sock_path, self.qmp_path):
            p.unlink(missing_ok=True)
        log = open(self.dir / "qemu.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, pass_fds=pass_fds)
        log.close()
        self.pid = self.proc.pid
        if not self._detached:
            self._reg_path = _register(self)
            self._finalizer = weakref.finalize(self, _finalize, self.proc, self._tmpdir)
            _LIVE.add(self)

    def _discard(self) -> None:
        """After a failed restore: kill that qemu (keeping the VM's dir) so that a boot can follow."""
        self.kill()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.proc = self.pid = None
        self._killed = False

    def _restore(self, fd: int, saved: dict) -> None:
        """Start qemu waiting for a state, connect the agent's socket (so the restored guest never
        sees its host go away: an ephemeral guest would power off), load the state, and check that
        the agent answers on the new channel; then set the guest's wall clock, which stood still."""
        t0 = time.monotonic()
        deadline = t0 + min(self.boot_timeout_s, 60.0)
        self._spawn(self._cmdline(incoming=True), pass_fds=(fd,))
        qmp = vmstate.QMP(self.qmp_path, deadline, self._alive)
        try:
            self._connect(deadline)
            while not qmp.agent_connected():
                if time.monotonic() > deadline:
                    raise TimeoutError("qemu did not accept the agent connection")
                time.sleep(0.002)
            vmstate.restore(qmp, fd, deadline)
        finally:
            qmp.close()
        # the first command on the new channel (it proves the agent answers) sets the wall clock
        rc, res = self._request(f"date -u -s @{time.time():.0f} >/dev/null", deadline)
        if rc != 0:
            raise InfrastructureError(f"could not set the restored guest's clock: {res['stderr'].strip()[:200]}")
        self.kernel_version = saved.get("kernel_version", "")
        self.boot_path = "restore"
        self.boot_s = time.monotonic() - t0
        _realtime_if_asked(self.pid)

    def _request(self, script: str, deadline: float, files: dict[str, bytes] | None = None,
                 outputs: list[str] | None = None) -> tuple[int, dict]:
        """One RUN over the channel: (rc, stdout/stderr/outputs). Raises TimeoutError or
        ConnectionError/OSError and leaves the VM as it is (run() decides what a failure means)."""
        payload = _pack_request(script, files or {}, outputs or [])
        rid = secrets.token_hex(6)
        self._chan.send(f"RUN {rid} {len(payload)}\n".encode() + payload, deadline)
        while True:
            parts = self._chan.readline(deadline, self._alive).split()
            if len(parts) == 4 and parts[0] == "DONE" and parts[1] == rid:
                body = self._chan.readexact(int(parts[3]), deadline, self._alive)
                return int(parts[2]), _unpack_result(body)

    def _ping(self, deadline: float) -> None:
        nonce = secrets.token_hex(6)
        self._chan.send(f"PING {nonce}\n".encode(), deadline)
        while self._chan.readline(deadline, self._alive) != f"PONG {nonce}":
            pass  # skips anything unread

    def _save_state(self, key: dict) -> None:
        """Save this freshly booted, idle guest as the state later VMs restore (before anything ran)."""
        path = self.state_path()
        try:
            qmp = vmstate.QMP(self.qmp_path, time.monotonic() + 10, self._alive)
            try:
                self.state_save_s = vmstate.save(qmp, path, {**key, "kernel_version": self.kernel_version,
                                                             "saved_at": time.time()})
            finally:
                qmp.close()
            self.restore_note += f"; saved a new VM state ({self.state_save_s:.2f} s)"
        except (InfrastructureError, TimeoutError, ConnectionError, OSError, ValueError) as e:
            self.restore_note += f"; could not save a VM state: {e}"
        try:
            self._ping(time.monotonic() + 15)  # the guest runs on after the save
        except (TimeoutError, ConnectionError, OSError) as e:
            self.close(graceful=False)
            raise TransientError(f"the sandbox VM stopped answering after its state was saved: {e}") from e

    def _boot(self) -> None:
        t0 = time.monotonic()
        self._spawn(self._cmdline())
        deadline = t0 + self.boot_timeout_s
        try:
            self._connect(deadline)
            while True:
                line = self._chan.readline(deadline, self._alive)
                if line.startswith("READY"):
                    self.kernel_version = line.split(" ", 1)[1] if " " in line else ""
                    break
        except (TimeoutError, ConnectionError, OSError) as e:
            why = "did not boot" if not isinstance(e, TimeoutError) else \
                f"did not boot within {self.boot_timeout_s:.0f} s"
            err = (GuestTimeout if isinstance(e, TimeoutError) else TransientError)(
                f"the sandbox VM {why} ({self.accel}): {e or ''}".rstrip(": "),
                hint="console tail: " + self.console()[-800:].strip().replace("\n", " | ") + self._qemu_log())
            self.kill()
            if self._finalizer is not None:
                self._finalizer()  # an ephemeral VM's temporary dir goes too
            raise err from e
        self.boot_s = time.monotonic() - t0
        self.boot_path = "boot"
        _realtime_if_asked(self.pid)

    def _qemu_log(self) -> str:
        try:
            t = (self.dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        return f" | qemu: {t[-400:]}" if t else ""

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid, str(self.sock_path))

    def _connect(self, deadline: float) -> None:
        while True:
            if not self._alive():
                raise ConnectionError("qemu exited during start-up")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock_path))
                self._chan = _Channel(s)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("no agent socket")
                time.sleep(0.02)

    def kill(self) -> None:
        """Kill the qemu process group now."""
        self._killed = True
        if self._chan is not None:
            self._chan.sock.close()
            self._chan = None
        if self.proc is not None:
            if self.proc.poll() is None:
                _kill_group(self.proc.pid)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        elif self.pid is not None and _pid_alive(self.pid, str(self.sock_path)):
            _kill_group(self.pid)
            for _ in range(100):
                if not _pid_alive(self.pid, str(self.sock_path)):
                    break
                time.sleep(0.05)
        _LIVE.discard(self)
        if getattr(self, "_reg_path", None) is not None:
            self._reg_path.unlink(missing_ok=True)

    def close(self, graceful: bool = True, timeout_s: float = 10.0) -> None:
        """Power the VM off (killing it when it does not stop in time). A named VM is only detached."""
        if self._detached:
            self.detach()
            return
        if self.proc is not None and self.proc.poll() is None and graceful and self._chan is not None:
            try:
                self._chan.send(b"POWEROFF\n", time.monotonic() + 2)
                self.proc.wait(timeout=timeout_s)
            except (OSError, TimeoutError, subprocess.TimeoutExpired):
                pass
        self._console_cache = self.console()
        self.kill()
        if self._finalizer is not None:
            self._finalizer()  # removes the temporary dir

    def detach(self) -> None:
        if self._chan is not None:
            self._chan.sock.close()
            self._chan = None
        if self._lock_f is not None:
            self._lock_f.close()
            self._lock_f = None

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._alive()

    # ------------------------------------------------------------ commands

    def run(self, script: str, files: dict[str, bytes] | None = None, timeout_s: float = 60.0,
            outputs: list[str] | None = None) -> GuestResult:
        """Run a shell script in the guest (in a fresh work dir holding `files`); return rc, output and
        the `outputs` files that exist afterwards. A timeout kills the VM and raises GuestTimeout."""
        if self._chan is None:
            raise InfrastructureError("the sandbox VM is not running")
        files = files or {}
        outputs = outputs or []
        for n in list(files) + outputs:
            _check_rel(n)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            rc, res = self._request(script, deadline, files, outputs)
        except TimeoutError:
            self._die()
            raise GuestTimeout(f"the guest command did not finish within {timeout_s:.0f} s; the VM was killed",
                               hint="a scheduler that stalls the guest, or a workload too long for the timeout")
        except (ConnectionError, OSError) as e:
            self._die()
            raise TransientError(f"the sandbox VM died during a command: {e}",
                                      hint="console tail: " + self.console()[-600:].strip().replace("\n", " | "))
        return GuestResult(rc=rc, duration_s=time.monotonic() - t0, **res)

    def _die(self) -> None:
        """After a failure: an ephemeral VM is killed; a named one too (it cannot be trusted to be sane)."""
        if self._detached:
            self.kill()
            self.detach()
        else:
            self.close(graceful=False)

    def dmesg(self) -> str:
        """The guest kernel log (through the agent; the console log when the guest is gone)."""
        if self._chan is not None and self._alive():
            r = self.run("dmesg", timeout_s=30)
            if r.rc == 0:
                return r.stdout
        return self.console()

    def console(self) -> str:
        """What the kernel printed on its console (ttyS0): panics, oopses, messages above loglevel."""
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return getattr(self, "_console_cache", "")

    # ------------------------------------------------------------ named, long-lived VMs

    @classmethod
    def start_named(cls, name: str, *, full: bool = True, idle_timeout_s: int = 1800, **kw) -> "VM":
        """Boot a long-lived VM (or attach to the running one of that name) and attach to it."""
        d = _named_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        lock = _lock(d, 120, name)  # one starter at a time; re-check under the lock
        st = cls.named_status(name)
        if st is not None:
            return cls._attach(name, st, lock)
        try:
            vm = cls(full=full, idle_timeout_s=idle_timeout_s, _vmdir=d, _detached=True, **kw)
        except BaseException:
            lock.close()
            raise
        vm.name = name
        vm._lock_f = lock
        vm.start()
        (d / "state.json").write_text(json.dumps({
            "name": name, "pid": vm.pid, "sock": str(vm.sock_path), "console": str(vm.console_path),
            "accel": vm.accel, "full": full, "kernel_version": vm.kernel_version, "build_id": vm.manifest.build_id,
            "idle_timeout_s": idle_timeout_s, "started_at": time.time(), "boot_s": round(vm.boot_s, 2)}))
        return vm

    @classmethod
    def attach(cls, name: str, wait_s: float = 60.0) -> "VM":
        """Attach to a running named VM (waiting up to wait_s for another process to detach)."""
        if cls.named_status(name) is None:
            raise InfrastructureError(f"no sandbox VM named {name!r} is running",
                                      hint=f"start it with VM.start_named({name!r})")
        lock = _lock(_named_dir(name), wait_s, name)
        st = cls.named_status(name)
        if st is None:
            lock.close()
            raise InfrastructureError(f"the sandbox VM {name!r} stopped while we waited for it")
        return cls._attach(name, st, lock)

    @classmethod
    def _attach(cls, name: str, st: dict, lock) -> "VM":
        """A VM object for a named VM another process started (from its state.json), connected."""
        vm = cls(full=st["full"], accel=st["accel"], idle_timeout_s=st["idle_timeout_s"],
                 _vmdir=_named_dir(name), _detached=True, _manifest=image.load_manifest())
        vm.name, vm.kernel_version, vm.boot_s, vm.pid = name, st["kernel_version"], st.get("boot_s", 0.0), st["pid"]
        vm.sock_path, vm.console_path, vm._lock_f = Path(st["sock"]), Path(st["console"]), lock
        deadline = time.monotonic() + 10
        try:
            vm._connect(deadline)
            nonce = secrets.token_hex(6)
            vm._chan.send(f"PING {nonce}\n".encode(), deadline)
            while vm._chan.readline(deadline, vm._alive) != f"PONG {nonce}":
                pass  # skips what a previous client left unread
        except (TimeoutError, ConnectionError, OSError) as e:
            vm.detach()
            raise InfrastructureError(f"the sandbox VM {name!r} does not answer: {e or 'timeout'}",
                                      hint=f"stop it with VM.stop_named({name!r}) (`schedcp sandbox stop`)")
        return vm

    @staticmethod
    def named_status(name: str) -> dict | None:
        """The state of a running named VM, or None (cleaning up after one that has exited)."""
        d = _named_dir(name)
        try:
            st = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if _pid_alive(st["pid"], st["sock"]):
            return st
        (d / "state.json").unlink(missing_ok=True)
        return None

    @classmethod
    def stop_named(cls, name: str, timeout_s: float = 15.0) -> bool:
        """Power off a named VM (killing it if it does not stop). False when none was running."""
        st = cls.named_status(name)
        if st is None:
            return False
        try:
            vm = cls.attach(name, wait_s=min(5.0, timeout_s))
            vm._chan.send(b"POWEROFF\n", time.monotonic() + 2)
            vm.detach()
        except (InfrastructureError, OSError, TimeoutError):
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_alive(st["pid"], st["sock"]):
            time.sleep(0.1)
        if _pid_alive(st["pid"], st["sock"]):
            _kill_group(st["pid"])
            time.sleep(0.2)
        (_named_dir(name) / "state.json").unlink(missing_ok=True)
        return True


# ---------------------------------------------------------------- request/response packing


def _check_rel(name: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\n" in name:
        raise BadInput(f"guest file name {name!r} must be a relative path without '..'")


def _rec(kind: bytes, name: str, data: bytes) -> bytes:
    n = name.encode()
    return kind + struct.pack("<II", len(n), len(data)) + n + data


def _pack_request(script: str, files: dict[str, bytes], outputs: list[str]) -> bytes:
    """Records (see guest/agent.c): the script, the work files, the names of the outputs wanted."""
    parts = [_rec(b"S", "script.sh", script.encode())]
    parts += [_rec(b"F", name, data) for name, data in files.items()]
    parts += [_rec(b"O", name, b"") for name in outputs]
    return b"".join(parts)


def _unpack_result(body: bytes) -> dict:
    out: dict = {"stdout": "", "stderr": "", "outputs": {}}
    off = 0
    while off + 9 <= len(body):
        kind = body[off:off + 1]
        nl, dl = struct.unpack_from("<II", body, off + 1)
        off += 9
        name = body[off:off + nl].decode(errors="replace")
        data = body[off + nl:off + nl + dl]
        off += nl + dl
        if kind == b"o":
            out["stdout"] = data.decode(errors="replace")
        elif kind == b"e":
            out["stderr"] = data.decode(errors="replace")
        elif kind == b"F":
            out["outputs"][name] = data
    return out
