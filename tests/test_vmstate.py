"""The verify fast path: a sandbox guest restored from a saved state of a booted, idle guest.

Without a mark: the state file's header and the refusal reasons (no VM). `@pytest.mark.image`: the
real kernel verifier in restored guests gives what it gives in booted ones, a state saved for
another image build or another machine is refused (with the reason) and the VM boots, two
concurrent first verifies leave one good state, and no restore leaves a qemu behind. Every VM test
keeps its states in its own directory ($SCHEDCP_VMSTATE_DIR), never beside the shared image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from schedcp_mcp.sandbox import vmstate
from schedcp_mcp.sandbox.scheduler import parse_verify

FIXTURES = Path(__file__).parent / "fixtures" / "bpf"
KEY = {"build_id": "17a405163d1754e3", "qemu": "QEMU emulator version 7.2.22", "accel": "tcg", "cpus": 2,
       "mem_mb": 1536, "host_cpu": "", "machine": ["-smp", "2", "-append", "console=ttyS0 quiet"]}


def _state_file(path: Path, key: dict, body: bytes = b"QEVM\0\0\0\3 stream") -> Path:
    path.write_bytes(vmstate._header(key) + body)
    return path


# --- the state file and its key (no VM) ----------------------------------------------------------

def test_a_state_with_the_same_key_opens_at_its_migration_stream(tmp_path):
    fd, saved, why = vmstate.open_state(_state_file(tmp_path / "s.vmstate", KEY), KEY)
    try:
        assert why == "" and saved["build_id"] == KEY["build_id"]
        assert os.read(fd, 4) == b"QEVM"  # qemu reads on from here
    finally:
        os.close(fd)


@pytest.mark.parametrize("field, value, words", [
    ("build_id", "0123456789abcdef", "image build differs: saved '17a405163d1754e3', this VM '0123456789abcdef'"),
    ("qemu", "QEMU emulator version 9.2.0", "qemu version differs"),
    ("cpus", 4, "CPU count differs: saved 2, this VM 4"),
    ("mem_mb", 2048, "memory (MiB) differs: saved 1536, this VM 2048"),
    ("machine", ["-smp", "2", "-append", "console=ttyS0 quiet schedcp.x=1"],
     "machine arguments differ at argument 3: saved 'console=ttyS0 quiet', this VM 'console=ttyS0 quiet schedcp.x=1'"),
])
def test_a_state_saved_with_another_key_is_refused_naming_what_differs(tmp_path, field, value, words):
    fd, _, why = vmstate.open_state(_state_file(tmp_path / "s.vmstate", KEY), {**KEY, field: value})
    assert fd is None and "was refused" in why and words in why


def test_a_missing_torn_or_foreign_file_is_not_restored(tmp_path):
    assert "no saved VM state" in vmstate.open_state(tmp_path / "none.vmstate", KEY)[2]
    (tmp_path / "torn.vmstate").write_bytes(vmstate._header(KEY)[:100])
    assert "unreadable" in vmstate.open_state(tmp_path / "torn.vmstate", KEY)[2]
    assert "holds no guest state" in vmstate.open_state(_state_file(tmp_path / "e.vmstate", KEY, b""), KEY)[2]
    (tmp_path / "x.vmstate").write_bytes(b"\0" * 8192)
    assert "bad header" in vmstate.open_state(tmp_path / "x.vmstate", KEY)[2]


def test_the_kernel_lines_of_a_verify_are_those_after_its_marker():
    out = ('{"ok": true}\n@@K schedcp-verify 7-ab\n[1.0] sched_ext: an earlier load\n'
           '[2.0] schedcp-verify 7-ab\n[2.1] unrelated\n[2.2] sched_ext: BPF scheduler "x" enabled\n')
    assert parse_verify(out) == ('{"ok": true}\n', ['[2.2] sched_ext: BPF scheduler "x" enabled'])
    assert parse_verify('{}\n@@K schedcp-verify 8-cd\n[1.0] sched_ext: not ours\n')[1] == []


# --- restored guests (real VMs, real kernel verifier) -------------------------------------------

def _qemu_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "qemu" in p.name()]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory, manifest):
    """A directory holding a state saved by a real boot (the first VM(restore=True) makes it)."""
    from conftest import env_set
    from schedcp_mcp.sandbox.vm import VM

    d = tmp_path_factory.mktemp("vmstate")
    with env_set("SCHEDCP_VMSTATE_DIR", d):
        with VM(restore=True) as vm:
            assert vm.boot_path == "boot" and "no saved VM state" in vm.restore_note
            assert "saved a new VM state" in vm.restore_note, vm.restore_note
        yield d


@pytest.fixture
def states(state_dir, monkeypatch) -> Path:
    monkeypatch.setenv("SCHEDCP_VMSTATE_DIR", str(state_dir))
    return state_dir


def _own_dir(states: Path, tmp_path: Path, monkeypatch) -> Path:
    """The saved state in a directory of this test's own (it may be replaced there). Hard links,
    not copies: a state file is never written in place, only replaced by a rename."""
    d = tmp_path / "vmstate"
    shutil.copytree(states, d, copy_function=os.link)
    monkeypatch.setenv("SCHEDCP_VMSTATE_DIR", str(d))
    return d


def _same(e) -> tuple:
    return (e.stage, e.code, e.program, e.insn, e.line, e.message)


def _log(text: str) -> str:
    """A verifier log with kernel addresses blanked: a map's address differs between any two loads."""
    return re.sub(r"0xffff[0-9a-f]{12}", "0xADDR", text)


