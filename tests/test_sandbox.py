"""The sandbox: image build, toolchain jail, VM runner + guest agent, and the guest loader.

Tests marked `image` (by hand, or through the `manifest`/`vm` fixtures) need the built image: its
toolchain jail, or the real sched_ext kernel booted under qemu; the others need neither."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from schedcp_mcp import config
from schedcp_mcp.errors import InfrastructureError
from schedcp_mcp.sandbox import cpio, image, toolchain
from schedcp_mcp.sandbox.vm import VM, GuestTimeout

BAD_SCHED = textwrap.dedent("""\
    #include <scx/common.bpf.h>
    char _license[] SEC("license") = "GPL";
    u64 counts[16];
    void BPF_STRUCT_OPS(bad_enqueue, struct task_struct *p, u64 enq_flags)
    {
    	u32 i = p->pid;
    	counts[i]++;
    	scx_bpf_dsq_insert(p, SCX_DSQ_GLOBAL, SCX_SLICE_DFL, enq_flags);
    }
    SCX_OPS_DEFINE(bad_ops, .enqueue = (void *)bad_enqueue, .name = "bad");
    """)


@pytest.fixture(scope="module")
def manifest() -> image.Manifest:
    return image.ensure()


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def compile_example(manifest: image.Manifest, name: str) -> bytes:
    """Compile one of the kernel's example schedulers unmodified, with tools/sched_ext/Makefile's flags."""
    src_dir = Path(manifest.paths.scx_examples_dir)
    files = {p.name: p.read_bytes() for p in src_dir.glob("*.h")}
    files[f"{name}.bpf.c"] = (src_dir / f"{name}.bpf.c").read_bytes()
    r = toolchain.run(["clang", *toolchain.bpf_cflags(), "-c", f"{name}.bpf.c", "-o", f"{name}.bpf.o"],
                      workdir_files=files, outputs=[f"{name}.bpf.o"], timeout_s=120)
    assert r.rc == 0, r.stderr
    return r.outputs[f"{name}.bpf.o"]


def compile_source(source: str, name: str = "t") -> bytes:
    r = toolchain.run(["clang", *toolchain.bpf_cflags(), "-c", f"{name}.bpf.c", "-o", f"{name}.bpf.o"],
                      workdir_files={f"{name}.bpf.c": source.encode()}, outputs=[f"{name}.bpf.o"], timeout_s=120)
    assert r.rc == 0, r.stderr
    return r.outputs[f"{name}.bpf.o"]


# ------------------------------------------------------------------ image


def test_manifest_describes_a_sched_ext_kernel_and_a_new_enough_toolchain(manifest):
    assert manifest.sched_ext
    assert "CONFIG_SCHED_CLASS_EXT=y" in Path(manifest.paths.kernel_config).read_text()
    assert manifest.kernel_version.endswith("cloud-amd64")
    for p in manifest.paths.model_dump().values():
        assert Path(p).exists(), p
    assert Path(manifest.paths.vmlinux).read_bytes()[:4] == b"\x7fELF"
    assert Path(manifest.paths.vmlinux_btf).read_bytes()[:2] == b"\x9f\xeb"  # BTF magic, little endian
    vh = Path(manifest.paths.vmlinux_h).read_text()
    assert "struct sched_ext_ops {" in vh and "scx_bpf_dsq_insert" in vh
    assert _version(manifest.toolchain.clang) >= (17,)
    assert _version(manifest.toolchain.libbpf) >= (1, 2)
    assert _version(manifest.toolchain.bpftool) >= (7, 4)
    assert (Path(manifest.paths.scx_examples_dir) / "scx_simple.bpf.c").exists()
    assert len(manifest.build_id) == 16
    # the verify image stays small: it decides the cold verify time
    assert manifest.sizes["initramfs"] < 8 << 20
    assert manifest.sizes["initramfs_full"] > manifest.sizes["initramfs"]


def test_include_dir_holds_only_the_allowlisted_headers(manifest):
    root = Path(manifest.paths.rootfs) / image.INCLUDE_ROOT.lstrip("/")
    top = sorted(p.name for p in root.iterdir())
    assert top == ["asm-generic", "bpf", "bpf-compat", "scx", "vmlinux.h", "vmlinux.h.pch"]
    assert image.PCH == f"{image.INCLUDE_ROOT}/vmlinux.h.pch"  # vmlinux.h precompiled, nothing more
    assert sorted(p.name for p in (root / "asm-generic").iterdir()) == ["errno-base.h", "errno.h"]
    assert all(p.suffix == ".h" for p in (root / "bpf").iterdir())
    assert manifest.toolchain.include_dirs == image.INCLUDE_DIRS


def test_a_second_build_with_nothing_changed_does_nothing(manifest):
    if manifest.sources_sha != image.sources_sha():
        # this checkout's guest sources differ from the image's: a build here would rebuild a
        # (possibly shared) image, which is `schedcp sandbox build`'s job, not a fast test's
        pytest.skip("the sandbox image was built from other guest sources; run `schedcp sandbox build`")
    before = {k: Path(v).stat().st_mtime_ns for k, v in manifest.paths.model_dump().items()}
    steps: list[str] = []
    t0 = time.monotonic()
    again = image.build(progress=lambda msg, frac: steps.append(msg))
    assert time.monotonic() - t0 < 5
    assert again.build_id == manifest.build_id
    assert again.built_at == manifest.built_at  # the manifest itself was not rewritten
    assert steps[-1] == "sandbox image is up to date"
    after = {k: Path(v).stat().st_mtime_ns for k, v in again.paths.model_dump().items()}
    assert after == before


class _Stop(Exception):
    pass


def _fake_build(seen: list[dict]):
    """A FAKE build (for what a build reads, and when; no download): its first step notes which steps
    the build believes finished, and stops it there."""
    def first_step(b, refresh):
        seen.append(dict(b.steps.done))
        raise _Stop
    return first_step


def _fake_image(sd: Path) -> image.Manifest:
    """What another command's finished build leaves: a manifest and the files ensure() looks at (FAKE)."""
    files = {"initramfs": sd / "guest/initramfs.cpio.gz", "rootfs": sd / "rootfs",
             "vmlinux_btf": sd / "kernel/vmlinux.btf"}
    for p in (files["initramfs"], files["rootfs"] / "usr/bin/clang", files["vmlinux_btf"]):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"fake")
    paths = {f: str(files.get(f, sd / f)) for f in image.Paths.model_fields}
    m = image.Manifest(built_at="now", sandbox_dir=str(sd), kernel_version="7.0-fake", kernel_package="fake",
                       sched_ext=True, packages={}, paths=image.Paths(**paths), sizes={}, hashes={},
                       toolchain=image.Toolchain(clang="", bpftool="", libbpf="", include_dirs=[], cflags=[]),
                       build_id="fake-build-id", sources_sha=image.sources_sha())
    image._write_manifest(m)
    return m


