"""Layer 3: token refusals, deploy to the staging VM, monitor-driven rollback, watchdog detection,
status and audit. Real validations, a real staging VM, a real monitor process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import home_env
from schedcp_mcp import candidates, store
from schedcp_mcp.deploy import deployments, tokens
from schedcp_mcp.deploy.targets import SandboxTarget
from schedcp_mcp.errors import BadInput
from schedcp_mcp.observe.profile import Goal
from schedcp_mcp.reports import invalidate
from schedcp_mcp.sandbox.vm import VM

pytestmark = pytest.mark.vm
FIXTURES = Path(__file__).parent / "fixtures" / "bpf_deploy"
LENIENT = [Goal(metric="wall_time_s", direction="lower", target_ratio=2.0, why="test: correctness matters here")]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with home_env(tmp_path_factory.mktemp("deployhome")) as h:
        yield h
        VM.stop_named("staging")


@pytest.fixture(autouse=True)
def same_home(home, monkeypatch):
    monkeypatch.setenv("SCHEDCP_HOME", str(home))


@pytest.fixture(scope="module")
def fifo_report(home):
    r = candidates.validate(policy="fifo", workloads=["hackbench"], rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    return r


@pytest.fixture(scope="module")
def starve_report(home):
    r = candidates.validate(source=(FIXTURES / "starve_comm.bpf.c").read_text(),
                                 workloads=["hackbench"], rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    return r


def refused(token: str, target: str = "sandbox", match: str = "") -> str:
    with pytest.raises(tokens.TokenRefused) as e:
        tokens.check(token, target, "test")
    assert match in e.value.message
    return e.value.message


def test_token_refusals(fifo_report):
    t = tokens.issue(fifo_report.id).token
    body, sig = t.split(".")
    refused(body + "." + sig[:-2] + ("AA" if not sig.endswith("AA") else "BB"), match="signature")
    refused(t[: len(t) // 2], match="malformed")
    refused("", match="malformed")
    expired = tokens.issue(fifo_report.id, ttl_s=1).token
    time.sleep(1.1)
    refused(expired, match="expired")
    for ttl in (-100, 0, 8 * 24 * 3600):  # a negative or unbounded lifetime is refused
        with pytest.raises(BadInput, match="out of range"):
            tokens.issue(fifo_report.id, ttl_s=ttl)
    refused(t, target="host", match="for target 'sandbox'")
    tokens.check(t, "sandbox", "test")  # spends it
    refused(t, match="already used")
    # nothing was loaded by any of these, and each refusal is in the audit log
    actions = [a["action"] for a in store.audit_log()]
    assert actions.count("deploy_refused") >= 6


def test_token_for_changed_artifact_or_invalidated_report_is_refused(fifo_report, home):
    t1 = tokens.issue(fifo_report.id).token
    obj = Path(fifo_report.object_path)
    original = obj.read_bytes()
    try:
        obj.write_bytes(original + b"\0")
        refused(t1, match="differs from the validated artifact")
    finally:
        obj.write_bytes(original)
    r2 = candidates.validate(policy="fifo", params={"slice_ns": "5000000"},
                                workloads=["hackbench"], rounds=3, budget_s=0, goals=LENIENT).report
    t2 = tokens.issue(r2.id).token
    invalidate(r2.id, "test: found a bug in it")
    refused(t2, match="invalidated")
    with pytest.raises(tokens.TokenRefused, match="did not pass"):
        tokens.issue(r2.id)


def test_host_deploy_refused_without_sched_ext_and_says_what_is_missing(fifo_report):
    t = tokens.issue(fifo_report.id, target="host").token
    if Path("/sys/kernel/sched_ext").exists():
        pytest.skip("this host has sched_ext")
    with pytest.raises(tokens.TokenRefused, match="no sched_ext"):
        deployments.deploy(t, "host", actor="mcp")


def wait_for(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_loser_of_two_concurrent_deploys_of_one_token_is_told_it_was_used(fifo_report):
    import threading

    t = tokens.issue(fifo_report.id).token
    mon = deployments.MonitorPolicy(metric_cmd="echo 1", interval_s=60)
    results: list[object] = []

    def go():
        try:
            results.append(deployments.deploy(t, "sandbox", monitor=mon))
        except Exception as e:  # noqa: BLE001 (the assertion below says which)
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    won = [r for r in results if isinstance(r, deployments.Deployment)]
    lost = [r for r in results if not isinstance(r, deployments.Deployment)]
    try:
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], tokens.TokenRefused) and "already used" in lost[0].message, lost[0]
    finally:
        for d in won:
            deployments.rollback(d.id, "sandbox", "test: done", actor="test")


def test_deploy_then_degradation_rolls_back(fifo_report):
    target = SandboxTarget()
    with target.vm() as v:
        v.run("echo 1.0 > /run/schedcp-metric")
    dry = deployments.deploy(tokens.issue(fifo_report.id).token, "sandbox", dry_run=True)
    assert dry.dry_run and any("load fifo" in w for w in dry.would)
    mon = deployments.MonitorPolicy(metric_cmd="cat /run/schedcp-metric", interval_s=1,
                                    consecutive=2, max_degradation_ratio=1.5)
    d = deployments.deploy(tokens.issue(fifo_report.id).token, "sandbox", monitor=mon)
    assert d.status == "active" and d.baseline == 1.0
    st = target.state()
    assert st.enabled and st.ops == "fifo"
    s = deployments.status()
    assert s.deployments[0].id == d.id and s.targets["sandbox"].ops == "fifo"
    # the monitor dies (as with a server restart): resuming starts a new one from the stored state
    os.kill(d.monitor_pid, signal.SIGKILL)
    wait_for(lambda: not deployments._pid_alive(d.monitor_pid), 10, "the monitor to die")
    assert deployments.resume_monitors() == [d.id]
    new_pid = deployments.get_deployment(d.id).monitor_pid
    assert new_pid != d.monitor_pid and deployments._pid_alive(new_pid)
    # inject a real degradation: the figure the metric command reports gets 5x worse
    with target.vm() as v:
        v.run("echo 5.0 > /run/schedcp-metric")
    done = wait_for(lambda: (x := deployments.get_deployment(d.id)).status != "active" and x, 90,
                    "the monitor to roll back")
    assert done.status == "rolled_back" and "degradation" in done.end_reason
    assert not target.state().enabled
    actions = [a["action"] for a in store.audit_log()]
    assert "deploy" in actions and "rollback" in actions and "token_issued" in actions
    from schedcp_mcp.learn.feedback import get_feedback

    fb = get_feedback(d.id)
    assert fb.rolled_back and fb.metrics[0].ratio == pytest.approx(5.0)


def test_watchdog_kill_after_deploy_is_detected_and_recorded(starve_report):
    target = SandboxTarget()
    mon = deployments.MonitorPolicy(metric_cmd="echo 1", interval_s=1, consecutive=3)
    d = deployments.deploy(tokens.issue(starve_report.id).token, "sandbox", monitor=mon)
    assert target.state().ops == "starve_comm"
    with target.vm() as v:  # a task the scheduler never dispatches: the kernel watchdog fires
        v.run("setsid sh -c 'printf starveme > /proc/self/comm; while :; do :; done' "
              ">/dev/null 2>&1 </dev/null 3>&- & echo started")
    done = wait_for(lambda: (x := deployments.get_deployment(d.id)).status != "active" and x, 90,
                    "the monitor to notice the watchdog")
    assert done.status == "rolled_back"
    assert "runnable task stall" in done.end_reason
    with target.vm() as v:
        v.run("for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = starveme ] && "
              "kill ${p#/proc/}; done; true")
    assert any(a["action"] == "rollback" and a["detail"]["deployment_id"] == d.id
               for a in store.audit_log())


def test_a_scheduler_schedcp_did_not_load_is_not_replaced_and_the_token_is_kept(fifo_report):
    target = SandboxTarget()
    obj = Path(fifo_report.object_path).read_bytes()
    with target.vm() as v:  # someone else's scheduler, loaded behind schedcp's back
        v.run("cp obj.o /run/foreign.bpf.o; setsid schedcp-loader /run/foreign.bpf.o --run "
              ">/dev/null 2>&1 </dev/null 3>&- & sleep 2", files={"obj.o": obj})
    assert target.state().enabled
    t = tokens.issue(fifo_report.id).token
    try:
        with pytest.raises(Exception, match="another sched_ext scheduler"):
            deployments.deploy(t, "sandbox")
        tokens.check(t, "sandbox", "test", spend=False)  # still valid: nothing was spent
    finally:
        with target.vm() as v:
            v.run("for p in /proc/[0-9]*; do case \"$(cat $p/cmdline 2>/dev/null | tr '\\0' ' ')\" in "
                  "*foreign.bpf.o*) kill ${p#/proc/};; esac; done; sleep 1")
    assert not target.state().enabled
