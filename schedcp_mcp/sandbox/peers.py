"""Peers: the kernel's own example schedulers (tools/sched_ext), built as the programs their Makefile
makes — each a BPF half and its C userspace loader — so that schedcp's policies can be measured
against real scheduler programs, started the way their authors start them.

Built with `make` and the kernel's own `tools/sched_ext/Makefile`, in the toolchain jail
(`toolchain.run`: no network, no host file, the trixie rootfs's clang, gcc, bpftool and libbpf).
The image holds only `tools/sched_ext` of the kernel source, not the rest of `tools/`: the three files
the Makefile includes from there (`tools/build/Build.include`, `tools/scripts/Makefile.arch`,
`tools/scripts/Makefile.include`) are given as the few lines of them it uses (SHIMS below), and the
libbpf and bpftool it would build from `tools/lib/bpf` and `tools/bpf/bpftool` are the rootfs's
packaged ones (`BPFOBJ=` its libbpf.a, `BPFTOOL=` its bpftool: the same libbpf 1.5 / bpftool 7.5 the
rest of schedcp uses). `VMLINUX_H=` the image's vmlinux.h of the sandbox kernel. Nothing in the
schedulers' sources or their Makefile is changed.

Each target is made on its own (`make scx_NAME`), so one that does not build says why in its own log
and does not stop the others. The result is cached by a hash of everything that went in (the
tools/sched_ext tree, the shims, vmlinux.h, the toolchain's versions): a second `peers build` with the
same inputs does nothing.

The programs link libbpf statically (libbpf.a, as the Makefile does) and libelf, zlib and glibc
dynamically; `sandbox.program.missing_libraries` checks those against the guest before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, Field

from .. import config
from ..errors import BadInput, InfrastructureError
from . import image

#: the example schedulers issue #26 names, in the order they are reported; the Makefile's own list
#: (`c-sched-targets`) decides what this kernel has
WANTED = ["scx_simple", "scx_central", "scx_flatcg", "scx_qmap", "scx_userland", "scx_pair", "scx_prev",
          "scx_sdt", "scx_cpu0"]

#: the lines of tools/build/Build.include and tools/scripts/Makefile.{arch,include} that
#: tools/sched_ext/Makefile uses (the image extracts only tools/sched_ext)
SHIMS = {
    "tools/build/Build.include": "# schedcp shim: what tools/sched_ext/Makefile uses of tools/build/Build.include\n"
                                 "msg = @printf '  %-8s%s %s\\n' \"$(1)\" \"$(if $(2), [$(2)])\" \"$(3)\";\n",
    "tools/scripts/Makefile.arch": "# schedcp shim: tools/scripts/Makefile.arch on x86-64\n"
                                   "HOSTARCH := x86\nARCH ?= x86\nSRCARCH := x86\n",
    "tools/scripts/Makefile.include": "# schedcp shim: what tools/sched_ext/Makefile uses of "
                                      "tools/scripts/Makefile.include\n"
                                      "CLANG ?= clang\nLLVM_STRIP ?= llvm-strip\nHOSTCC ?= gcc\nHOSTLD ?= ld\n"
                                      "HOSTAR ?= ar\nQ ?= @\nsubmake_extras :=\n",
}
#: the packaged libbpf and bpftool in the rootfs (paths inside the jail)
LIBBPF_A = "/usr/lib/x86_64-linux-gnu/libbpf.a"
BPFTOOL = "/usr/sbin/bpftool"
SRC = "src/tools/sched_ext"  # where the tree sits in the jail's work dir

_BUILD_SH = r"""
cd "$1"; shift
for t in "$@"; do
	make -C . O="$PWD/out" BPFOBJ={libbpf} BPFTOOL={bpftool} VMLINUX_H={vmlinux_h} VMLINUX_BTF={vmlinux_h} \
		"$t" >"$PWD/../../../log.$t" 2>&1
	echo $? >"$PWD/../../../rc.$t"
