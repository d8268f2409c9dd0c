"""Scheduler control: starting, waiting for, stopping a sched_ext scheduler in a kernel, and reading
how it ended. The one place that knows the loader's command line, the sysfs state machine, the
loader's exit JSON (with the scheduler's UEI), the kernel log's `disabled (...)` line, and which
exits are clean and which are errors.

Control is a set of POSIX shell scripts (busybox in the guest, /bin/sh on the host) plus parsers for
what they print, so the sandbox VM (through its agent) and the host run the very same steps:
layer 1's short attach, layer 2's loads and unloads and layer 3's deploy, unload and exit report.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..models import LoaderExit, SchedulerExit, ScxState, Uei

SCX = "/sys/kernel/sched_ext"
LOADER = "schedcp-loader"  # on PATH in the guest; the host passes the image's static loader
#: how long a started scheduler gets to reach `enabled` (its init may do real work under TCG)
START_WAIT_S = 30
#: how long a loader gets to exit after SIGTERM, and the kernel to reach `disabled` after that
STOP_WAIT_S = 10
DISABLE_WAIT_S = 5
MAP_SIZE_PREFIX = "map:"  # params["map:NAME"] = N sizes map NAME (max_entries) instead of a rodata

#: enum scx_exit_kind (include/linux/sched/ext.h): >= 1024 are errors
SCX_EXIT_ERROR = 1024
SCX_EXIT_ERROR_STALL = 1026
#: `sched_ext: BPF scheduler "NAME" disabled (REASON)` in the kernel log
DISABLED_RE = re.compile(r'sched_ext: BPF scheduler "([^"]*)" disabled \(([^)]*)\)')
#: exit reasons that are not the scheduler's fault (kernel/sched/ext.c scx_exit_reason())
CLEAN_REASONS = ("unregistered from user space", "unregistered from BPF", "unregistered from the main kernel")
STALL_REASON = "runnable task stall"


# --- the loader's command line -------------------------------------------------------------------

def loader_args(params: dict[str, str]) -> list[str]:
    """The loader's `--param NAME=V` (a `const volatile`) and `--map-size MAP=N` (a map's
    max_entries, for maps a scheduler leaves to its loader) for a candidate's params."""
    args: list[str] = []
    for k, val in sorted(params.items()):
        if k.startswith(MAP_SIZE_PREFIX):
            args += ["--map-size", f"{k.removeprefix(MAP_SIZE_PREFIX)}={val}"]
        else:
            args += ["--param", f"{k}={val}"]
    return args


#: the kernel watchdog while layer 1 has the scheduler attached (layer 2 uses the same): the loader's
#: settle visits every CPU, so a scheduler that never runs a task there stalls its own loader, and the
#: kernel's default (30 s) made such a verify take 31 s
VERIFY_WATCHDOG_MS = 3000


def verify_argv(obj: str, params: dict[str, str], load_only: bool = False) -> list[str]:
    """Load through the verifier, attach for a moment (the scheduler's init runs) and detach; with
    `load_only`, never attach."""
    attach = ["--load-only"] if load_only else ["--timeout-ms", str(VERIFY_WATCHDOG_MS)]
    return [obj, "--verify", *attach, *loader_args(params)]


def run_argv(obj: str, params: dict[str, str], timeout_ms: int | None = None, partial: bool = False) -> list[str]:
    """Load, attach and keep running until SIGTERM; `timeout_ms` sets the kernel watchdog; `partial`
    sets SCX_OPS_SWITCH_PARTIAL (only SCHED_EXT tasks run on it)."""
    return [obj, "--run", *(["--timeout-ms", str(int(timeout_ms))] if timeout_ms else []),
            *(["--partial"] if partial else []), *loader_args(params)]


def verify_script(obj: str, params: dict[str, str], load_only: bool = False, loader: str = LOADER) -> str:
    """Run the loader's verify; then print `@@K <marker>` and the kernel log, whose sched_ext lines
    after the marker (written to the kernel log first, so that an earlier load in the same boot does
    not count) `parse_verify` keeps. Filtered on the host: under TCG every fork in the guest costs
    tens of ms (a sed | grep | tail pipeline took up to 0.5 s in a fresh guest), and the
    marker is read with the shell's `read`, not `$(cat …)`."""
    return f"""read -r u </proc/sys/kernel/random/uuid 2>/dev/null
m="schedcp-verify $$-$u"
echo "<6>$m" >/dev/kmsg 2>/dev/null
{shlex.join([loader, *verify_argv(obj, params, load_only)])}
rc=$?
echo "@@K $m"
dmesg 2>/dev/null
exit $rc
"""