def _while_another_builds(sd: Path, call, finish) -> list:
    """Run `call` in a thread while this one holds the build lock (another command building), then
    `finish` (what that build leaves) and let go. What `call` returned or raised."""
    import threading

    out: list = []

    def go():
        try:
            out.append(call())
        except _Stop as e:
            out.append(e)

    with image._BuildLock(sd):
        t = threading.Thread(target=go)
        t.start()
        time.sleep(0.5)  # it is waiting for the lock
        finish()
    t.join(20)
    return out


def test_a_build_that_waited_for_another_decides_from_the_steps_that_one_finished(monkeypatch):
    """Two commands in a fresh home: the second build read steps.json before it waited (nothing
    done), redid every step and deleted kernel/ under the first command's verify ("cannot read
    kernel BTF ... vmlinux.btf: No such file")."""
    seen: list[dict] = []
    monkeypatch.setattr(image, "_resolve", _fake_build(seen))
    sd = config.sandbox_dir()
    _while_another_builds(sd, image.build,
                          lambda: (sd / "steps.json").write_text(json.dumps({"kernel": "the first build's"})))
    assert seen == [{"kernel": "the first build's"}]


def test_a_command_that_finds_the_image_being_built_waits_and_uses_it_without_building(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(image, "_resolve", _fake_build(seen))
    sd = config.sandbox_dir()
    built: list[image.Manifest] = []
    got = _while_another_builds(sd, image.ensure, lambda: built.append(_fake_image(sd)))
    assert [getattr(m, "build_id", m) for m in got] == ["fake-build-id"] and seen == []  # no step ran


def test_cpio_is_deterministic_and_well_formed():
    c = cpio.Cpio()
    c.file("usr/bin/x", b"abc", 0o755)
    c.symlink("lib", "usr/lib")
    c.chardev("dev/console", 5, 1)
    data = c.bytes()
    assert data == c.bytes()
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data and len(data) % 4 == 0
    names = re.findall(rb"070701[0-9a-f]{104}([^\0]+)\0", data)
    assert names == [b"dev", b"dev/console", b"lib", b"usr", b"usr/bin", b"usr/bin/x", b"TRAILER!!!"]


# ------------------------------------------------------------------ toolchain


def test_toolchain_compiles_the_kernels_scx_simple(manifest):
    obj = compile_example(manifest, "scx_simple")
    assert obj[:4] == b"\x7fELF"
    assert b".struct_ops.link" in obj


def test_toolchain_cannot_read_a_host_file(tmp_path, manifest):
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-4711\n")
    r = toolchain.run(["cat", str(secret)], timeout_s=20)
    assert r.rc != 0 and "host-secret" not in r.stdout
    # nor through the preprocessor
    src = f'#include "{secret}"\n'
    r = toolchain.run(["clang", "-nostdinc", "-E", "a.c"], workdir_files={"a.c": src.encode()}, timeout_s=20)
    assert r.rc != 0 and "host-secret" not in r.stdout
    assert "not found" in r.stderr


def test_toolchain_runs_unprivileged_and_without_network(manifest):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        r = toolchain.run(["bash", "-c", f"id -u; exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"],
                          timeout_s=20)
    finally:
        srv.close()
    assert "connected" not in r.stdout
    if os.geteuid() == 0:
        assert r.stdout.split()[0] == str(toolchain.JAIL_ID) != "65534"  # its own uid, not nobody's


def test_toolchain_timeout_kills_the_command(manifest):
    t0 = time.monotonic()
    r = toolchain.run(["sh", "-c", "pwd; sleep 60"], timeout_s=1)
    assert r.timed_out and time.monotonic() - t0 < 10
    workdir = r.stdout.strip()
    assert workdir.startswith(f"/{toolchain.WORK_ROOT}/")
    assert not (Path(manifest.paths.rootfs) / workdir.lstrip("/")).exists()  # the work dir was removed


# ------------------------------------------------------------------ VM


@pytest.mark.image
def test_vm_boots_runs_commands_and_is_gone_after_close(manifest):
    with VM() as v:
        assert v.kernel_version == manifest.kernel_version
        r = v.run("cat in.txt; echo err >&2; mkdir -p d; echo made > d/out; exit 3",
                  files={"in.txt": b"hello\n"}, outputs=["d/out", "missing"], timeout_s=30)
        assert (r.rc, r.stdout, r.stderr) == (3, "hello\n", "err\n")
        assert r.outputs == {"d/out": b"made\n"}
        assert v.run("cat /sys/kernel/sched_ext/state").stdout.strip() == "disabled"
        pid, d = v.pid, v.dir
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not d.exists()


@pytest.mark.image
def test_a_hung_guest_command_times_out_and_the_vm_is_killed(manifest):
    v = VM().start()
    pid = v.pid
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout):
        v.run("sleep 600", timeout_s=2)
    assert time.monotonic() - t0 < 15
    assert not v.alive
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.image
@pytest.mark.parametrize("name,ops", [("scx_simple", "simple"), ("scx_central", "central")])
def test_loader_verifies_the_kernels_example_schedulers(vm, manifest, name, ops):
    obj = compile_example(manifest, name)
    r = vm.run(f"schedcp-loader --verify {name}.bpf.o", files={f"{name}.bpf.o": obj}, timeout_s=60)
    out = json.loads(r.stdout)
    assert r.rc == 0, out["error"]
    assert out["ok"] and out["stage"] == "done"
    assert out["sched_ext"] == {"state_attached": "enabled", "root_ops": ops, "state_final": "disabled"}
    assert out["ops_name"] == ops
    assert all(p["loaded"] and p["verified_insns"] > 0 for p in out["programs"])
    assert out["enums_set"]["SCX_DSQ_GLOBAL"] != 0  # SCX_ENUM_INIT happened
    assert out["uei"]["kind_name"] == "SCX_EXIT_UNREG"