done
"""


class PeerBuild(BaseModel):
    name: str
    built: bool
    path: str | None = Field(None, description="the program (host path, in the peers cache)")
    sha256: str | None = None
    why: str | None = Field(None, description="why it did not build (the make output's error lines)")
    log_tail: str = Field("", description="the end of its make output")


class PeersManifest(BaseModel):
    key: str = Field(description="hash of the inputs (tools/sched_ext, shims, vmlinux.h, toolchain)")
    built_at: float
    kernel_version: str
    seconds: float
    peers: list[PeerBuild]

    def built(self) -> list[PeerBuild]:
        return [p for p in self.peers if p.built]


def peers_dir() -> Path:
    return config.sandbox_dir() / "peers"


def _tree(scx: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(scx.rglob("*")):
        if p.is_file() and not p.is_symlink() and "build" not in p.relative_to(scx).parts:
            files[f"{SRC}/{p.relative_to(scx)}"] = p.read_bytes()
    return files


def _key(files: dict[str, bytes], m: image.Manifest) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    h.update(hashlib.sha256(Path(m.paths.vmlinux_h).read_bytes()).digest())
    h.update(json.dumps([m.kernel_version, m.toolchain.model_dump(), _BUILD_SH, WANTED]).encode())
    return h.hexdigest()[:16]


def _makefile_targets(makefile: str) -> list[str]:
    m = re.search(r"^c-sched-targets\s*=\s*(.+)$", makefile, re.M)
    return m.group(1).split() if m else []


def _why(log: str) -> str:
    """The lines of a make log that say what went wrong (compiler errors, make's own)."""
    lines = [ln.strip() for ln in log.splitlines()
             if re.search(r"error|undefined reference|No rule to make target|\*\*\*", ln, re.I)]
    return " / ".join(dict.fromkeys(lines))[:600] or log.strip()[-400:]


def load_manifest() -> PeersManifest | None:
    cur = peers_dir() / "current.json"
    try:
        return PeersManifest.model_validate_json(cur.read_text())
    except (OSError, ValueError):
        return None


def build(force: bool = False, only: list[str] | None = None, timeout_s: float = 1200) -> PeersManifest:
    """Build the kernel's example schedulers with their Makefile in the toolchain jail (cached by the
    hash of the inputs); `only` = these names. Which did not build, and why, is in the manifest."""
    m = image.ensure()
    scx = Path(m.paths.scx_dir)
    if not (scx / "Makefile").is_file():
        raise InfrastructureError(f"{scx} has no Makefile (the image's tools/sched_ext is incomplete)",
                                  hint="rebuild the sandbox image: `schedcp sandbox build`")
    unknown = [n for n in (only or []) if n not in WANTED]
    if unknown:
        raise BadInput(f"unknown peer(s): {', '.join(unknown)}", hint=f"known: {', '.join(WANTED)}")
    files = _tree(scx)
    files.update({f"src/{k}": v.encode() for k, v in SHIMS.items()})
    key = _key(files, m)
    want = [n for n in WANTED if not only or n in only]
    out = peers_dir() / key
    man_path = out / "manifest.json"
    if not force and man_path.exists():
        cached = PeersManifest.model_validate_json(man_path.read_text())
        if all(any(p.name == n for p in cached.peers) for n in want):
            _set_current(cached)
            return cached
    targets = _makefile_targets((scx / "Makefile").read_text())
    peers: list[PeerBuild] = []
    to_make = [n for n in want if n in targets]
    for n in want:
        if n not in targets:
            peers.append(PeerBuild(name=n, built=False,
                                   why=f"not in this kernel's tools/sched_ext ({m.kernel_version}): its Makefile "
                                       f"makes {', '.join(targets)}"))
    from . import toolchain

    script = _BUILD_SH.format(libbpf=LIBBPF_A, bpftool=BPFTOOL, vmlinux_h=f"{image.INCLUDE_ROOT}/vmlinux.h")
    outputs = [o for n in to_make for o in (f"log.{n}", f"rc.{n}", f"{SRC}/out/build/bin/{n}")]
    t0 = time.monotonic()
    res = toolchain.run(["/bin/sh", "-c", script, "build", SRC, *to_make], workdir_files=files,
                        timeout_s=timeout_s, mem_mb=4096, outputs=outputs, max_file_mb=256)
    if res.timed_out:
        raise InfrastructureError(f"building the example schedulers timed out after {timeout_s:.0f} s",
                                  hint="the machine is busy: try again, or build fewer (`--only scx_simple`)")
    out.mkdir(parents=True, exist_ok=True)
    for n in to_make:
        log = res.outputs.get(f"log.{n}", b"").decode(errors="replace")
        rc = res.outputs.get(f"rc.{n}", b"?").decode().strip()
        binary = res.outputs.get(f"{SRC}/out/build/bin/{n}")
        if rc == "0" and binary:
            p = out / n
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(binary)
            tmp.chmod(0o755)
            tmp.replace(p)
            peers.append(PeerBuild(name=n, built=True, path=str(p), sha256=hashlib.sha256(binary).hexdigest(),
                                   log_tail=log[-600:]))
        else:
            why = _why(log) if log else f"make did not run ({res.stderr.strip()[-300:]})"
            peers.append(PeerBuild(name=n, built=False, why=f"make {n} exited {rc}: {why}", log_tail=log[-1500:]))
    peers.sort(key=lambda p: WANTED.index(p.name))
    man = PeersManifest(key=key, built_at=time.time(), kernel_version=m.kernel_version,
                        seconds=round(time.monotonic() - t0, 1), peers=peers)
    man_path.write_text(man.model_dump_json(indent=2))
    _set_current(man)
    return man


def _set_current(man: PeersManifest) -> None:
    cur = peers_dir() / "current.json"
    tmp = cur.with_suffix(".tmp")
    tmp.write_text(man.model_dump_json(indent=2))
    tmp.replace(cur)


def built_peers(names: list[str] | None = None) -> list[PeerBuild]:
    """The peers the last build made (building them first when there is none), or these names."""
    man = load_manifest() or build()
    out = [p for p in man.peers if p.built and (not names or p.name in names)]
    missing = [n for n in (names or []) if n not in {p.name for p in out}]
    if missing:
        why = {p.name: p.why for p in man.peers}
        raise BadInput(f"no built peer program {', '.join(missing)}: " +
                       "; ".join(f"{n}: {why.get(n) or 'not built'}" for n in missing),
                       hint="`schedcp peers build` builds them; `schedcp peers list` shows which did")
    for p in out:
        if not p.path or not Path(p.path).exists():
            raise InfrastructureError(f"the built {p.name} is gone from the peers cache",
                                      hint="`schedcp peers build --force`")
    return out


def clean() -> None:
    shutil.rmtree(peers_dir(), ignore_errors=True)
