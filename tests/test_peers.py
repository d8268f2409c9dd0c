"""Scheduler programs as candidates and peers (issue #26), without a VM: the ELF inspection that names a
program's libraries before anything runs, the guest's library check (run here by /bin/sh, the same
script), what the start/stop steps print and how it is read, tokens bound to a program's bytes and
arguments, the kernel examples built with their Makefile in the toolchain jail (needs the image, no VM),
and the CLI's answers to bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from schedcp_mcp.errors import BadInput
from schedcp_mcp.sandbox import program


def _sh(script: str) -> str:
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30).stdout


# --- the program's ELF and its libraries ---------------------------------------------------------

def test_a_dynamic_executable_names_its_interpreter_and_libraries():
    info = program.inspect_elf(Path("/bin/ls").read_bytes(), "ls")
    assert info.interpreter and info.interpreter.startswith("/lib")
    assert "libc.so.6" in info.needed
    assert not info.static


@pytest.mark.parametrize("data,words", [
    (b"", "empty"),
    (b"#!/bin/sh\necho hi\n", "not an ELF executable"),
    (b"\x7fELF" + b"\0" * 60, "not a readable ELF"),
])
def test_what_is_not_an_x86_64_executable_is_refused_before_anything_runs(data, words):
    with pytest.raises(BadInput, match=words):
        program.inspect_elf(data, "cand")


def test_the_library_check_names_exactly_the_missing_ones():
    info = program.ElfInfo(interpreter="/bin/sh", needed=["libc.so.6", "libschedcp-nonexistent.so.9"])
    out = _sh(program.libraries_script(info))
    assert program.parse_missing(out) == ["libschedcp-nonexistent.so.9"]
    assert "@@LIBSDONE" in out


def test_a_missing_interpreter_is_named_too():
    info = program.ElfInfo(interpreter="/lib64/ld-schedcp-none.so.2", needed=[])
    assert program.parse_missing(_sh(program.libraries_script(info))) == ["/lib64/ld-schedcp-none.so.2"]


# --- reading what the start and stop steps print -------------------------------------------------

def test_a_program_that_attached_is_running_with_its_ops_and_output():
    out = "@@RUNNING simple\n@@OUT\nlocal=3 global=0\n@@ERR\n\n@@ERREND\n"
    s = program.parse_start(out)
    assert s.running and s.ops == "simple" and s.stdout == "local=3 global=0"


def test_a_program_that_exited_says_its_status_and_last_words():
    out = ("@@EXITED 1\n@@OUT\n\n@@ERR\nlibbpf: prog 'simple_enqueue': BPF program load failed: -EACCES\n"
           "-- BEGIN PROG LOAD LOG --\n0: R1=ctx() R10=fp0\ninvalid mem access 'scalar'\n-- END PROG LOAD LOG --\n"
           "@@ERREND\n")
    s = program.parse_start(out)
    assert not s.running and s.rc == 1
    assert "exited (status 1) before sched_ext was enabled" in s.error
    assert program.verifier_log(s.stderr).strip().endswith("invalid mem access 'scalar'")


def test_a_verifier_log_cut_at_its_start_is_still_the_verifier_log():
    """scx_qmap of the 7.2 kernel, built with clang 19, as the sandbox kernel's verifier refused it: the
    log is longer than the kept tail, so only its end and END marker are left."""
    tail = ("97: (7b) *(u64 *)(r7 +16) = r1\nR7 invalid mem access 'scalar'\n-- END PROG LOAD LOG --\n"
            "libbpf: prog 'qmap_dequeue': failed to load: -13\n")
    assert program.verifier_log(tail).endswith("R7 invalid mem access 'scalar'\n")
    assert program.verifier_log("no log here") == ""


def test_a_program_alive_but_never_attached_is_not_running():
    s = program.parse_start("@@NOTENABLED disabled\n@@OUT\n\n@@ERR\n\n@@ERREND\n")
    assert not s.running and "never attached" in s.error


def test_stop_reads_how_the_program_went():
    s = program.parse_stop("@@STOPPED disabled sysrq 137\n@@OUT\nx\n@@ERR\nEXIT: y\n@@ERREND\n")
    assert (s.state, s.how, s.rc, s.stderr) == ("disabled", "sysrq", 137, "EXIT: y")


def test_the_stop_step_is_sigint_then_the_kernels_own_disable():
    script = program.stop_script(program.scheduler.Files("/run/x", "prog"))
    assert script.index("kill -INT") < script.index("echo S >/proc/sysrq-trigger") < script.index("kill -KILL")


def test_the_launcher_seam_ships_the_program_not_an_object():
    la = program.ProgramLauncher(b"\x7fELF...", ["-f"])
    assert la.files() == {"prog": b"\x7fELF..."}
    assert "/run/l2/prog -f" in la.start("/run/l2", program.scheduler.Files("/run/l2", "loader.1"))
    ob = program.ObjectLauncher(b"obj", {"slice_ns": "1"}, 3000)
    assert ob.files() == {"obj.bpf.o": b"obj"}
    assert "--timeout-ms 3000" in ob.start("/run/l2", program.scheduler.Files("/run/l2", "loader.1"))


# --- tokens bind the program's bytes and its arguments -------------------------------------------

def _program_report(data: bytes, args: list[str]):
    from schedcp_mcp import reports
    from schedcp_mcp.validate.models import Layer2Result
    from schedcp_mcp.verify import program as vprog
    from schedcp_mcp.verify.models import Layer1Report

    sha, path = vprog.save_program(data)
    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256=sha, object_sha256=sha, object_path=path,
                      program_args=args, program_name="p", ops_name="simple")
    r = reports.new_report(l1, policy=None, params={})
    # layer 2's verdict is what the kernel said in a VM (tests/test_program_vm.py); here only the binding
    # is under test, so the report is marked as having passed — a stand-in, named as such
    r.layer2 = Layer2Result(passed=True, ops_name="simple")
    reports.save(r)
    return r


def test_arguments_change_the_artifact_a_token_binds():
    from schedcp_mcp.reports import artifact_hash

    sha = hashlib.sha256(b"x").hexdigest()
    assert artifact_hash(sha, {}, ["-f"]) != artifact_hash(sha, {}, []) != artifact_hash(sha, {})
    assert artifact_hash(sha, {}) == artifact_hash(sha, {}, None)  # a BPF object's hash is unchanged


def test_a_token_for_a_program_refuses_other_bytes():
    from schedcp_mcp.deploy import tokens

    r = _program_report(b"\x7fELF-program-bytes", ["-f"])
    tok = tokens.issue(r.id, "sandbox")
    tokens.check(tok.token, "sandbox", spend=False)  # as validated: accepted
    Path(r.object_path).write_bytes(b"\x7fELF-other-bytes")
    with pytest.raises(tokens.TokenRefused, match="differs from the validated artifact"):
        tokens.check(tok.token, "sandbox", spend=False)


def test_tables_name_a_program_report_by_its_program_not_as_source():
    from schedcp_mcp.reports import deployed_what, what

    r = _program_report(b"\x7fELF-named", [])
    assert what(r) == f"program {r.layer1.program_name}" and r.layer1.program_name
    assert deployed_what(None, r.id) == what(r) and deployed_what("fifo", r.id) == "fifo"
    assert what(None) == "source" and deployed_what(None, "rep-gone") == "source"


# --- peers: the kernel's examples built with their Makefile --------------------------------------

def test_the_makefile_says_which_examples_this_kernel_has():
    from schedcp_mcp.sandbox import peers

    mk = "all: x\nc-sched-targets = scx_simple scx_cpu0 scx_qmap\n"
    assert peers._makefile_targets(mk) == ["scx_simple", "scx_cpu0", "scx_qmap"]


def test_a_failed_make_is_summed_up_by_its_error_lines():
    from schedcp_mcp.sandbox import peers

    log = ("  CLNG-BPF scx_x.bpf.o\nscx_x.bpf.c:12:5: error: use of undeclared identifier 'foo'\n"
           "make: *** [Makefile:170: x] Error 1\n")
    why = peers._why(log)
    assert "undeclared identifier 'foo'" in why and "Error 1" in why


def test_the_shims_give_the_makefile_what_it_includes(tmp_path, manifest):
    """The kernel's Makefile parses with the shims in place of tools/build and tools/scripts (make -n:
    nothing is built), and the commands it would run use the packaged bpftool and libbpf."""
    from schedcp_mcp.sandbox import peers

    if shutil.which("make") is None:
        pytest.skip("no make on this host")
    src = tmp_path / "tools/sched_ext"
    shutil.copytree(_kernel_scx_dir() / "include", src / "include")
    (src / "Makefile").write_text((_kernel_scx_dir() / "Makefile").read_text())
    for rel, text in peers.SHIMS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (src / "scx_simple.c").write_text("")
    (src / "scx_simple.bpf.c").write_text("")
    (tmp_path / "vmlinux.h").write_text("")
    # stand-ins for the rootfs's packaged bpftool and libbpf.a (make -n only needs them to exist)
    (tmp_path / "bpftool-packaged").write_text("")
    (tmp_path / "libbpf-packaged.a").write_text("")
    r = subprocess.run(["make", "-n", "-C", str(src), f"O={tmp_path}/out", f"BPFOBJ={tmp_path}/libbpf-packaged.a",
                        f"BPFTOOL={tmp_path}/bpftool-packaged", f"VMLINUX_H={tmp_path}/vmlinux.h",
                        f"VMLINUX_BTF={tmp_path}/vmlinux.h", "scx_simple"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bpftool-packaged gen skeleton" in r.stdout
    assert "libbpf-packaged.a -lelf -lz -lpthread" in r.stdout


def _kernel_scx_dir() -> Path:
    """The kernel's tools/sched_ext (it comes with the image: use the `manifest` fixture)."""
    from schedcp_mcp.sandbox import image

    return Path(image.load_manifest().paths.scx_dir)


