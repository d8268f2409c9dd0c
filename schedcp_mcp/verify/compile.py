"""Compile BPF C into an object with clang in the sandbox toolchain, and read clang's diagnostics.

The compiler runs through `sandbox.toolchain.run`: in a jail holding nothing but the toolchain, the
allowlisted include directories and the work directory (no host file, no /etc, no /proc), without
network, with time and memory limits. Only the allowlisted include directories are searched
(`-nostdinc`, the image's `/opt/schedcp/include` holding vmlinux.h, bpf/, scx/, asm-generic/errno*.h),
plus the operator's trusted directories, copied into the work directory (a symlink in them that
leads outside is refused). Two steps, at once, each in a jail: the preprocessor's output — where
every macro, `_Pragma` and string trick is expanded — is checked (`source_check.check_preprocessed`:
inline assembly with escapes decoded, only allowlisted directives and pragmas; every file opened,
from `-MD`, inside the allowed directories) while clang compiles the same inputs, and the object is
taken only when the text passed (same inputs, same jail: the compiler saw the checked text). Until
2026-12 the compile waited for the check; the jail, not the order, is what keeps the compiler from
host files, and the preprocessor always ran on the unchecked source in the same jail.

For the host target the object is compiled against a vmlinux.h generated from the host's own BTF
(`host_vmlinux_h`), put first on the include path as `target/vmlinux.h`.

Most of a compile was clang parsing vmlinux.h (~3 MB) and checking its preprocessed text. The
image holds it precompiled (`image.PCH`, made with the macro scx/common.bpf.h defines before it
includes vmlinux.h), and a source whose first line is `#include <scx/common.bpf.h>` is preprocessed
and compiled with it: nothing of the source comes before vmlinux.h there, so the object has the same
code and the same BTF types (numbered in another order); every other source, a host-target compile and
one with trusted include dirs parse vmlinux.h as before. (A precompiled `scx/common.bpf.h` was tried
first: clang 19 then leaves the BTF of the extern kfuncs declared in it out of the object; vmlinux.h
declares none under that macro.) The check of the preprocessed text then reads the source and the
scx headers, not vmlinux.h, which no macro of the source can reach.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..errors import BadInput, InfrastructureError
from ..sandbox import image, toolchain
from .models import VerifyError
from .source_check import check_preprocessed

SOURCE_NAME = "source.bpf.c"
OBJECT_NAME = "source.bpf.o"
DEPS_NAME = "source.d"
PREPROCESSED_NAME = "source.i"
TARGET_HEADER_DIR = "target"  # in the work dir: the target kernel's vmlinux.h, when not the sandbox's
MAX_TRUSTED_FILES = 500
MAX_TRUSTED_BYTES = 16 * 1024 * 1024

_DIAG = re.compile(r"^(?P<file>[^\s:][^:\n]*):(?P<line>\d+):(?P<col>\d+): "
                   r"(?P<sev>fatal error|error|warning|note): (?P<msg>.*)$")


@dataclass
class CompileResult:
    ok: bool
    object: bytes | None = None
    errors: list[VerifyError] = field(default_factory=list)
    warnings: list[VerifyError] = field(default_factory=list)
    stderr: str = ""
    seconds: float = 0.0
    opened: list[str] = field(default_factory=list)  # files clang read (from -MD)
    pch: bool = False  # compiled with the image's precompiled vmlinux.h

    @property
    def object_sha256(self) -> str | None:
        return hashlib.sha256(self.object).hexdigest() if self.object else None


def parse_diagnostics(stderr: str, source_lines: list[str] | None = None,
                      source_name: str = SOURCE_NAME) -> list[VerifyError]:
    """clang's `file:line:col: severity: message` lines, with the source line as the snippet."""
    out: list[VerifyError] = []
    lines = stderr.splitlines()
    for i, ln in enumerate(lines):
        m = _DIAG.match(ln)
        if not m:
            continue
        sev = "error" if "error" in m["sev"] else m["sev"]
        line_no = int(m["line"])
        snippet = None
        if source_lines is not None and Path(m["file"]).name == source_name and 0 < line_no <= len(source_lines):
            snippet = source_lines[line_no - 1].rstrip()
        elif i + 1 < len(lines) and re.match(r"^\s*\d+ \| ", lines[i + 1]):
            snippet = lines[i + 1].split("| ", 1)[1].rstrip()
        out.append(VerifyError(stage="compile", code="clang", severity=sev, message=m["msg"],
                               file=m["file"], line=line_no, column=int(m["col"]), snippet=snippet))
    return out