@pytest.mark.image
def test_scx_simple_runs_under_load_until_the_duration_ends(vm, manifest):
    obj = compile_example(manifest, "scx_simple")
    script = """
for i in 1 2 3 4; do (while :; do :; done) & done
schedcp-loader --run --duration 3 --param fifo_sched=true s.o > out.json
rc=$?
kill $(jobs -p) 2>/dev/null
cat out.json
exit $rc
"""
    r = vm.run(script, files={"s.o": obj}, timeout_s=90)
    out = json.loads(r.stdout)
    assert r.rc == 0, (out["error"], out["uei"], r.stderr[-2000:])
    assert out["stop_reason"] == "duration" and out["run_s"] >= 3
    assert out["params"] == {"fifo_sched": "true"}
    assert out["sched_ext"]["state_attached"] == "enabled"


@pytest.mark.image
def test_a_verifier_rejected_program_returns_the_kernels_log(vm):
    obj = compile_source(BAD_SCHED, "bad")
    r = vm.run("schedcp-loader --verify bad.bpf.o", files={"bad.bpf.o": obj}, timeout_s=60)
    out = json.loads(r.stdout)
    assert r.rc == 1 and not out["ok"] and out["stage"] == "load"
    assert "unbounded memory access" in out["log"]
    assert "counts[i]++; @ bad.bpf.c:7" in out["log"]  # the offending source line
    assert "bad_enqueue" in out["log"]


