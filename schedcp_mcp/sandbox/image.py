"""The sandbox image: a sched_ext kernel, a BPF toolchain rootfs, the scx headers, and guest initramfs.

Everything lives under `config.sandbox_dir()`:

    apt/            private apt state for Debian sid (sources list, lists, cache); the system's apt
                    configuration is never read or written
    debs/           the downloaded kernel packages
    kernel/         vmlinuz, config, vmlinux (ELF), vmlinux.btf (raw BTF), vmlinux.h
    rootfs/         a Debian trixie chroot: clang 19, libbpf 1.5, bpftool 7.5, stress-ng, hackbench,
                    perf, busybox-static. It is the BPF toolchain (see toolchain.py) and the source of
                    the guest's tools. /opt/schedcp/include in it holds only the allowlisted headers.
    sched_ext/      tools/sched_ext/ of Debian's linux-source for the same kernel (scx headers and the
                    kernel's example schedulers; GPL-2.0, used from here, never copied into the project)
    guest/          schedcp-loader and schedcp-agent (static), initramfs.cpio.gz (small: busybox, loader, agent, for
                    verification) and initramfs-full.img (the small one with a tools archive appended,
                    for workloads)
    manifest.json   what was built, from what, with hashes and a build_id for cache keys

Why these choices (measured on the development machines, see DESIGN.md): Debian stable kernels have
sched_ext disabled, sid's cloud kernel has it; the host's clang/libbpf/bpftool are too old, trixie's are
not; what the guest boots decides the cold verify time, so the verify initramfs stays a few MB.

`build()` is idempotent: each step records a fingerprint of its inputs in `steps.json` and is skipped
when its outputs exist and the fingerprint is unchanged, so a second build does nothing. It resolves
the kernel from the apt lists it already has; `build(refresh=True)` updates them (and picks up a newer
kernel), `build(force=True)` redoes every step.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field

from .. import config
from ..errors import InfrastructureError
from .apt import Apt, debian_mirror, resolve_kernel
from .cpio import Cpio
from .hosttools import run_tool
from .kernel import extract_btf, extract_vmlinux, has_pvh_entry, kernel_config_has

Progress = Callable[[str, float], None]

ROOTFS_SUITE = "trixie"
ROOTFS_PACKAGES = [
    "clang", "llvm", "libbpf-dev", "bpftool", "libelf-dev", "zlib1g-dev", "libzstd-dev", "gcc",
    "libc6-dev", "make", "linux-libc-dev", "busybox-static", "stress-ng", "rt-tests", "linux-perf",
    "util-linux", "procps", "coreutils", "redis-server", "redis-tools",
]
#: Paths inside the rootfs (= the chroot) of the allowlisted include directories, in -I order.
INCLUDE_ROOT = "/opt/schedcp/include"
INCLUDE_DIRS = [INCLUDE_ROOT, f"{INCLUDE_ROOT}/bpf-compat"]
#: Guest tools for workloads (the full initramfs), as paths inside the rootfs.
GUEST_TOOLS = [
    "/usr/bin/stress-ng", "/usr/bin/hackbench", "/usr/bin/perf", "/usr/sbin/bpftool",
    "/usr/bin/taskset", "/usr/bin/chrt", "/usr/bin/nproc",
    "/usr/bin/redis-server", "/usr/bin/redis-benchmark", "/usr/bin/redis-cli", "/usr/bin/make",
]
#: The compile workload's compiler: gcc's driver and the programs it runs (cc1, as, collect2, ld), and ar.
#: Only these, their libraries and the headers and link inputs the build really uses (read from the
#: build's own dependency files and the linker's --trace when the image is built) go into the guest:
#: the whole of gcc, binutils and /usr/include would be ~90 MB more for every validation boot.
COMPILE_TOOLS = [
    "/usr/bin/gcc", "/usr/libexec/gcc/x86_64-linux-gnu/14/cc1", "/usr/libexec/gcc/x86_64-linux-gnu/14/collect2",
    "/usr/libexec/gcc/x86_64-linux-gnu/14/liblto_plugin.so", "/usr/bin/as", "/usr/bin/ld", "/usr/bin/ar",
]
#: where the compile workload's source tree (the kernel's scripts/dtc and guest/compile.mk) is in the guest
COMPILE_GUEST_DIR = "/usr/src/schedcp-compile"
LOADER_GUEST_PATH = "/usr/bin/schedcp-loader"
KERNEL_ENUMS_GUEST_PATH = "/usr/share/schedcp/kernel-enums"  # ENUMS_PATH in guest/loader.c
GUEST_SRC = Path(__file__).parent / "guest"




class Paths(BaseModel):
    vmlinuz: str
    kernel_config: str
    vmlinux: str = Field(description="the kernel ELF with its BTF, for kfunc/ops checks")
    boot_kernel: str = Field(description="what qemu boots: vmlinux when it has a PVH entry (no decompression, "
                                         "faster under TCG), else vmlinuz")
    vmlinux_btf: str = Field(description="the kernel's raw BTF (.BTF section), readable by bpftool/libbpf")
    vmlinux_h: str
    scx_dir: str = Field(description="tools/sched_ext of the kernel's source")
    scx_include_dir: str = Field(description="tools/sched_ext/include (holds scx/ and bpf-compat/)")
    scx_examples_dir: str = Field(description="where the kernel's example schedulers (scx_*.bpf.c) are")
    rootfs: str
    loader: str = Field(description="the static loader binary (host path; /usr/bin/schedcp-loader in the guest)")
    initramfs: str = Field(description="small guest image: busybox, loader, agent")
    initramfs_full: str = Field(description="the small image with the workload tools appended")


class Toolchain(BaseModel):
    clang: str
    bpftool: str
    libbpf: str
    include_dirs: list[str] = Field(description="allowlisted -I directories, as paths inside the rootfs chroot")
    cflags: list[str] = Field(description="the BPF flags of the kernel's tools/sched_ext/Makefile")


class Manifest(BaseModel):
    schema_version: int = 3
    built_at: str
    sandbox_dir: str
    kernel_version: str = Field(description="uname -r of the sandbox kernel")
    kernel_package: str
    sched_ext: bool = Field(description="the kernel config has CONFIG_SCHED_CLASS_EXT=y")
    packages: dict[str, str] = Field(description="Debian package -> version used")
    paths: Paths
    toolchain: Toolchain
    sizes: dict[str, int] = Field(description="bytes of the initramfs images and the loader")
    hashes: dict[str, str] = Field(description="sha256 of the artifacts")
    build_id: str = Field(description="hash of kernel + toolchain + guest artifacts; part of cache keys")
    sources_sha: str = Field("", description="hash of the checkout's guest sources the image was built from")
    build_seconds: float = 0.0


BPF_CFLAGS = [
    "-g", "-O2", "-mcpu=v3", "-target", "bpf", "-D__TARGET_ARCH_x86", "-mlittle-endian",
    "-fms-extensions", "-Wno-microsoft-anon-tag", "-Wno-compare-distinct-pointer-types", "-nostdinc",
]
#: what every compile adds: plain diagnostics, and output that does not depend on where clang ran
COMPILE_FLAGS = ["-fno-color-diagnostics", "-fno-trigraphs", "-ffile-compilation-dir=."]
#: vmlinux.h precompiled, in the include dir: parsing its ~3 MB was most of a compile. Made with the
#: macro scx/common.bpf.h defines before it includes vmlinux.h, so a source that starts with that
#: include compiles the same with it (verify/compile.py uses it only then).
PCH = f"{INCLUDE_ROOT}/vmlinux.h.pch"
PCH_DEFINES = ["-DBPF_NO_KFUNC_PROTOTYPES="]


def clang_argv(rootfs: Path, cflags: list[str], include_dirs: list[str]) -> list[str]:
    """clang with `cflags`, COMPILE_FLAGS and `include_dirs`, as run in the rootfs. Without
    address-space randomisation (setarch -R) clang's output does not depend on where it ran."""
    norandom = ["setarch", "x86_64", "-R"] if Path(rootfs, "usr/bin/setarch").exists() else []
    return [*norandom, "clang", *cflags, *COMPILE_FLAGS, *[f"-I{d}" for d in include_dirs]]


