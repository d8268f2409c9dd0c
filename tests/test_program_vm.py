"""Scheduler programs in the real sandbox kernel (issue #26): the kernel's own scx_simple, built by its
Makefile (`schedcp peers build`), attaches and is stopped by SIGINT; a program the guest lacks a library
for is refused naming it, before anything runs; one that exits before attaching is rejected with its
own words; one that does not exit on SIGINT is stopped by the kernel's own disable (SysRq-S); a program
goes verify → token → deploy to the staging VM → rollback, and the host never runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import home_env
from schedcp_mcp.sandbox import peers, program, scheduler
from schedcp_mcp.sandbox.vm import VM
from schedcp_mcp.verify.program import verify_program

pytestmark = pytest.mark.image


@pytest.fixture(scope="module")
def simple(manifest) -> bytes:
    return Path(peers.built_peers(["scx_simple"])[0].path).read_bytes()


@pytest.fixture(scope="module")
def full_vm(manifest):
    with VM(full=True) as v:
        yield v


def test_the_kernels_scx_simple_attaches_and_stops_on_sigint(simple, full_vm):
    r = verify_program(simple, [], name="scx_simple", vm=full_vm)
    assert (r.verdict, r.stage, r.ops_name) == ("accepted", "done", "simple"), r.errors
    assert "EXIT: unregistered from user space" in r.program_stderr  # its own exit line, after SIGINT
    assert not r.warnings  # it went on SIGINT: no SysRq needed
    assert r.program_args == [] and "libelf.so.1" in r.libraries


def test_a_program_that_exits_before_attaching_is_rejected_in_its_own_words(simple, full_vm):
    r = verify_program(simple, ["--no-such-option"], name="scx_simple", vm=full_vm)
    assert (r.verdict, r.stage) == ("rejected", "attach")
    assert "before sched_ext was enabled" in r.errors[0].message
    assert "Usage" in r.program_stderr or "usage" in r.program_stderr.lower()


def test_a_missing_shared_library_is_named_before_anything_runs(manifest, full_vm):
    """A program linked against the shared libbpf (which the guest does not carry), built for real in
    the toolchain jail."""
    from schedcp_mcp.sandbox import toolchain

    src = b"#include <bpf/libbpf.h>\nint main(void) { return libbpf_major_version() == 1 ? 0 : 1; }\n"
    res = toolchain.run(["gcc", "-O2", "-o", "p", "p.c", "-lbpf"], workdir_files={"p.c": src}, outputs=["p"])
    assert res.rc == 0, res.stderr
    r = verify_program(res.outputs["p"], [], name="p", vm=full_vm)
    assert (r.verdict, r.stage) == ("rejected", "libraries")
    assert "libbpf.so.1" in r.errors[0].message and "nothing was run" in r.errors[0].message
    assert r.durations.get("attach") is None


def test_a_program_that_ignores_sigint_is_stopped_by_the_kernels_own_disable(simple, full_vm):
    """The program hangs (SIGSTOP: SIGINT stays pending): the stop step uses SysRq-S, the kernel
    disables the scheduler, the program is killed."""
    f = scheduler.Files("/run/t-sysrq", "prog")
    out = full_vm.run(scheduler.PRELUDE + "mkdir -p /run/t-sysrq && cp prog /run/t-sysrq/prog && chmod +x /run/t-sysrq/prog\n"
                      + program.start_script("/run/t-sysrq/prog", [], f), files={"prog": simple}, timeout_s=90).stdout
    assert program.parse_start(out).running, out
    full_vm.run(f"kill -STOP $(cat {f.pid})", timeout_s=10)
    stop = program.parse_stop(full_vm.run(scheduler.PRELUDE + program.stop_script(f), timeout_s=90).stdout)
    assert (stop.how, stop.state) == ("sysrq", "disabled")
    klog = full_vm.run("dmesg | grep -i 'sched_ext' | tail -n 3", timeout_s=10).stdout
    assert "sysrq" in klog.lower(), klog


def test_a_program_goes_token_deploy_rollback_in_the_staging_vm(simple, tmp_path_factory):
    """Real layer 1 and a real staging VM; layer 2's pass is a stand-in here (a validation of
    scx_simple takes a minute and fails the starvation gate: `schedcp bench peers` runs it for real),
    so the report is marked passed — named as such. The token binds the bytes and the arguments."""
    from schedcp_mcp import reports, store
    from schedcp_mcp.deploy import deployments, tokens
    from schedcp_mcp.deploy.targets import SandboxTarget
    from schedcp_mcp.validate.models import Layer2Result
    from schedcp_mcp.verify import program as vprog

    with home_env(tmp_path_factory.mktemp("proghome")):
        try:
            r = reports.new_report(verify_program(simple, [], name="scx_simple"), policy=None, params={})
            assert r.passed_layer1, r.layer1.errors
            r.layer2 = Layer2Result(passed=True, ops_name="simple")  # the stand-in
            reports.save(r)
            # a report for other arguments binds another artifact: its token does not open this one
            assert r.artifact_sha256 != reports.artifact_hash(vprog.save_program(simple)[0], {}, ["-f"])
            d = deployments.deploy(tokens.issue(r.id).token, "sandbox", start_monitor=False)
            t = SandboxTarget()
            st = t.state()
            assert d.status == "active" and st.enabled and st.ops == "simple"
            ended = deployments.rollback(d.id, reason="test")
            assert ended.status == "rolled_back"
            assert not t.state().enabled
            actions = [a["action"] for a in store.audit_log()]
            assert "deploy" in actions and "rollback" in actions
        finally:
            VM.stop_named("staging")