def parse_verify(out: str, keep: int = 12) -> tuple[str, list[str]]:
    """(the loader's output, the kernel's sched_ext lines after the marker, the last `keep`) from
    what `verify_script` printed."""
    head, _, klog = out.partition("@@K")
    marker, _, klog = klog.partition("\n")
    marker = marker.strip()
    lines = klog.splitlines()
    if marker:  # after the marker's line (none when the ring buffer has lost it)
        at = max((i for i, ln in enumerate(lines) if marker in ln), default=-1)
        lines = lines[at + 1:] if at >= 0 else []
    return head, [ln.strip() for ln in lines if "sched_ext" in ln.lower() and ln.strip()][-keep:]


def host_missing() -> list[str]:
    """What this host lacks to load a sched_ext scheduler (empty = it can): layer 1's host target
    and a host deploy both need it."""
    missing = []
    if not Path(SCX).exists():
        missing.append("this kernel has no sched_ext (/sys/kernel/sched_ext missing; needs "
                       "CONFIG_SCHED_CLASS_EXT=y, Linux >= 6.12)")
    if os.geteuid() != 0:
        missing.append("no permission to load BPF (run as root: CAP_BPF + CAP_SYS_ADMIN)")
    return missing


# --- shell steps ---------------------------------------------------------------------------------

#: helpers the step scripts below use: whoever runs a step puts this in front of it, once
#: (shell builtins only where it matters: a fork costs tens of ms under TCG)
PRELUDE = f"""SX={SCX}
scx_state() {{ local s=absent; read -r s 2>/dev/null <$SX/state; echo "$s"; }}
scx_ops() {{ local o=; read -r o 2>/dev/null <$SX/root/ops; echo "$o"; }}
scx_alive() {{
	local l
	[ -n "$1" ] || return 1
	read -r l 2>/dev/null </proc/$1/stat || return 1
	set -- $l
	[ "$3" != Z ]
}}
scx_wait_disabled() {{
	local i=0
	while [ $i -lt {DISABLE_WAIT_S * 10} ] && [ "$(scx_state)" != disabled ] && [ "$(scx_state)" != absent ]; do
		sleep 0.1; i=$((i + 1))
	done
}}
"""


@dataclass
class Files:
    """Where one running loader keeps its pid, its exit JSON and its stderr."""

    run_dir: str
    name: str = "loader"

    @property
    def pid(self) -> str:
        return f"{self.run_dir}/{self.name}.pid"

    @property
    def json(self) -> str:
        return f"{self.run_dir}/{self.name}.json"

    @property
    def err(self) -> str:
        return f"{self.run_dir}/{self.name}.err"


STATE_SCRIPT = """
echo "state=$(scx_state)"
echo "ops=$(scx_ops)"
echo "enable_seq=$(cat $SX/enable_seq 2>/dev/null)"
echo "psi=$(head -1 /proc/pressure/cpu 2>/dev/null)"
echo "ctxt=$(grep '^ctxt ' /proc/stat | cut -d' ' -f2)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
"""


def start_script(obj: str, params: dict[str, str], files: Files, timeout_ms: int | None = None,
                 loader: str = LOADER, partial: bool = False) -> str:
    """Start the loader in its own session and wait until the kernel says `enabled` with a root
    ops, or the loader ended. Prints `@@RUNNING` or `@@EXITED` + its JSON + its stderr tail."""
    cmd = shlex.join([loader, *run_argv(obj, params, timeout_ms, partial)])
    f = files
    return f"""
mkdir -p {f.run_dir}; rm -f {f.json} {f.err}
setsid {cmd} >{f.json} 2>{f.err} </dev/null 3>&- &
pid=$!
echo $pid >{f.pid}
i=0
while [ $i -lt {START_WAIT_S * 10} ]; do
	[ "$(scx_state)" = enabled ] && [ -n "$(scx_ops)" ] && break
	scx_alive $pid || break
	sleep 0.1; i=$((i + 1))
done
if scx_alive $pid; then echo "@@RUNNING"
else echo '@@EXITED'; cat {f.json}; echo; echo '@@ERR'; tail -c 1500 {f.err}; echo; echo '@@ERREND'; fi
"""