@pytest.mark.image
def test_restored_and_booted_guests_give_the_same_verdict_and_verifier_log(states, manifest, monkeypatch):
    from schedcp_mcp.sandbox.vm import VM
    from schedcp_mcp.verify.pipeline import verify_source

    good, bad = (FIXTURES / "minimal.bpf.c").read_text(), (FIXTURES / "unbounded_index.bpf.c").read_text()
    with VM() as booted:  # the baseline: a normal boot
        assert booted.boot_path == "boot"
        by_boot = [verify_source(src, vm=booted, use_cache=False) for src in (good, bad)]
    monkeypatch.setenv("SCHEDCP_VM_RESTORE", "1")
    by_restore = [verify_source(src, use_cache=False) for src in (good, bad)]  # cold: one VM each
    for b, r in zip(by_boot, by_restore):
        assert "vm_restore" in r.durations and "vm_boot" not in r.durations, r.durations
        assert (r.verdict, r.stage) == (b.verdict, b.stage)
        assert [_same(e) for e in r.errors] == [_same(e) for e in b.errors]
        assert _log(r.verifier_log) == _log(b.verifier_log)
        assert r.object_sha256 == b.object_sha256
        assert [(p.name, p.verified_insns) for p in r.programs] == [(p.name, p.verified_insns) for p in b.programs]
    assert by_restore[0].verdict == "accepted" and by_restore[1].stage == "verifier"
    assert "processed" in by_restore[1].verifier_log  # the kernel's own log, not an empty match
    deadline = time.monotonic() + 10
    while _qemu_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _qemu_children(), "a restored VM outlived its verify"


@pytest.mark.image
def test_every_restore_starts_from_the_same_clean_guest(states):
    """Nothing a candidate leaves in the guest reaches the next one: each restore is the saved
    idle guest again (a security property as much as a reproducibility one)."""
    from schedcp_mcp.sandbox.vm import VM

    with VM(restore=True) as a:
        assert a.boot_path == "restore"
        r = a.run("echo planted >/run/leak; mkdir -p /sys/fs/bpf/x && echo ok; cat /proc/uptime; date +%s")
        assert r.ok and "ok" in r.stdout
        up_a = float(r.stdout.split()[1])
        assert abs(int(r.stdout.split()[-1]) - time.time()) < 30  # the wall clock was set
    with VM(restore=True) as b:
        r = b.run("ls /run/leak /sys/fs/bpf/x 2>&1; cat /proc/uptime")
        assert "No such file" in r.stdout and r.stdout.count("No such file") == 2
        assert float(r.stdout.split()[-2]) <= up_a + 5  # its clock starts where the save left it


