"""Layer 1 against hostile sources: every file in tests/fixtures/hostile/ tries to make the
preprocessor, the compiler or the assembler read a file (or to probe for one). Each must be refused,
and — checked by compiling it anyway, as if the source checks had been fooled — no byte of the
targeted files may reach the object, the diagnostics or the report. The fixtures skip vmlinux.h so
each compile takes a fraction of a second."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from schedcp_mcp.verify.compile import compile_source
from schedcp_mcp.verify.source_check import check_source

HOSTILE = sorted((Path(__file__).parent / "fixtures" / "hostile").glob("*.bpf.c"))
CANARY = Path("/tmp/schedcp-hostile-canary")  # the fixtures name it; planted here


@pytest.fixture(scope="module")
def planted() -> list[bytes]:
    """What must never come back: the canary's random contents and any /etc/passwd's first bytes."""
    import os

    token = f"CANARY-{secrets.token_hex(12)}"
    CANARY.unlink(missing_ok=True)  # never write through a link someone planted in /tmp
    fd = os.open(CANARY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:  # readable by anyone: the jailed compiler too, if it could see it
        f.write(token + "\n")
    try:
        yield [token.encode(), b"root:x:0:0"]
    finally:
        CANARY.unlink(missing_ok=True)


def test_the_corpus_is_there():
    assert len(HOSTILE) >= 25


# Probes the checks cannot see (a `__has_include` pasted together inside `#if` leaves no trace in
# the preprocessor's output): harmless by construction, because in the jail no host file exists —
# the probe must answer "absent" for a file that is there on the host.
EXISTENCE_PROBES = {"has_include_paste": b"present"}


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p.name.removesuffix(".bpf.c"))
def test_hostile_source_is_refused_and_reads_nothing(path, manifest, planted):
    src = path.read_text()
    refused_early = check_source(src)
    c = compile_source(src, manifest)  # as if source_check had been fooled: the jail must hold
    probe = EXISTENCE_PROBES.get(path.name.removesuffix(".bpf.c"))
    if probe:
        assert Path("/etc/passwd").exists()
        assert not c.ok or probe not in c.object, f"{path.name}: the probe saw a host file"
    else:
        assert refused_early or not c.ok, f"{path.name} was accepted"
    told = repr(refused_early) + repr(c.errors) + repr(c.warnings) + c.stderr
    for secret in planted:
        assert secret not in (c.object or b""), f"{path.name}: file bytes in the object"
        assert secret.decode() not in told, f"{path.name}: file bytes in the diagnostics"


def test_a_symlink_out_of_a_trusted_include_dir_is_refused(tmp_path, manifest, planted):
    from schedcp_mcp.errors import BadInput

    trusted = tmp_path / "include"
    trusted.mkdir()
    (trusted / "ok.h").write_text("#define OK 1\n")
    (trusted / "leak.h").symlink_to(CANARY)
    src = ('#include <scx/common.bpf.h>\n#include "leak.h"\nchar _license[] SEC("license") = "GPL";\n')
    assert check_source(src, trusted_include_dirs=(trusted,))  # the source check says no ...
    with pytest.raises(BadInput, match="symlink"):  # ... and the compile never copies its target
        compile_source(src, manifest, trusted_include_dirs=(trusted,))


def test_the_compile_jail_holds_only_the_toolchain_headers_and_work_dir(manifest, planted):
    from schedcp_mcp.sandbox import toolchain

    r = toolchain.run(["sh", "-c", f"ls /; cat {CANARY} /etc/passwd /proc/self/environ; ls /w | wc -l"])
    assert sorted(r.stdout.split()[:-1]) == ["bin", "dev", "lib", "lib64", "opt", "sbin", "tmp", "usr", "w"]
    assert r.stdout.split()[-1] == "1"  # no other job's work dir
    assert "No such file" in r.stderr and planted[0].decode() not in r.stdout


def test_compiler_output_is_capped_while_it_is_read(manifest):
    """A warning flood must not take the server's memory: 256 MiB of stderr against a 1 MiB cap.
    Compared with the same run printing 1 KiB, so that what the interpreter and its imports cost in
    this environment does not count (in the full suite that baseline was ~200 MiB, alone ~32)."""
    import os
    import subprocess
    import sys

    def peak(nbytes: int) -> tuple[int, int]:
        code = ("import resource; from schedcp_mcp.sandbox import toolchain; "
                f"r = toolchain.run(['sh', '-c', 'yes xxxxxxxxxxxxxxx | head -c {nbytes} >&2'], "
                "max_output_mb=1, timeout_s=120); "
                "print(len(r.stderr), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=os.environ.copy())
        kept, peak_mb = map(int, out.stdout.split())
        return kept, peak_mb

    kept, flood_mb = peak(256 << 20)
    assert kept == 1 << 20
    _, quiet_mb = peak(1024)
    assert flood_mb - quiet_mb < 64, f"peak RSS {flood_mb} MiB vs {quiet_mb} MiB: the output was held in memory"