def stop_script(files: Files) -> str:
    """SIGTERM the loader (it detaches and prints its exit JSON), SIGKILL if it does not go, wait
    for the kernel's default scheduler. Prints `@@STOPPED <state>` and the loader's JSON."""
    f = files
    return f"""
pid=$(cat {f.pid} 2>/dev/null)
if scx_alive "$pid"; then kill -TERM $pid; fi
i=0; while [ $i -lt {STOP_WAIT_S * 10} ] && scx_alive "$pid"; do sleep 0.1; i=$((i + 1)); done
if scx_alive "$pid"; then echo '@@KILLED'; kill -KILL $pid; sleep 0.5; fi
scx_wait_disabled
rm -f {f.pid}
echo "@@STOPPED $(scx_state)"
echo '@@J'; cat {f.json} 2>/dev/null; echo
"""


def stop_any_script() -> str:
    """Stop every loader on the machine (a scheduler an interrupted run left behind in a VM)."""
    return f"""
for p in $(pidof {LOADER}); do kill -TERM $p; done
scx_wait_disabled
"""


#: kernel log lines kept after the last `disabled (...)` line: the scheduler's message and backtrace
TRAIL_LINES = 16


def exit_script(files: Files) -> str:
    """The loader's exit JSON, the kernel's sched_ext lines, and (after `@@T`) the last `disabled
    (...)` line with the lines the kernel logged after it — for scx_bpf_error() its message
    (`sched_ext: NAME: …`) and backtrace, which a scheduler without an exit callback (no UEI
    recorded) leaves nowhere else."""
    return (f"echo '@@J'; cat {files.json} 2>/dev/null; echo; echo '@@K'; "
            "dmesg 2>/dev/null | grep -i 'sched_ext' | tail -n 8\n"
            "echo '@@T'; dmesg 2>/dev/null | awk 'BEGIN {n = 999} "
            "/sched_ext: BPF scheduler \".*\" disabled/ {n = 0; buf = \"\"} "
            f"{{if (n <= {TRAIL_LINES}) {{buf = buf $0 \"\\n\"; n++}}}} END {{printf \"%s\", buf}}'\n")


# --- parsing what the steps print ----------------------------------------------------------------

@dataclass
class Started:
    running: bool
    exit: LoaderExit | None = None
    error: str | None = None  # why the loader ended, when it did


@dataclass
class Stopped:
    state: str
    killed: bool
    exit: LoaderExit | None


@dataclass
class ExitRead:
    loader: LoaderExit | None
    kernel_log: list[str] = field(default_factory=list)
    exit: SchedulerExit = field(default_factory=lambda: SchedulerExit(kind="unknown"))
    raw: str = ""


def parse_state(text: str) -> ScxState:
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    psi = re.search(r"avg10=([\d.]+)", kv.get("psi", ""))
    num = lambda k, f=int: f(kv[k]) if kv.get(k, "").replace(".", "", 1).isdigit() else None  # noqa: E731
    return ScxState(state=kv.get("state") or "absent", ops=kv.get("ops") or None,
                    enable_seq=num("enable_seq"), psi_some_avg10=float(psi[1]) if psi else None,
                    ctxt=num("ctxt"), uptime_s=num("uptime", float))


def _json_object(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def json_after(marker: str, text: str) -> dict | None:
    """The first JSON object line after `marker` (before the next `@@` marker)."""
    i = text.find(marker)
    lines = [ln.strip() for ln in text[i + len(marker):].splitlines()] if i >= 0 else []
    first = next((ln for ln in lines if ln.startswith(("{", "@@"))), "")
    return _json_object(first) if first.startswith("{") else None


def last_json(text: str) -> dict | None:
    """The last JSON object line of a loader's output (it prints exactly one, last)."""
    objs = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("{")]
    return _json_object(objs[-1]) if objs else None


def parse_start(out: str) -> Started:
    """What `start_script` printed: running, or why the loader ended."""
    if "@@EXITED" not in out:
        return Started(running="@@RUNNING" in out)
    d = json_after("@@EXITED", out)
    ex = loader_exit(d) if d else None
    err = out.split("@@ERR", 1)[-1].split("@@ERREND", 1)[0].strip() if "@@ERR" in out else ""
    why = (f"the loader exited at {ex.stage or '?'}: {ex.error or err[-500:]}" if ex else
           f"the loader exited without a result: {err[-500:]}")
    return Started(running=False, exit=ex, error=why)


def parse_stop(out: str) -> Stopped:
    m = re.search(r"^@@STOPPED (\S+)", out, re.M)
    d = json_after("@@J", out)
    return Stopped(state=m[1] if m else "unknown", killed="@@KILLED" in out,
                   exit=loader_exit(d) if d else None)