def _trusted_files(dirs: tuple[Path, ...]) -> tuple[dict[str, bytes], list[str]]:
    """Headers of the operator-trusted include dirs, to copy into the work dir as trusted/<i>/."""
    files: dict[str, bytes] = {}
    flags: list[str] = []
    total = 0
    for i, d in enumerate(dirs):
        d = Path(d).resolve()
        if not d.is_dir():
            raise InfrastructureError(f"trusted include directory {d} does not exist")
        flags.append(f"-Itrusted/{i}")
        for p in sorted(d.rglob("*.h")):
            real = p.resolve()
            if not real.is_relative_to(d):  # a symlink out of the directory: never follow it
                raise BadInput(f"{p} in trusted include directory {d} is a symlink to {real}, "
                               "outside that directory; refused",
                               "copy the header into the directory instead of linking it")
            if not real.is_file():
                continue
            total += p.stat().st_size
            if len(files) >= MAX_TRUSTED_FILES or total > MAX_TRUSTED_BYTES:
                raise InfrastructureError(f"trusted include directory {d} is too big "
                                          f"(> {MAX_TRUSTED_FILES} headers or {MAX_TRUSTED_BYTES >> 20} MiB)")
            files[f"trusted/{i}/{p.relative_to(d)}"] = real.read_bytes()
    return files, flags


def _deps(text: str) -> list[str]:
    """Paths from a make-style dependency file (`obj: a.c b.h \\`)."""
    body = text.replace("\\\n", " ")
    body = body.split(":", 1)[1] if ":" in body else ""
    return [p.replace("\\ ", " ") for p in re.findall(r"(?:\\ |\S)+", body)]


def _base_argv(manifest, first_includes: list[str] = ()) -> list[str]:
    return image.clang_argv(Path(manifest.paths.rootfs), manifest.toolchain.cflags,
                            [*first_includes, *manifest.toolchain.include_dirs])


#: the source's first line of code (comments and blank lines before it skipped)
_FIRST_LINE = re.compile(r"\A(?:\s|//[^\n\\]*\n|/\*.*?\*/)*([^\n]*)", re.S)  # (no \ continuing a //)
_COMMON_INCLUDE = re.compile(r'#\s*include\s*(<scx/common\.bpf\.h>|"scx/common\.bpf\.h")\s*')


def _pch_flags(source: str, manifest, trusted: bool, own_vmlinux_h: bool) -> list[str]:
    """The precompiled vmlinux.h's flags when compiling with it is the same as without: the source
    starts with `#include <scx/common.bpf.h>` (which includes vmlinux.h before anything else, under
    the macro the PCH was made with: nothing of the source comes before it), the image's headers
    are the only ones (no trusted dirs, no target vmlinux.h) and the image has the PCH."""
    if trusted or own_vmlinux_h or not Path(manifest.paths.rootfs, image.PCH.lstrip("/")).is_file():
        return []
    m = _FIRST_LINE.match(source)
    if not m or not _COMMON_INCLUDE.fullmatch(m.group(1)):
        return []
    return [*image.PCH_DEFINES, "-include-pch", image.PCH]