# ---------------------------------------------------------------- helpers


def _swap_dir(new: Path, final: Path) -> None:
    """Put a freshly built directory in place with two renames (users see the old or the new one)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace a file in one step: a VM booting from it, or a reader, never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(_sha256_file(p).encode())
    return h.hexdigest()


def _fp(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Steps:
    """Fingerprints of finished steps, so that a rebuild skips what is done and unchanged."""

    def __init__(self, sd: Path, force: bool):
        self.path = sd / "steps.json"
        self.force = force
        try:
            self.done: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.done = {}

    def fresh(self, name: str, fp: str, *outputs: Path) -> bool:
        return not self.force and self.done.get(name) == fp and all(o.exists() for o in outputs)

    def mark(self, name: str, fp) -> None:
        self.done[name] = fp
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.path)


def _chroot_prefix(rootfs: Path) -> list[str]:
    """Run a command inside the rootfs: a plain chroot as root, a user namespace otherwise."""
    if os.geteuid() == 0:
        return ["chroot", str(rootfs)]
    return ["unshare", "--user", "--map-root-user", "chroot", str(rootfs)]


def chroot_run(rootfs: Path, argv: list[str], what: str, timeout: float = 600) -> str:
    """Run a trusted build command in the rootfs (image building only; untrusted code uses toolchain.run)."""
    p = run_tool(_chroot_prefix(rootfs) + ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                                       "LC_ALL=C"] + argv, what, timeout=timeout)
    return p.stdout.decode(errors="replace")


def _ldd(rootfs: Path, binaries: list[str]) -> list[str]:
    libs: set[str] = set()
    for b in binaries:
        out = chroot_run(rootfs, ["ldd", b], f"ldd {b}")
        for line in out.splitlines():
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return sorted(libs)


# ---------------------------------------------------------------- the build


def manifest_path() -> Path:
    return config.sandbox_dir() / "manifest.json"


def load_manifest() -> Manifest | None:
    try:
        return Manifest.model_validate_json(manifest_path().read_text())
    except (OSError, ValueError):
        return None


def sources_sha() -> str:
    """Hash of what this checkout builds into the image (guest sources, package lists): when it
    differs from the manifest's, the image is out of date (e.g. after a pull that changed loader.c)."""
    h = hashlib.sha256(json.dumps([ROOTFS_SUITE, ROOTFS_PACKAGES, GUEST_TOOLS, COMPILE_TOOLS, INCLUDE_DIRS,
                                   BPF_CFLAGS, COMPILE_FLAGS, PCH, PCH_DEFINES]).encode())
    for p in sorted(GUEST_SRC.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _complete() -> Manifest | None:
    """The manifest when the image it describes is complete and built from this checkout's sources."""
    m = load_manifest()
    if (m is not None and m.sources_sha == sources_sha() and Path(m.paths.initramfs).exists()
            and Path(m.paths.rootfs, "usr/bin/clang").exists() and Path(m.paths.vmlinux_btf).exists()):
        return m
    return None


def ensure(progress: Progress | None = None) -> Manifest:
    """The manifest of a complete, up-to-date image, building (only what is missing or stale) on need.
    A command that finds another one building waits for it and takes what it built (it looks again
    under the lock): two commands in a fresh home must not both build."""
    m = _complete()
    if m is not None:
        return m
    with _BuildLock(config.sandbox_dir()):
        return _complete() or _build(False, progress, False)


class _Build:
    """One run of `build()`: where it builds, which steps are done, progress."""

    TOTAL = 11

    def __init__(self, force: bool, progress: Progress | None):
        self.t_start = time.monotonic()
        self.sd = config.sandbox_dir()
        self.force = force
        self.steps = _Steps(self.sd, force)
        self.say = progress or (lambda msg, frac: None)
        self.n = 0
        self.fp: dict[str, str] = {}  # each step's fingerprint; the manifest's is over all of them

    def step(self, msg: str) -> None:
        self.say(msg, self.n / self.TOTAL)
        self.n += 1


def build(force: bool = False, progress: Progress | None = None, refresh: bool = False) -> Manifest:
    """Build (or bring up to date) the sandbox image and return its manifest."""
    with _BuildLock(config.sandbox_dir()):
        return _build(force, progress, refresh)


def _build(force: bool, progress: Progress | None, refresh: bool) -> Manifest:
    """The build, under the build lock. Everything it decides from (steps.json, the manifest) is read
    here, under the lock: a build that waited for another one must see what that one finished. (It
    read steps.json before waiting, saw nothing done and redid every step, deleting kernel/ — the
    first command's vmlinux.btf — under that command's verify: "cannot read kernel BTF".)"""
    b = _Build(force, progress)
    apt, k = _resolve(b, refresh)
    vmlinuz, kconfig = _kernel(b, apt, k)
    rootfs = _rootfs(b)
    status = _sha256_file(rootfs / "var/lib/dpkg/status")
    vmlinux, vbtf, vh = _vmlinux_h(b, rootfs, status, vmlinuz)
    scx, dtc = _sched_ext_dir(b, apt, k)
    inc = _include(b, rootfs, status, scx, vh)
    loader, agent = _guest_binaries(b, rootfs, status)
    small, full = _initramfs(b, rootfs, status, loader, agent, dtc, vbtf, k["abi"])
    old = _up_to_date(b, rootfs)
    if old is not None:
        return old
    toolchain = _toolchain_versions(rootfs)
    b.step("manifest")
    hashes = {
        "vmlinuz": _sha256_file(vmlinuz),
        "vmlinux_btf": _sha256_file(vbtf),
        "vmlinux_h": _sha256_file(vh),
        "rootfs_dpkg_status": status,
        "include_dir": _sha256_tree(inc),
        "loader": _sha256_file(loader),
        "agent": _sha256_file(agent),
        "initramfs": _sha256_file(small),
        "initramfs_full": _sha256_file(full),
    }
    build_id = _fp(hashes["vmlinuz"], hashes["include_dir"], hashes["loader"], hashes["initramfs"],
                   hashes["initramfs_full"], hashes["rootfs_dpkg_status"], toolchain)[:16]
    pkgs = _rootfs_packages(rootfs)
    pkgs.update({k["binary"]: k["version"], k["base"]: k["version"], k["image"]: k["version"]})
    if k.get("source_version"):
        pkgs[k["source"]] = k["source_version"]
    m = Manifest(
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        sandbox_dir=str(b.sd),
        kernel_version=k["abi"],
        kernel_package=k["image"],
        sched_ext=True,
        packages=pkgs,
        paths=Paths(vmlinuz=str(vmlinuz), kernel_config=str(kconfig), vmlinux=str(vmlinux),
                    boot_kernel=str(vmlinux if has_pvh_entry(vmlinux) else vmlinuz),
                    vmlinux_btf=str(vbtf), vmlinux_h=str(vh), scx_dir=str(scx),
                    scx_include_dir=str(scx / "include"), scx_examples_dir=str(scx), rootfs=str(rootfs),
                    loader=str(loader), initramfs=str(small), initramfs_full=str(full)),
        toolchain=Toolchain(**toolchain, include_dirs=INCLUDE_DIRS, cflags=BPF_CFLAGS),
        sizes={"initramfs": small.stat().st_size, "initramfs_full": full.stat().st_size,
               "loader": loader.stat().st_size},
        hashes=hashes,
        build_id=build_id,
        sources_sha=sources_sha(),
        build_seconds=round(time.monotonic() - b.t_start, 1),
    )
    _write_manifest(m)
    b.steps.mark("manifest", _manifest_fp(b))
    b.say("sandbox image built", 1.0)
    return m


def _resolve(b: _Build, refresh: bool) -> tuple[Apt, dict[str, str]]:
    """1. apt lists for sid; 2. the newest sid cloud kernel (re-resolved when the lists changed)."""
    b.step("Debian sid package lists")
    apt = Apt(b.sd)
    if b.force or refresh or not apt.has_lists():
        apt.update()
    b.step("resolving the newest sid cloud kernel")
    lists_fp = apt.lists_fingerprint()
    cached = b.steps.done.get("resolved")
    if not b.force and isinstance(cached, dict) and cached.get("lists") == lists_fp:
        return apt, cached["kernel"]
    k = resolve_kernel(apt)
    try:
        k["source_version"] = apt.show(k["source"]).get("Version", "")
    except InfrastructureError:
        k["source_version"] = ""
    b.steps.mark("resolved", {"lists": lists_fp, "kernel": k})
    return apt, k


def _kernel(b: _Build, apt: Apt, k: dict[str, str]) -> tuple[Path, Path]:
    """Download the kernel packages and keep vmlinuz and config; refuse one without sched_ext."""
    debs = b.sd / "debs"
    debs.mkdir(exist_ok=True)
    kdir = b.sd / "kernel"
    kfp = b.fp["kernel"] = _fp(k["image"], k["version"], k["binary"], k["base"])
    vmlinuz, kconfig = kdir / "vmlinuz", kdir / "config"
    if not b.steps.fresh("kernel", kfp, vmlinuz, kconfig):
        b.say(f"downloading {k['binary']} {k['version']}", b.n / b.TOTAL)
        for f in debs.glob("*.deb"):
            f.unlink()
        apt.download(sorted({k["binary"], k["base"]}), debs)
        shutil.rmtree(kdir, ignore_errors=True)
        tmp = b.sd / "kernel.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for deb in debs.glob("*.deb"):
            run_tool(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        mod = tmp / "usr/lib/modules" / k["abi"]
        if not (mod / "vmlinuz").exists():
            cand = list((tmp / "boot").glob("vmlinuz-*")) if (tmp / "boot").exists() else []
            if not cand:
                raise InfrastructureError(f"no vmlinuz in {k['binary']}")
            mod.mkdir(parents=True, exist_ok=True)
            shutil.copy(cand[0], mod / "vmlinuz")
            shutil.copy(next((tmp / "boot").glob("config-*")), mod / "config")
        kdir.mkdir()
        shutil.copy(mod / "vmlinuz", vmlinuz)
        shutil.copy(mod / "config", kconfig)
        shutil.rmtree(tmp)
        for f in debs.glob("*.deb"):
            f.unlink()
        b.steps.mark("kernel", kfp)
    if not kernel_config_has(kconfig, "CONFIG_SCHED_CLASS_EXT"):
        raise InfrastructureError(
            f"{k['image']} {k['version']} has no CONFIG_SCHED_CLASS_EXT=y",
            hint="Debian sid's kernel config changed; try again later or pin an older kernel")
    return vmlinuz, kconfig


def _rootfs(b: _Build) -> Path:
    """3. The trixie rootfs: the toolchain and the guest's tools."""
    b.step(f"Debian {ROOTFS_SUITE} rootfs with clang, libbpf, bpftool, stress-ng, perf (mmdebstrap)")
    rootfs = b.sd / "rootfs"
    mirror = debian_mirror()
    rfp = b.fp["rootfs"] = _fp(ROOTFS_SUITE, ROOTFS_PACKAGES)
    if not b.steps.fresh("rootfs", rfp, rootfs / "usr/bin/clang", rootfs / "usr/sbin/bpftool"):
        tmp = b.sd / "rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        mode = "root" if os.geteuid() == 0 else "unshare"
        run_tool(["mmdebstrap", "--variant=minbase", f"--mode={mode}", "--include=" + ",".join(ROOTFS_PACKAGES),
                  "--aptopt=Acquire::Retries \"3\"",
                  "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
                  "--dpkgopt=path-exclude=/usr/share/doc/*",
                  ROOTFS_SUITE, str(tmp), mirror], "mmdebstrap (the trixie rootfs)", timeout=1800)
        _swap_dir(tmp, rootfs)
        b.steps.mark("rootfs", rfp)
    return rootfs


def _vmlinux_h(b: _Build, rootfs: Path, status: str, vmlinuz: Path) -> tuple[Path, Path, Path]:
    """4. vmlinux, raw BTF, vmlinux.h (with the rootfs's bpftool 7.5)."""
    b.step("vmlinux, BTF and vmlinux.h")
    kdir = vmlinuz.parent
    vmlinux, vbtf, vh = kdir / "vmlinux", kdir / "vmlinux.btf", kdir / "vmlinux.h"
    hfp = b.fp["vmlinux_h"] = _fp(_sha256_file(vmlinuz), status)
    if not b.steps.fresh("vmlinux_h", hfp, vmlinux, vbtf, vh):
        extract_vmlinux(vmlinuz, vmlinux)
        extract_btf(vmlinux, vbtf)
        stage = rootfs / "tmp/schedcp-btf"
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copy(vbtf, stage / "vmlinux.btf")
        out = chroot_run(rootfs, ["bpftool", "btf", "dump", "file", "/tmp/schedcp-btf/vmlinux.btf",
                                  "format", "c"], "bpftool btf dump (vmlinux.h)")
        shutil.rmtree(stage)
        if "struct sched_ext_ops {" not in out:
            raise InfrastructureError("the kernel's BTF has no struct sched_ext_ops")
        vh.write_text(out)
        b.steps.mark("vmlinux_h", hfp)
    return vmlinux, vbtf, vh


def _sched_ext_dir(b: _Build, apt: Apt, k: dict[str, str]) -> tuple[Path, Path]:
    """5. tools/sched_ext and scripts/dtc (the compile workload's source) from linux-source-<ver>."""
    b.step(f"tools/sched_ext and scripts/dtc from {k['source']}")
    scx, dtc = b.sd / "sched_ext", b.sd / "dtc"
    sfp = b.fp["sched_ext"] = _fp(k["source"], k["version"])
    if not b.steps.fresh("sched_ext", sfp, scx / "include/scx/common.bpf.h", scx / "scx_simple.bpf.c",
                         dtc / "libfdt/fdt.c"):
        _extract_kernel_source(apt, k, b.sd, {"tools/sched_ext": scx, "scripts/dtc": dtc})
        b.steps.mark("sched_ext", sfp)
    return scx, dtc


def _include(b: _Build, rootfs: Path, status: str, scx: Path, vh: Path) -> Path:
    """6. The allowlisted include directory inside the rootfs."""
    b.step("allowlisted BPF include directory")
    inc = rootfs / INCLUDE_ROOT.lstrip("/")
    ifp = b.fp["include"] = _fp(b.fp["sched_ext"], status, b.fp["vmlinux_h"],
                                BPF_CFLAGS, COMPILE_FLAGS, INCLUDE_DIRS, PCH_DEFINES)
    pch = rootfs / PCH.lstrip("/")
    if not b.steps.fresh("include", ifp, inc / "vmlinux.h", inc / "scx/common.bpf.h", pch):
        _make_include_dir(rootfs, scx, vh, inc)
        _make_pch(rootfs, pch)
        b.steps.mark("include", ifp)
    return inc


def _make_pch(rootfs: Path, out: Path) -> None:
    """Precompile the include dir's vmlinux.h (after it is in place: the PCH names the header's path
    and clang checks its size and time), then rename it in: a compile meanwhile finds none and
    compiles without it."""
    tmp = "/tmp/schedcp-vmlinux.h.pch"
    chroot_run(rootfs, [*clang_argv(rootfs, BPF_CFLAGS, INCLUDE_DIRS), *PCH_DEFINES, "-x", "c-header",
                        f"{INCLUDE_ROOT}/vmlinux.h", "-o", tmp], "precompiling vmlinux.h")
    built = rootfs / tmp.lstrip("/")
    built.chmod(0o644)
    os.replace(built, out)


def _guest_binaries(b: _Build, rootfs: Path, status: str) -> tuple[Path, Path]:
    """7. schedcp-loader and schedcp-agent, statically linked in the toolchain; rebuilt when their
    sources change."""
    b.step("schedcp-loader (static libbpf loader)")
    gdir = b.sd / "guest"
    gdir.mkdir(exist_ok=True)
    out = []
    for name, srcs, libs in (("loader", ["loader.c", "eu_search_shim.c"], ["-lbpf", "-lelf", "-lz", "-lzstd"]),
                             ("agent", ["agent.c"], [])):
        binary, src = gdir / f"schedcp-{name}", [GUEST_SRC / f for f in srcs]
        fp = b.fp[name] = _fp([_sha256_file(p) for p in src], status)
        if not b.steps.fresh(name, fp, binary):
            _build_static(rootfs, src, binary, libs)
            b.steps.mark(name, fp)
        out.append(binary)
    return out[0], out[1]


def _initramfs(b: _Build, rootfs: Path, status: str, loader: Path, agent: Path,
               dtc: Path, vbtf: Path, release: str) -> tuple[Path, Path]:
    """8. The small (verify) and full (workloads: tools, and the compile workload's compiler and source)
    initramfs images."""
    b.step("guest initramfs images")
    gdir = loader.parent
    small, full = gdir / "initramfs.cpio.gz", gdir / "initramfs-full.img"
    init = GUEST_SRC / "init.sh"
    gfp = b.fp["initramfs"] = _fp(_sha256_file(init), _sha256_file(loader), _sha256_file(agent), status,
                                  GUEST_TOOLS, COMPILE_TOOLS, b.fp["sched_ext"], _sha256_file(COMPILE_MK),
                                  _sha256_file(vbtf), release)
    if not b.steps.fresh("initramfs", gfp, small, full):
        small_gz = _small_initramfs(rootfs, init, loader, agent, _kernel_enums(rootfs, loader, vbtf, release))
        _atomic_write(small, small_gz)
        _atomic_write(full, small_gz + _tools_archive(rootfs) + _compile_archive(rootfs, dtc))
        b.steps.mark("initramfs", gfp)
    return small, full


def _manifest_fp(b: _Build) -> str:
    return _fp(*(b.fp[s] for s in ("kernel", "rootfs", "vmlinux_h", "sched_ext", "include", "loader", "agent",
                                   "initramfs")), Manifest.model_fields["schema_version"].default)


def _up_to_date(b: _Build, rootfs: Path) -> Manifest | None:
    """9. The existing manifest when no step changed anything."""
    b.step("toolchain versions")
    old = load_manifest()
    if old is None or not b.steps.fresh("manifest", _manifest_fp(b), manifest_path()) \
            or old.paths.rootfs != str(rootfs):
        return None
    if old.sources_sha != sources_sha():  # a source change that changed no artifact
        old.sources_sha = sources_sha()
        _write_manifest(old)
    b.say("sandbox image is up to date", 1.0)
    return old


def _write_manifest(m: Manifest) -> None:
    tmp = manifest_path().with_suffix(".tmp")
    tmp.write_text(m.model_dump_json(indent=2))
    tmp.replace(manifest_path())


class _BuildLock:
    """One build at a time per sandbox dir (two CLI invocations must not interleave)."""

    def __init__(self, sd: Path):
        self.path = sd / ".build.lock"

    def __enter__(self):
        import fcntl

        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self.f, fcntl.LOCK_EX)  # another build is running: wait for it
        return self

    def __exit__(self, *exc):
        self.f.close()


def _extract_kernel_source(apt: Apt, k: dict[str, str], sd: Path, dirs: dict[str, Path]) -> None:
    """Pull the directories `dirs` (tree path -> where to put it) out of linux-source's tarball."""
    tmp = sd / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        apt.download([k["source"]], tmp)
        deb = next(tmp.glob("*.deb"))
        # the .deb holds usr/src/linux-source-X.Y.tar.xz: pull that one file out, then one dir from it
        p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=p.stdout, mode="r|") as tf:
            for member in tf:
                if member.name.endswith(".tar.xz") and "/usr/src/" in "/" + member.name.lstrip("./"):
                    with open(tmp / "src.tar.xz", "wb") as out:
                        shutil.copyfileobj(tf.extractfile(member), out)
                    break
        p.wait()
        deb.unlink()
        if not (tmp / "src.tar.xz").exists():
            raise InfrastructureError(f"{k['source']} holds no source tarball")
        run_tool(["tar", "-xJf", str(tmp / "src.tar.xz"), "-C", str(tmp), "--wildcards",
                  *[f"*/{d}/*" for d in dirs]], f"extracting {', '.join(dirs)}", timeout=600)
        for d, dest in dirs.items():
            found = next(tmp.glob(f"*/{d}"), None)
            if found is None:
                raise InfrastructureError(f"{k['source']} has no {d}")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(found), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_include_dir(rootfs: Path, scx: Path, vh: Path, final: Path) -> None:
    """Only libbpf's bpf/*.h, scx/*.h, bpf-compat, vmlinux.h and asm-generic/errno*.h. Built aside and
    swapped in, so that a compile running meanwhile sees the old or the new directory, whole."""
    inc = final.with_name(final.name + ".new")
    shutil.rmtree(inc, ignore_errors=True)
    (inc / "bpf").mkdir(parents=True)
    (inc / "asm-generic").mkdir()
    for h in (rootfs / "usr/include/bpf").glob("*.h"):
        shutil.copy(h, inc / "bpf")
    shutil.copytree(scx / "include/scx", inc / "scx")
    shutil.copytree(scx / "include/bpf-compat", inc / "bpf-compat")
    for h in ("errno.h", "errno-base.h"):
        shutil.copy(rootfs / "usr/include/asm-generic" / h, inc / "asm-generic")
    shutil.copy(vh, inc / "vmlinux.h")
    for p in [inc, *inc.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    _swap_dir(inc, final)


def _build_static(rootfs: Path, sources: list[Path], out: Path, libs: list[str]) -> None:
    """Compile a static guest binary with the rootfs's gcc (the guest has no shared libraries)."""
    work = rootfs / "tmp/schedcp-static-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for s in sources:
            shutil.copy(s, work / s.name)
        chroot_run(rootfs, ["gcc", "-O2", "-Wall", "-static", "-o", "/tmp/schedcp-static-build/out",
                            *[f"/tmp/schedcp-static-build/{s.name}" for s in sources], *libs],
                   f"compiling {out.name}")
        chroot_run(rootfs, ["strip", "/tmp/schedcp-static-build/out"], f"strip {out.name}")
        _atomic_write(out, (work / "out").read_bytes(), 0o755)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_enums(rootfs: Path, loader: Path, vbtf: Path, release: str) -> bytes:
    """The guest kernel's SCX_* enumerators, listed by the loader itself from the kernel's BTF: in the
    guest (KERNEL_ENUMS_GUEST_PATH) they spare every load a parse of that BTF (see loader.c)."""
    stage = rootfs / "tmp/schedcp-enums"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        shutil.copy(vbtf, stage / "vmlinux.btf")
        shutil.copy(loader, stage / "loader")
        out = chroot_run(rootfs, ["/tmp/schedcp-enums/loader", "--dump-enums", "/tmp/schedcp-enums/vmlinux.btf",
                                  release], "listing the kernel's SCX enumerators")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not out.startswith("schedcp-kernel-enums 1 ") or "SCX_DSQ_GLOBAL" not in out:
        raise InfrastructureError(f"the loader listed no SCX enumerators from {vbtf}: {out[:200]!r}")
    return out.encode()


def _small_initramfs(rootfs: Path, init: Path, loader: Path, agent: Path, kernel_enums: bytes) -> bytes:
    c = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "etc",
              "sys/fs/bpf", "sys/kernel/debug", "usr/share", "usr/share/schedcp"):
        c.dir(d)
    c.file(KERNEL_ENUMS_GUEST_PATH.lstrip("/"), kernel_enums, 0o644)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("init", init.read_bytes(), 0o755)
    c.file("bin/busybox", (rootfs / "usr/bin/busybox").read_bytes(), 0o755)
    c.file(LOADER_GUEST_PATH, loader.read_bytes(), 0o755)
    c.file("usr/bin/schedcp-agent", agent.read_bytes(), 0o755)
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    c.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return c.gz()


