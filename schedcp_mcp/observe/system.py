"""`get_system_info`: topology, kernel facts and which observation/BPF tools work here — and why not.

Every capability is detected, never assumed: a tool is listed as usable only after a cheap probe,
otherwise with the reason it is not.
"""

from __future__ import annotations

import functools
import gzip
import os
import platform
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, Field

SYS_CPU = Path("/sys/devices/system/cpu")
SCX = Path("/sys/kernel/sched_ext")
LIBBPF_TOOLS = ("runqlat", "runqslower", "cpudist", "offcputime")


class Cache(BaseModel):
    level: int
    type: str
    size: str
    shared_cpus: list[int]


class Topology(BaseModel):
    logical_cpus: int
    physical_cores: int
    packages: int
    smt_siblings: list[list[int]] = Field(description="groups of logical CPUs sharing a core")
    llc_domains: list[list[int]] = Field(description="groups of CPUs sharing the last-level cache")
    caches: list[Cache] = Field(description="caches seen from cpu0")
    numa_nodes: dict[str, list[int]]


class SchedExt(BaseModel):
    present: bool = Field(description="kernel has sched_ext (/sys/kernel/sched_ext exists)")
    state: str | None = None
    ops: str | None = Field(None, description="name of the running BPF scheduler, if any")
    enable_seq: int | None = None
    switch_all: int | None = None


class Tool(BaseModel):
    name: str
    usable: bool
    path: str | None = None
    detail: str = ""


class KernelInfo(BaseModel):
    release: str
    version: str
    btf: bool = Field(description="/sys/kernel/btf/vmlinux present (CO-RE BPF works)")
    config_source: str | None = None
    config: dict[str, str] = Field(description="scheduler-relevant CONFIG_ values")
    sched_ext: SchedExt
    can_load_bpf: bool
    can_load_bpf_reason: str


class SystemInfo(BaseModel):
    hostname: str
    topology: Topology
    kernel: KernelInfo
    tools: list[Tool]
    memory_gib: float


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0,1,2,3,8,10,11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def topology() -> Topology:
    cpus = sorted(int(p.name[3:]) for p in SYS_CPU.glob("cpu[0-9]*") if (p / "topology").exists())
    smt, llc, packages, cores = set(), set(), set(), set()
    for c in cpus:
        t = SYS_CPU / f"cpu{c}" / "topology"
        sib = tuple(parse_cpulist(_read(t / "thread_siblings_list", str(c))))
        smt.add(sib)
        pkg = _read(t / "physical_package_id", "0")
        packages.add(pkg)
        cores.add((pkg, _read(t / "core_id", str(c))))
        idx = sorted((SYS_CPU / f"cpu{c}" / "cache").glob("index*"))
        if idx:
            last = max(idx, key=lambda p: int(_read(p / "level", "0")))
            llc.add(tuple(parse_cpulist(_read(last / "shared_cpu_list", str(c)))))
    caches = [Cache(level=int(_read(p / "level", "0")), type=_read(p / "type"),
                    size=_read(p / "size"), shared_cpus=parse_cpulist(_read(p / "shared_cpu_list")))
              for p in sorted((SYS_CPU / "cpu0" / "cache").glob("index*"))]
    nodes = {p.name: parse_cpulist(_read(p / "cpulist"))
             for p in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))}
    return Topology(logical_cpus=len(cpus), physical_cores=len(cores), packages=len(packages),
                    smt_siblings=sorted(list(s) for s in smt), llc_domains=sorted(list(s) for s in llc),
                    caches=caches, numa_nodes=nodes or {"node0": cpus})


INTERESTING_CONFIG = ("CONFIG_SCHED_CLASS_EXT", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT",
                      "CONFIG_DEBUG_INFO_BTF", "CONFIG_SCHEDSTATS", "CONFIG_PSI", "CONFIG_PREEMPT",
                      "CONFIG_PREEMPT_DYNAMIC", "CONFIG_HZ", "CONFIG_NO_HZ_FULL", "CONFIG_SCHED_SMT",
                      "CONFIG_SCHED_MC", "CONFIG_NUMA", "CONFIG_FAIR_GROUP_SCHED",
                      "CONFIG_SCHED_AUTOGROUP", "CONFIG_KPROBES", "CONFIG_FTRACE")