def host_vmlinux_h(btf_path: Path) -> bytes:
    """vmlinux.h for the host kernel, from its BTF (`/sys/kernel/btf/vmlinux`), made with the
    toolchain's bpftool and kept under $SCHEDCP_HOME/host/ by the BTF's hash."""

    try:
        btf = btf_path.read_bytes()
    except OSError as e:
        raise InfrastructureError(f"cannot read the host kernel's BTF {btf_path}: {e}",
                                  "the host kernel needs CONFIG_DEBUG_INFO_BTF; use --target sandbox") from e
    out = config.home() / "host" / f"vmlinux-{hashlib.sha256(btf).hexdigest()[:16]}.h"
    if out.exists():
        return out.read_bytes()
    res = toolchain.run(["sh", "-c", "bpftool btf dump file vmlinux.btf format c > vmlinux.h"],
                        workdir_files={"vmlinux.btf": btf}, outputs=["vmlinux.h"], timeout_s=120)
    header = res.outputs.get("vmlinux.h")
    if res.rc != 0 or not header:
        raise InfrastructureError(f"bpftool could not turn {btf_path} into vmlinux.h: "
                                  f"{res.stderr.strip()[-300:] or f'exit {res.rc}'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # concurrent verifies
    tmp.write_bytes(header)
    tmp.replace(out)
    return header


def compile_source(source: str, manifest, *, trusted_include_dirs: tuple[Path, ...] = (),
                   timeout_s: float = 60, mem_mb: int = 2048,
                   vmlinux_h: bytes | None = None) -> CompileResult:
    """Compile `source` (already through `source_check`) with the image's clang and flags.
    `vmlinux_h` replaces the sandbox kernel's (the host target gives the host's)."""

    files, trusted_flags = _trusted_files(tuple(trusted_include_dirs))
    files[SOURCE_NAME] = source.encode()
    first = []
    if vmlinux_h is not None:
        files[f"{TARGET_HEADER_DIR}/vmlinux.h"] = vmlinux_h
        first = [TARGET_HEADER_DIR]  # searched before the image's include dirs
    include_dirs = list(manifest.toolchain.include_dirs)
    flags = [*_base_argv(manifest, first), *trusted_flags]
    pch = _pch_flags(source, manifest, bool(trusted_flags), vmlinux_h is not None)
    res = _compile(source, files, [*flags, *pch], include_dirs, timeout_s, mem_mb)
    if pch and not res.ok and any(image.PCH in e.message or "precompiled header" in e.message
                                  for e in res.errors):
        res = _compile(source, files, flags, include_dirs, timeout_s, mem_mb)  # a PCH clang refused
    else:
        res.pch = bool(pch)
    return res


def _compile(source: str, files: dict[str, bytes], flags: list[str], include_dirs: list[str],
             timeout_s: float, mem_mb: int) -> CompileResult:
    allowed = tuple(d.rstrip("/") + "/" for d in include_dirs)

    def outside(path: str) -> bool:
        norm = posixpath.normpath(path)
        return not (norm == SOURCE_NAME or norm.startswith(("trusted/", f"{TARGET_HEADER_DIR}/"))
                    or norm.startswith(allowed))

    def diagnostics(stderr: str) -> list[VerifyError]:
        out = []
        for d in parse_diagnostics(stderr, re.split(r"\r\n|\r|\n", source)):  # clang's line ends
            if d.file and outside(d.file):
                # never echo a file we should not have read (its first line would be the snippet)
                d = VerifyError(stage="compile", code="include_not_allowed",
                                message=f"the compiler read {d.file}, outside the allowed include "
                                "directories; refused")
            out.append(d)
        return out

    def failed(res, result: CompileResult) -> CompileResult:
        if res.timed_out:
            result.errors.append(VerifyError(stage="compile", code="timeout",
                                             message=f"the compiler did not finish in {timeout_s:.0f} s"))
        elif not result.errors:
            tail = [ln for ln in res.stderr.strip().splitlines()[-3:]]
            why = " / ".join(tail) or f"clang exited with {res.rc}"
            if res.rc in (137, -9):
                why = f"the compiler was killed (memory limit {mem_mb} MiB or time limit): {why}"
            result.errors.append(VerifyError(stage="compile", code="compiler_failed", message=why))
        return result

    # 1. Preprocess and check what the compiler really sees (every macro, _Pragma and string-literal
    # trick is expanded in this text), while 2. clang compiles the same inputs in a jail of its own;
    # the object is taken only when the text passed. One after the other they were most of a warm
    # verify. The compiler meets nothing the preprocessor did not: the same jail, the same inputs.
    t0 = time.monotonic()
    with ThreadPoolExecutor(1, thread_name_prefix="schedcp-clang") as pool:
        compiling = pool.submit(toolchain.run, [*flags, "-c", SOURCE_NAME, "-o", OBJECT_NAME],
                                workdir_files=files, timeout_s=timeout_s, mem_mb=mem_mb,
                                outputs=[OBJECT_NAME])
        pre = toolchain.run([*flags, "-MD", "-MF", DEPS_NAME, "-E", SOURCE_NAME, "-o", PREPROCESSED_NAME],
                            workdir_files=files, timeout_s=timeout_s, mem_mb=mem_mb,
                            outputs=[DEPS_NAME, PREPROCESSED_NAME])
        diags = diagnostics(pre.stderr)
        result = CompileResult(ok=False, stderr=pre.stderr, errors=[d for d in diags if d.severity == "error"],
                               warnings=[d for d in diags if d.severity == "warning"])
        text = pre.outputs.get(PREPROCESSED_NAME)
        if not (pre.timed_out or pre.rc != 0 or text is None):
            result.opened = _deps(pre.outputs.get(DEPS_NAME, b"").decode("utf-8", "replace"))
            for p in result.opened:
                if outside(p):
                    result.errors.append(VerifyError(stage="compile", code="include_not_allowed",
                                                     message=f"the compiler opened {p}, outside the allowed "
                                                     "include directories; refused"))
            result.errors += check_preprocessed(text.decode("utf-8", "replace"))
        res = compiling.result()
    result.seconds = time.monotonic() - t0
    if pre.timed_out or pre.rc != 0 or text is None:
        return failed(pre, result)
    if result.errors:
        return result  # the object (if any) is dropped

    # the same inputs preprocess to the same text, so the compiler saw the checked tokens;
    # compiling the source rather than source.i keeps clang's columns exact
    result.stderr = res.stderr
    diags = diagnostics(res.stderr)
    result.errors = [d for d in diags if d.severity == "error"]
    result.warnings += [d for d in diags if d.severity == "warning"]
    obj = res.outputs.get(OBJECT_NAME)
    if res.timed_out or res.rc != 0 or not obj:
        return failed(res, result)
    if result.errors:
        return result
    result.ok, result.object = True, obj
    return result