def _tools_archive(rootfs: Path) -> bytes:
    """The workload tools and their shared libraries, as a cpio to append to the small image."""
    c = Cpio()
    tools = [t for t in GUEST_TOOLS if (rootfs / t.lstrip("/")).exists()]
    for t in tools + _ldd(rootfs, tools):
        c.from_rootfs(rootfs, t)
    # perf execs perf_<ver> wrappers on some releases; take any versioned perf binaries too
    for extra in sorted((rootfs / "usr/bin").glob("perf_*")):
        c.from_rootfs(rootfs, "/usr/bin/" + extra.name)
    # the entries the small image owns must not be replaced by merged-/usr symlinks
    for d in ("bin", "sbin"):
        c.entries.pop(d, None)
    return c.gz(level=1)


COMPILE_MK = GUEST_SRC / "compile.mk"


def _compile_archive(rootfs: Path, dtc: Path) -> bytes:
    """The compile workload, as a cpio to append to the full image: its source tree at COMPILE_GUEST_DIR
    and exactly the compiler files its build uses. The build is run once here, in the rootfs, with
    dependency files (-MD, system header paths as looked up) and the linker's --trace: what it read is
    what the guest gets, so a build that works here works there."""
    stage = rootfs / "tmp/schedcp-compile"
    shutil.rmtree(stage, ignore_errors=True)
    src = stage / "src"
    try:
        for f in [*dtc.glob("*.[ch]"), *dtc.glob("libfdt/*.[ch]")]:
            (src / f.relative_to(dtc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, src / f.relative_to(dtc))
        shutil.copy(COMPILE_MK, src / "Makefile")
        trace = chroot_run(rootfs, ["make", "-C", "/tmp/schedcp-compile/src", "-j2", "O=/tmp/schedcp-compile/out",
                                    "DEPFLAGS=-MD -fno-canonical-system-headers", "LDFLAGS=-Wl,--trace"],
                           "test-building the compile workload in the rootfs")
        used: set[str] = set()
        for d in (stage / "out").rglob("*.d"):
            used.update(w for w in d.read_text().replace("\\\n", " ").split() if w.startswith("/usr/"))
        used.update(os.path.normpath(w) for w in trace.split() if w.startswith("/") and "/schedcp-compile/" not in w
                    and (rootfs / w.lstrip("/")).exists())
        c = Cpio()
        for f in sorted(src.rglob("*")):
            if f.is_file():
                c.file(f"{COMPILE_GUEST_DIR}/{f.relative_to(src)}", f.read_bytes())
        for t in COMPILE_TOOLS + _ldd(rootfs, [t for t in COMPILE_TOOLS if not t.endswith(".so")]) + sorted(used):
            c.from_rootfs(rootfs, t)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "sbin"):  # as in _tools_archive: the small image owns these
        c.entries.pop(d, None)
    return c.gz(level=6)


