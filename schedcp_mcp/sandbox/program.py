"""Scheduler programs: a sched_ext scheduler that comes with its own userspace loader (the kernel's
tools/sched_ext examples, sched-ext/scx's schedulers), started the way its author starts it.

Where `scheduler.py` drives schedcp's generic loader with a BPF object, this module drives a program:
copied into the guest, started there with its arguments in its own session, its stdout and stderr
kept (a program's libbpf prints the kernel verifier's log there when a load fails), and judged by the
kernel's own state: `/sys/kernel/sched_ext/state` must turn `enabled` with a `root/ops` within
`scheduler.START_WAIT_S`. Stopping it is SIGINT (what every example scheduler and scx's handle: they
detach and print their exit), and if it has not exited after `scheduler.STOP_WAIT_S`, the kernel's own
disable (SysRq-S: "disable sched_ext, move every task back to the fair class"), then SIGKILL.

Untrusted programs run only in the guest. The shared libraries a program needs (its ELF DT_NEEDED and
interpreter, read on the host without running it) are checked against the guest's library
directories before it is started: a program whose libraries the guest lacks is refused, naming them.

`Launcher` is the seam layer 2 uses (validate.runner): how the candidate is shipped, started and
stopped. `ObjectLauncher` is the generic loader with a BPF object; `ProgramLauncher` a program.
"""

from __future__ import annotations

import io
import re
import shlex
from dataclasses import dataclass, field

from ..errors import BadInput
from . import scheduler

#: where the guest's dynamic linker looks (Debian multiarch + the usual)
GUEST_LIB_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib",
                  "/usr/lib", "/usr/local/lib"]
MAX_PROGRAM_BYTES = 256 << 20
#: how much of a program's stdout / stderr a report keeps (the end of each)
KEEP_OUTPUT = 6000


@dataclass
class ElfInfo:
    interpreter: str | None
    needed: list[str] = field(default_factory=list)
    static: bool = False


def inspect_elf(data: bytes, what: str = "the program") -> ElfInfo:
    """What the dynamic linker will need to start `data`: its interpreter and DT_NEEDED libraries.
    Refuses (BadInput) what is not an x86-64 Linux executable, before anything is copied anywhere."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    if not data:
        raise BadInput(f"{what} is empty")
    if len(data) > MAX_PROGRAM_BYTES:
        raise BadInput(f"{what} is {len(data) >> 20} MB; the limit is {MAX_PROGRAM_BYTES >> 20} MB")
    if data[:4] != b"\x7fELF":
        raise BadInput(f"{what} is not an ELF executable (a script or data file?)",
                       "give a compiled scheduler program, e.g. the kernel's scx_simple (`schedcp peers build`)")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_X86_64" or elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise BadInput(f"{what} is an ELF {elf['e_type']} for {elf['e_machine']}, not an x86-64 executable",
                           "the sandbox guest is x86-64 Linux")
        interp, needed = None, []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    except ELFError as e:
        raise BadInput(f"{what} is not a readable ELF file: {e}") from None
    return ElfInfo(interpreter=interp, needed=needed, static=interp is None and not needed)


def libraries_script(info: ElfInfo) -> str:
    """Prints `@@MISSING <name>` for each library (and the interpreter) the guest does not have."""
    checks = []
    if info.interpreter:
        checks.append(f"[ -e {shlex.quote(info.interpreter)} ] || echo '@@MISSING {info.interpreter}'")
    dirs = " ".join(GUEST_LIB_DIRS)
    for lib in info.needed:
        if "/" in lib:
            checks.append(f"[ -e {shlex.quote(lib)} ] || echo {shlex.quote('@@MISSING ' + lib)}")
        else:
            checks.append(f"f=; for d in {dirs}; do [ -e \"$d\"/{shlex.quote(lib)} ] && f=1 && break; done; "
                          f"[ -n \"$f\" ] || echo {shlex.quote('@@MISSING ' + lib)}")
    return "\n".join(checks) + "\necho '@@LIBSDONE'\n"


def parse_missing(out: str) -> list[str]:
    return re.findall(r"^@@MISSING (.+)$", out, re.M)


# --- starting and stopping a program -------------------------------------------------------------

def start_script(path: str, args: list[str], files: scheduler.Files) -> str:
    """Start the program in its own session (stdout → .out, stderr → .err) and wait until the kernel
    says `enabled` with a root ops, or the program ended. Prints `@@RUNNING <ops>` or `@@EXITED <rc>`,
    then the ends of its stdout and stderr."""
    f = files
    cmd = shlex.join([path, *args])
    return f"""