def test_peers_build_makes_the_kernel_examples_and_caches_them(manifest):
    """The real build (the toolchain jail, no VM): at least five programs, each an x86-64 executable
    linking libbpf statically; scx_prev is not in this kernel and says so; a second build is the cache."""
    from schedcp_mcp.sandbox import peers

    m = peers.build()
    built = {p.name: p for p in m.built()}
    assert len(built) >= 5, [(p.name, p.why) for p in m.peers]
    info = program.inspect_elf(Path(built["scx_simple"].path).read_bytes())
    assert "libbpf.so.1" not in info.needed and "libelf.so.1" in info.needed
    prev = next(p for p in m.peers if p.name == "scx_prev")
    assert prev.built or "not in this kernel" in prev.why
    again = peers.build()
    assert again.key == m.key and again.built_at == m.built_at


# --- the CLI's answers to bad input ---------------------------------------------------------------

def test_cli_refuses_a_data_file_as_a_program(tmp_path):
    from schedcp_mcp.cli import main

    f = tmp_path / "notes.txt"
    f.write_text("hello")
    r = CliRunner().invoke(main, ["verify", "--program", str(f)])
    assert r.exit_code == 2 and "not an ELF executable" in r.output
    assert "Traceback" not in r.output


def test_cli_arguments_after_dashes_need_a_program(tmp_path):
    from schedcp_mcp.cli import main

    f = tmp_path / "a.bpf.c"
    f.write_text("x")
    r = CliRunner().invoke(main, ["verify", str(f), "--", "-v"])
    assert r.exit_code == 2 and "need --program" in r.output


def test_cli_program_with_a_param_is_refused(tmp_path):
    from schedcp_mcp.cli import main

    r = CliRunner().invoke(main, ["verify", "--program", "/bin/ls", "--param", "a=1"])
    assert r.exit_code == 2 and "--program takes its arguments after" in r.output


def test_cli_unknown_peer_says_what_is_known(manifest):  # the known ones: the image's kernel Makefile
    from schedcp_mcp.cli import main

    r = CliRunner().invoke(main, ["peers", "build", "--only", "scx_nope", "--json"])
    assert r.exit_code == 2 and "unknown peer" in r.output and "scx_simple" in r.output
    assert json.loads(r.output)["error"] if r.output.lstrip().startswith("{") else True