def _rootfs_packages(rootfs: Path) -> dict[str, str]:
    want = {"clang", "llvm", "libbpf-dev", "libbpf1", "bpftool", "stress-ng", "rt-tests", "linux-perf",
            "busybox-static", "linux-libc-dev", "gcc", "libelf-dev", "redis-server", "redis-tools", "make",
            "binutils"}
    out: dict[str, str] = {}
    pkg = None
    for line in (rootfs / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            pkg = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and pkg in want:
            out[pkg.split(":")[0]] = line.split(": ", 1)[1]
    return out


def _toolchain_versions(rootfs: Path) -> dict[str, str]:
    clang = chroot_run(rootfs, ["clang", "--version"], "clang --version").splitlines()[0]
    bpftool = chroot_run(rootfs, ["bpftool", "--version"], "bpftool --version")
    bv = re.search(r"v(\d+\.\d+\.\d+)", bpftool)
    lv = re.search(r"libbpf v(\d+\.\d+)", bpftool)
    pk = _rootfs_packages(rootfs)
    cv = re.search(r"clang version (\d+\.\d+\.\d+)", clang)
    return {"clang": cv.group(1) if cv else clang, "bpftool": bv.group(1) if bv else bpftool.strip(),
            "libbpf": _upstream(pk.get("libbpf-dev", "")) or (lv.group(1) if lv else "")}


def _upstream(debian_version: str) -> str:
    """"1:1.5.0-3" -> "1.5.0" (no epoch, no Debian revision)."""
    v = debian_version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v