mkdir -p {f.run_dir}; rm -f {f.run_dir}/{f.name}.out {f.err} {f.run_dir}/{f.name}.rc
( setsid {cmd} >{f.run_dir}/{f.name}.out 2>{f.err} </dev/null 3>&- & p=$!; echo $p >{f.pid}; wait $p; \
echo $? >{f.run_dir}/{f.name}.rc ) >/dev/null 2>&1 </dev/null &
i=0
while [ ! -s {f.pid} ] && [ $i -lt 50 ]; do sleep 0.02; i=$((i + 1)); done
pid=$(cat {f.pid})
i=0
while [ $i -lt {scheduler.START_WAIT_S * 10} ]; do
	[ "$(scx_state)" = enabled ] && [ -n "$(scx_ops)" ] && break
	scx_alive $pid || break
	sleep 0.1; i=$((i + 1))
done
if scx_alive $pid && [ "$(scx_state)" = enabled ]; then echo "@@RUNNING $(scx_ops)"
elif scx_alive $pid; then echo "@@NOTENABLED $(scx_state)"
else sleep 0.2; echo "@@EXITED $(cat {f.run_dir}/{f.name}.rc 2>/dev/null)"; fi
echo '@@OUT'; tail -c {KEEP_OUTPUT} {f.run_dir}/{f.name}.out; echo; echo '@@ERR'; tail -c {KEEP_OUTPUT} {f.err}; echo
echo '@@ERREND'
"""


def stop_script(files: scheduler.Files) -> str:
    """SIGINT; when it has not exited after STOP_WAIT_S, the kernel's own disable (SysRq-S), then SIGKILL.
    Prints `@@STOPPED <state> <how>` (sigint | sysrq | gone) and the ends of its stdout and stderr."""
    f = files
    return f"""
pid=$(cat {f.pid} 2>/dev/null)
how=gone
if scx_alive "$pid"; then
	how=sigint
	kill -INT $pid
	i=0; while [ $i -lt {scheduler.STOP_WAIT_S * 10} ] && scx_alive "$pid"; do sleep 0.1; i=$((i + 1)); done
	if scx_alive "$pid"; then
		how=sysrq
		[ "$(scx_state)" = enabled ] && echo S >/proc/sysrq-trigger
		scx_wait_disabled
		kill -KILL $pid; sleep 0.3
	fi