@pytest.mark.image
def test_loader_type_checks_parameters(vm, manifest):
    obj = compile_example(manifest, "scx_simple")
    for arg, msg in [("nope=1", "unknown parameter nope"), ("fifo_sched=maybe", "is a bool")]:
        r = vm.run(f"schedcp-loader --verify s.o --param {arg}", files={"s.o": obj}, timeout_s=60)
        out = json.loads(r.stdout)
        assert r.rc == 2 and out["stage"] == "params" and msg in out["error"]


@pytest.mark.image
def test_full_image_has_the_workload_tools(manifest):
    with VM(full=True) as v:
        r = v.run("stress-ng --version && hackbench -l 10 -g 1 >/dev/null && perf bench sched pipe -l 100 "
                  ">/dev/null && bpftool version >/dev/null && echo tools-ok", timeout_s=120)
        assert r.rc == 0, r.stderr
        assert "tools-ok" in r.stdout


def test_full_image_carries_the_compile_workloads_tree_and_only_the_compiler_files_it_uses(manifest):
    import gzip

    names, raw, i = set(), gzip.decompress(Path(manifest.paths.initramfs_full).read_bytes()), 0
    while raw[i:i + 6] == b"070701":  # newc entries, then the next appended archive after a trailer
        size, nlen = int(raw[i + 54:i + 62], 16), int(raw[i + 94:i + 102], 16)
        names.add(raw[i + 110:i + 109 + nlen].decode())
        i += 110 + nlen
        i += (-i % 4) + size
        i += -i % 4
        while raw[i:i + 1] == b"\0":  # gzip members' padding
            i += 1
    src = image.COMPILE_GUEST_DIR.lstrip("/")
    assert {f"{src}/Makefile", f"{src}/libfdt/fdt_wip.c", f"{src}/libfdt/libfdt.h"} <= names
    assert {"usr/libexec/gcc/x86_64-linux-gnu/14/cc1", "usr/bin/x86_64-linux-gnu-as", "usr/bin/redis-server",
            "usr/bin/redis-benchmark", "usr/bin/make", "usr/include/stdio.h"} <= names
    # headers the build never includes stay out (the whole of /usr/include is ~28 MB)
    assert "usr/include/bpf/libbpf.h" not in names and "usr/include/zlib.h" not in names


@pytest.mark.image
def test_named_vm_is_shared_between_processes_and_stops(manifest):
    name = f"test-{os.getpid()}"
    try:
        v = VM.start_named(name, full=False, idle_timeout_s=300)
        v.run("echo shared > /run/mark")
        v.detach()
        assert VM.named_status(name) is not None
        code = (f"from schedcp_mcp.sandbox.vm import VM; v = VM.attach({name!r}); "
                "print(v.run('cat /run/mark').stdout.strip()); v.detach()")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parent.parent)
        assert p.stdout.strip() == "shared", p.stderr
    finally:
        assert VM.stop_named(name)
        shutil.rmtree(config.home() / "vms" / name, ignore_errors=True)
    assert VM.named_status(name) is None
    with pytest.raises(InfrastructureError):
        VM.attach(name)


@pytest.mark.image
def test_a_forgotten_named_vm_powers_itself_off_when_idle(manifest):
    name = f"idle-{os.getpid()}"
    try:
        v = VM.start_named(name, full=False, idle_timeout_s=3)
        pid = v.pid
        v.detach()
        deadline = time.monotonic() + 60
        while VM.named_status(name) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert VM.named_status(name) is None
        assert not Path(f"/proc/{pid}/cmdline").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        VM.stop_named(name)
        shutil.rmtree(config.home() / "vms" / name, ignore_errors=True)


@pytest.mark.image
def test_an_ephemeral_vm_does_not_outlive_a_killed_owner(manifest):
    code = ("import os, sys; from schedcp_mcp.sandbox.vm import VM; v = VM().start(); "
            "print(v.pid, flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        pid = int(owner.stdout.readline())
        assert b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
        owner.kill()  # no atexit, no finalizer
        owner.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}/cmdline").exists() \
                and b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}/cmdline").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        owner.kill()