def kernel_config() -> tuple[str | None, dict[str, str]]:
    release = platform.release()
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            text = (gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz"
                    else path.read_text())
        except OSError:
            continue
        cfg = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                cfg[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                cfg[line[2:-11]] = "n"
        return str(path), {k: cfg.get(k, "n") for k in INTERESTING_CONFIG}
    return None, {}


def sched_ext_state() -> SchedExt:
    if not SCX.exists():
        return SchedExt(present=False)
    ops = _read(SCX / "root" / "ops") or None
    seq = _read(SCX / "enable_seq")
    sw = _read(SCX / "switch_all")
    return SchedExt(present=True, state=_read(SCX / "state") or None, ops=ops,
                    enable_seq=int(seq) if seq.isdigit() else None,
                    switch_all=int(sw) if sw.isdigit() else None)


def _can_load_bpf() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root (loading BPF schedulers needs CAP_BPF + CAP_SYS_ADMIN)"
    return True, "running as root"


def _probe(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


@functools.lru_cache(maxsize=1)
def tools() -> tuple[Tool, ...]:
    """Probe each observation tool once per process."""
    found: list[Tool] = []
    perf = shutil.which("perf")
    if perf and (r := _probe([perf, "stat", "-x,", "-e", "task-clock,instructions", "true"])):
        hw = "<not supported>" not in r.stderr and r.returncode == 0
        found.append(Tool(name="perf", usable=r.returncode == 0, path=perf,
                          detail="software events work" + ("; hardware counters work" if hw else
                                                           "; hardware counters <not supported> "
                                                           "(no PMU exposed to this machine)")))
        found.append(Tool(name="perf-hw-counters", usable=hw, path=perf,
                          detail="cycles/instructions" if hw else "no PMU: cycles/instructions "
                                                                   "<not supported>"))
    else:
        found.append(Tool(name="perf", usable=False, detail="perf not installed (Debian: linux-perf)"))
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool" if Path("/usr/sbin/bpftool").exists()
                                          else None)
    found.append(Tool(name="bpftool", usable=bool(bpftool), path=bpftool,
                      detail="" if bpftool else "not installed (Debian: bpftool)"))
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    root = os.geteuid() == 0
    for name in LIBBPF_TOOLS:
        path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                      else None)
        if not path:
            found.append(Tool(name=f"libbpf-tools/{name}", usable=False,
                              detail="not installed (Debian: libbpf-tools)"))
        elif not btf or not root:
            found.append(Tool(name=f"libbpf-tools/{name}", usable=False, path=path,
                              detail="needs kernel BTF and root" ))
        else:
            found.append(Tool(name=f"libbpf-tools/{name}", usable=True, path=path,
                              detail="CO-RE, needs no kernel headers"))
    bcc_dir = Path("/usr/share/bcc/tools")
    headers = Path(f"/lib/modules/{platform.release()}/build").exists()
    if not bcc_dir.exists():
        found.append(Tool(name="bcc", usable=False, detail="not installed (Debian: bpfcc-tools, "
                                                           "python3-bpfcc)"))
    else:
        found.append(Tool(name="bcc", usable=headers and root, path=str(bcc_dir),
                          detail="" if headers else "no kernel headers for the running kernel "
                                                    f"(/lib/modules/{platform.release()}/build)"))
    for name in ("bpftrace", "stress-ng", "hackbench", "sysbench"):
        path = shutil.which(name)
        found.append(Tool(name=name, usable=bool(path), path=path,
                          detail="" if path else "not installed"))
    return tuple(found)


def get_system_info() -> SystemInfo:
    import psutil

    src, cfg = kernel_config()
    can, why = _can_load_bpf()
    scx = sched_ext_state()
    if not scx.present:
        can, why = False, "kernel has no sched_ext (/sys/kernel/sched_ext missing): use the sandbox"
    return SystemInfo(
        hostname=platform.node(),
        topology=topology(),
        kernel=KernelInfo(release=platform.release(), version=platform.version(),
                          btf=Path("/sys/kernel/btf/vmlinux").exists(), config_source=src, config=cfg,
                          sched_ext=scx, can_load_bpf=can, can_load_bpf_reason=why),
        tools=list(tools()),
        memory_gib=round(psutil.virtual_memory().total / 2**30, 2),
    )