@pytest.mark.image
def test_a_state_saved_for_another_image_build_is_refused_and_the_vm_boots(states, manifest, tmp_path,
                                                                            monkeypatch):
    from schedcp_mcp.sandbox.vm import VM

    d = _own_dir(states, tmp_path, monkeypatch)
    other = manifest.model_copy(update={"build_id": "0" * 16})
    real = d / f"{manifest.build_id}-small.vmstate"
    os.link(real, d / f"{other.build_id}-small.vmstate")  # where the other build would look
    with VM(restore=True, _manifest=other) as vm:
        assert vm.boot_path == "boot"
        assert f"image build differs: saved '{manifest.build_id}', this VM '{other.build_id}'" in vm.restore_note
        assert vm.run("echo ok").stdout.strip() == "ok"
    # the boot saved a state for its own build, and states of other builds of the image went
    assert vmstate.open_state(d / f"{other.build_id}-small.vmstate", VM(_manifest=other).state_key())[0] is not None
    assert not real.exists()


@pytest.mark.image
@pytest.mark.parametrize("kw, words", [
    ({"extra_cmdline": "schedcp.test=1"}, "machine arguments differ"),
    ({"cpus": 1}, "CPU count differs: saved 2, this VM 1"),
])
def test_a_state_saved_for_another_machine_is_refused_and_the_vm_boots(states, tmp_path, monkeypatch, kw, words):
    from schedcp_mcp.sandbox.vm import VM

    _own_dir(states, tmp_path, monkeypatch)
    with VM(restore=True, **kw) as vm:
        assert vm.boot_path == "boot" and words in vm.restore_note, vm.restore_note
        assert vm.run("nproc").stdout.strip() == str(kw.get("cpus", 2))


@pytest.mark.image
def test_two_concurrent_first_verifies_leave_one_good_state(manifest, tmp_path, monkeypatch):
    from schedcp_mcp.sandbox.vm import VM
    from schedcp_mcp.verify.pipeline import verify_source

    d = tmp_path / "vmstate"
    env = {**os.environ, "SCHEDCP_VMSTATE_DIR": str(d), "SCHEDCP_VM_RESTORE": "1"}
    code = ("import sys; from schedcp_mcp.verify.pipeline import verify_source; "
            f"r = verify_source(open({str(FIXTURES / 'minimal.bpf.c')!r}).read() + '/* ' + sys.argv[1] + ' */', "
            "use_cache=False); print(r.verdict, sorted(r.durations))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env={**env, "SCHEDCP_HOME": str(tmp_path / f"h{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("accepted"), err[-2000:]
    # both start before either has saved (a boot takes seconds), so normally both boot and save;
    # one that found the other's state already there restored from it
    assert sum("vm_state_save" in out for out, _ in outs) >= 1
    assert all("vm_state_save" in out or "vm_restore" in out for out, _ in outs)
    files = sorted(x.name for x in d.iterdir())
    assert files == [f"{manifest.build_id}-small.vmstate"], files  # one state, no temporary left over
    monkeypatch.setenv("SCHEDCP_VMSTATE_DIR", str(d))
    monkeypatch.setenv("SCHEDCP_VM_RESTORE", "1")
    r = verify_source((FIXTURES / "minimal.bpf.c").read_text(), use_cache=False)
    assert r.verdict == "accepted" and "vm_restore" in r.durations
    with VM(restore=True) as vm:
        assert vm.boot_path == "restore", vm.restore_note


@pytest.mark.image
def test_a_restored_vm_powers_off_when_its_owner_is_killed(states):
    """The restored guest is still an ephemeral one: SIGKILL its owner (no finalizer runs) and the
    guest sees its channel close and powers off; no qemu is left behind."""
    code = ("import sys, time; from schedcp_mcp.sandbox.vm import VM; vm = VM(restore=True).start(); "
            "print(vm.boot_path, vm.pid, flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        path, pid = owner.stdout.readline().split()
        assert path == "restore"
        qemu = psutil.Process(int(pid))
    finally:
        owner.kill()
        owner.wait()
    try:
        qemu.wait(timeout=20)
    except psutil.TimeoutExpired:
        qemu.kill()
        pytest.fail("the restored VM outlived its SIGKILLed owner")