def parse_exit(out: str, ops_name: str | None = None) -> ExitRead:
    """What `exit_script` printed, with the exit classified."""
    d = json_after("@@J", out)
    ld = loader_exit(d) if d else None
    body, _, trail = out.partition("@@T")
    klog = [ln.strip() for ln in body.split("@@K", 1)[-1].splitlines() if ln.strip()] if "@@K" in body else []
    after = [ln.rstrip() for ln in trail.splitlines() if ln.strip()]
    return ExitRead(loader=ld, kernel_log=klog, exit=exit_of(ld, klog, ops_name, after=after), raw=out.strip())


_STAMP = re.compile(r"^\[\s*\d+\.\d+\] ?")


def kernel_message(after: list[str], ops_name: str | None = None) -> str:
    """The kernel's own words after a `disabled (...)` line (`after` starts with that line): its
    `sched_ext: NAME: message` line and the backtrace lines below it, timestamps dropped, up to the
    first line that is something else."""
    if not after or not DISABLED_RE.search(after[0]):
        return ""
    name = DISABLED_RE.search(after[0])[1]
    out = []
    for ln in after[1:]:
        text = _STAMP.sub("", ln)
        if text.startswith(f"sched_ext: {name}: ") or (ops_name and text.startswith(f"sched_ext: {ops_name}: ")):
            out.append(text.strip())
        elif text[:1].isspace() and out is not None and text.strip():
            out.append(text.strip())  # the backtrace, indented under the message
        else:
            break
    return "\n".join(out)


def loader_exit(d: dict) -> LoaderExit:
    """The loader's JSON as a LoaderExit (the libbpf log left out; a long exit dump cut)."""
    sx = d.get("sched_ext") or {}
    uei = d.get("uei")
    if isinstance(uei, dict):
        dump = uei.get("dump") or ""
        uei = Uei(kind=int(uei.get("kind") or 0), kind_name=uei.get("kind_name") or "",
                  exit_code=int(uei.get("exit_code") or 0), reason=uei.get("reason") or "",
                  message=uei.get("message") or "",
                  dump=dump if len(dump) <= 4000 else dump[:4000] + "\n[… cut]")
    else:
        uei = None
    return LoaderExit(ok=bool(d.get("ok")), stage=d.get("stage") or "", error=d.get("error"),
                      ops_name=d.get("ops_name") or "", root_ops=sx.get("root_ops") or "",
                      state_attached=sx.get("state_attached") or "", uei=uei,
                      run_s=float(d.get("run_s") or 0.0), stop_reason=d.get("stop_reason"))


# --- what an exit means --------------------------------------------------------------------------

def disabled_lines(kernel_log: list[str] | str, ops_name: str | None = None) -> list[tuple[str, str]]:
    """(reason, line) for each `BPF scheduler "X" disabled (reason)` line, of `ops_name` if given."""
    lines = kernel_log.splitlines() if isinstance(kernel_log, str) else kernel_log
    out = []
    for ln in lines:
        m = DISABLED_RE.search(ln)
        if m and (ops_name is None or m[1] == ops_name):
            out.append((m[2], ln.strip()))
    return out


def is_stall(uei: Uei | None) -> bool:
    return uei is not None and (uei.kind == SCX_EXIT_ERROR_STALL or STALL_REASON in uei.reason)


def is_error(uei: Uei | None) -> bool:
    return uei is not None and uei.kind >= SCX_EXIT_ERROR


def exit_of(loader: LoaderExit | None, kernel_log: list[str] | str = (),
            ops_name: str | None = None, after: list[str] = ()) -> SchedulerExit:
    """Why the scheduler stopped, from the loader's UEI, the kernel's last disable line and (`after`:
    that line and what followed it) the kernel's own message and backtrace."""
    uei = loader.uei if loader else None
    lines = disabled_lines(kernel_log, ops_name)
    reason_k, line = lines[-1] if lines else ("", "")
    said = kernel_message(list(after), ops_name) if after and (not line or _same_line(after[0], line)) else ""
    if uei is not None and uei.kind:
        kind = "stall" if is_stall(uei) else "error" if is_error(uei) else "clean"
        return SchedulerExit(kind=kind, kind_name=uei.kind_name, reason=uei.reason or reason_k,
                             message=uei.message, kernel_line=line, kernel_message=said)
    if line:
        kind = ("stall" if STALL_REASON in reason_k else
                "clean" if reason_k in CLEAN_REASONS else "error")
        return SchedulerExit(kind=kind, reason=reason_k, kernel_line=line, kernel_message=said)
    return SchedulerExit(kind="unknown")


def _same_line(a: str, b: str) -> bool:
    return _STAMP.sub("", a.strip()) == _STAMP.sub("", b.strip())