fi
scx_wait_disabled
rm -f {f.pid}
echo "@@STOPPED $(scx_state) $how $(cat {f.run_dir}/{f.name}.rc 2>/dev/null)"
echo '@@OUT'; tail -c {KEEP_OUTPUT} {f.run_dir}/{f.name}.out 2>/dev/null; echo; echo '@@ERR'; \
tail -c {KEEP_OUTPUT} {f.err} 2>/dev/null; echo
echo '@@ERREND'
"""


def _between(out: str, a: str, b: str) -> str:
    i = out.find(a)
    if i < 0:
        return ""
    j = out.find(b, i + len(a))
    return out[i + len(a): j if j >= 0 else None].strip("\n")


@dataclass
class ProgramStart:
    running: bool
    ops: str | None = None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None


@dataclass
class ProgramStop:
    state: str
    how: str
    rc: int | None
    stdout: str = ""
    stderr: str = ""


def parse_start(out: str) -> ProgramStart:
    so, se = _between(out, "@@OUT\n", "\n@@ERR"), _between(out, "@@ERR\n", "@@ERREND").rstrip("\n")
    if m := re.search(r"^@@RUNNING (\S+)\s*$", out, re.M):
        return ProgramStart(True, ops=m.group(1), stdout=so, stderr=se)
    if m := re.search(r"^@@NOTENABLED (\S*)", out, re.M):
        return ProgramStart(False, stdout=so, stderr=se,
                            error=f"the program was still running after {scheduler.START_WAIT_S} s but sched_ext "
                                  f"was {m.group(1) or 'absent'}: it never attached")
    m = re.search(r"^@@EXITED ?(\d*)", out, re.M)
    rc = int(m.group(1)) if m and m.group(1) else None
    tail = (se or so).strip().splitlines()[-3:]
    return ProgramStart(False, rc=rc, stdout=so, stderr=se,
                        error=f"the program exited (status {rc if rc is not None else '?'}) before sched_ext was "
                              f"enabled" + (f": {' / '.join(tail)}" if tail else ""))


def parse_stop(out: str) -> ProgramStop:
    m = re.search(r"^@@STOPPED (\S+) (\S+) ?(\d*)", out, re.M)
    return ProgramStop(state=m.group(1) if m else "unknown", how=m.group(2) if m else "unknown",
                       rc=int(m.group(3)) if m and m.group(3) else None,
                       stdout=_between(out, "@@OUT\n", "\n@@ERR"),
                       stderr=_between(out, "@@ERR\n", "@@ERREND").rstrip("\n"))


def verifier_log(stderr: str) -> str:
    """The kernel verifier's log as libbpf prints it on a failed load (between its BEGIN/END markers),
    or ''."""
    m = re.search(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", stderr, re.S)
    if m:
        return m.group(1)
    # a long log whose beginning fell off the kept tail: what is left of it, up to its end marker
    head, end, _ = stderr.partition("-- END PROG LOAD LOG --")
    return head if end else ""


# --- the seam layer 2 starts and stops a candidate through ---------------------------------------

class Launcher:
    """How layer 2 ships, starts and stops its candidate (validate.runner._Run)."""

    def files(self) -> dict[str, bytes]:
        raise NotImplementedError

    def start(self, run_dir: str, files: scheduler.Files) -> str:
        raise NotImplementedError

    def parse_start(self, out: str) -> scheduler.Started:
        raise NotImplementedError

    def stop(self, files: scheduler.Files) -> str:
        raise NotImplementedError

    def parse_stop(self, out: str) -> scheduler.Stopped:
        raise NotImplementedError


@dataclass
class ObjectLauncher(Launcher):
    """schedcp's generic loader with a BPF object (`--run`, the watchdog at `timeout_ms`)."""

    obj: bytes
    params: dict[str, str]
    timeout_ms: int | None

    def files(self) -> dict[str, bytes]:
        return {"obj.bpf.o": self.obj}

    def start(self, run_dir: str, files: scheduler.Files) -> str:
        return scheduler.start_script(f"{run_dir}/obj.bpf.o", self.params, files, self.timeout_ms)

    def parse_start(self, out: str) -> scheduler.Started:
        return scheduler.parse_start(out)

    def stop(self, files: scheduler.Files) -> str:
        return scheduler.stop_script(files)

    def parse_stop(self, out: str) -> scheduler.Stopped:
        return scheduler.parse_stop(out)


@dataclass
class ProgramLauncher(Launcher):
    """A scheduler program with its arguments (its own watchdog timeout: the validation's
    `timeout_ms` does not reach it). Its stdout/stderr of each start are kept in `outputs`."""

    data: bytes
    args: list[str]
    outputs: list[tuple[str, str]] = field(default_factory=list)

    def files(self) -> dict[str, bytes]:
        return {"prog": self.data}

    def start(self, run_dir: str, files: scheduler.Files) -> str:
        return start_script(f"{run_dir}/prog", self.args, files)

    def parse_start(self, out: str) -> scheduler.Started:
        s = parse_start(out)
        if not s.running:
            self.outputs.append((s.stdout, s.stderr))
        return scheduler.Started(running=s.running, error=s.error)

    def stop(self, files: scheduler.Files) -> str:
        return stop_script(files)

    def parse_stop(self, out: str) -> scheduler.Stopped:
        s = parse_stop(out)
        self.outputs.append((s.stdout, s.stderr))
        return scheduler.Stopped(state=s.state, killed=s.how == "sysrq", exit=None)
