"""Layer 3: token refusals, deploy to the staging VM, monitor-driven rollback, watchdog detection,
status and audit. Real validations, a real staging VM, a real monitor process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CallbackReceiver, home_env
from schedcp_mcp import candidates, store
from schedcp_mcp.deploy import deployments, tokens
from schedcp_mcp.learn import callbacks
from schedcp_mcp.deploy.targets import SandboxTarget
from schedcp_mcp.observe.profile import Goal
from schedcp_mcp.sandbox.vm import VM

pytestmark = pytest.mark.image
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
def fifo_validated(home):
    r = candidates.validate(policy="fifo", workloads=["hackbench"], rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    return r


@pytest.fixture
def fifo_report(fifo_validated):
    """fifo's validation under a report of its own for each test: a rollback invalidates the report it
    deployed (no new token without a new validation), and re-validating the same bytes for every test
    would cost a minute each — so each test gets the validated facts under a fresh report id, as a
    re-validation would store them."""
    from schedcp_mcp import reports, store

    r = fifo_validated.model_copy(update={"id": store.new_id("rep"), "invalidated": False,
                                          "invalidated_reason": None})
    reports.save(r)
    assert r.passed
    return r


@pytest.fixture(scope="module")
def starve_report(home):
    r = candidates.validate(source=(FIXTURES / "starve_comm.bpf.c").read_text(),
                                 workloads=["hackbench"], rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    return r


#: error_later.bpf.c calls scx_bpf_error() this long after its init: longer than its validation
#: keeps it loaded, short enough for a test
ERROR_AFTER_S = 30


@pytest.fixture(scope="module")
def error_later_report(home):
    r = candidates.validate(source=(FIXTURES / "error_later.bpf.c").read_text(),
                            params={"error_after_s": str(ERROR_AFTER_S)}, workloads=["hackbench"],
                            rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    # each load is a fresh init: none may have lasted as long as the error's delay
    t = {s.phase: s.t for s in r.layer2.timeline if s.phase.startswith(("load-", "unload-"))}
    spans = [t[f"unload-{n}"] - t[f"load-{n}"] for n in range(1, 4) if f"load-{n}" in t and f"unload-{n}" in t]
    assert spans and max(spans) < ERROR_AFTER_S, ("the validation kept it loaded too long", spans)
    return r


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


def test_a_scheduler_error_after_deploy_is_rolled_back_in_the_schedulers_own_words(error_later_report,
                                                                                   home):
    """Issue 17: the scheduler behaves through validation, then calls scx_bpf_error() on the staging
    target. The rollback reason, `schedcp feedback --json`, the audit log and a callback's event all
    carry the exit kind, the scheduler's message and the kernel's log line."""
    words = f"schedcp test: deliberate error after {ERROR_AFTER_S} s"
    rx = CallbackReceiver()
    try:
        mon = deployments.MonitorPolicy(metric_cmd="echo 1", interval_s=1, consecutive=3)
        d = deployments.deploy(tokens.issue(error_later_report.id).token, "sandbox", monitor=mon)
        cb = callbacks.register(rx.url, callbacks.Condition(kind="reward_below", threshold=-0.5,
                                                            deployment_id=d.id, cooldown_s=0))
        assert callbacks.evaluate_once() == []  # running fine: reward 0
        done = wait_for(lambda: (x := deployments.get_deployment(d.id)).status != "active" and x,
                        ERROR_AFTER_S + 90, "the monitor to notice the scheduler's error")
        assert done.status == "rolled_back", done.end_reason
        for part in (words, "SCX_EXIT_ERROR_BPF", 'BPF scheduler "error_later" disabled (scx_bpf_error)'):
            assert part in done.end_reason, (part, done.end_reason)
        assert done.exit.kind == "error" and done.exit.message.endswith(words), done.exit
        assert not SandboxTarget().state().enabled

        out = subprocess.run([sys.executable, "-m", "schedcp_mcp", "feedback", d.id, "--json"],
                             capture_output=True, text=True, timeout=60, env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-2000:]
        fb = json.loads(out.stdout)
        assert fb["rolled_back"] and fb["reward"] == -1.0
        assert words in fb["rollback_reason"] and words in fb["exit"]["message"]
        assert fb["exit"]["kind_name"] == "SCX_EXIT_ERROR_BPF" and "disabled (scx_bpf_error)" in fb["exit"]["kernel_line"]

        rb = [a for a in store.audit_log() if a["action"] == "rollback"
              and a["detail"]["deployment_id"] == d.id]
        assert rb and words in rb[0]["detail"]["reason"] and words in rb[0]["detail"]["exit"]["message"]

        assert callbacks.evaluate_once() == [cb.id]  # what the server's watcher does every few seconds
        ev = rx.events[-1]
        assert ev["callback_id"] == cb.id and words in ev["message"]
        assert words in ev["feedback"]["rollback_reason"] and ev["feedback"]["exit"]["kind"] == "error"
    finally:
        rx.close()


@pytest.fixture(scope="module")
def error_silent_report(home):
    r = candidates.validate(source=(FIXTURES / "error_silent.bpf.c").read_text(),
                            params={"error_after_s": str(SILENT_AFTER_S)}, workloads=["hackbench"],
                            rounds=3, budget_s=0, goals=LENIENT).report
    assert r.passed, r.status
    return r


#: issue #24's case: 40 s into its deployment
SILENT_AFTER_S = 40


def test_a_scheduler_error_without_an_exit_callback_is_rolled_back_with_the_kernels_message(
        error_silent_report, home):
    """Issue 24: no exit callback, so no UEI: the rollback reason still carries the scheduler's message
    and the backtrace, from the kernel's lines after `disabled (scx_bpf_error)`."""
    words = f"schedcp test: deliberate error after {SILENT_AFTER_S} s"
    mon = deployments.MonitorPolicy(metric_cmd="echo 1", interval_s=1, consecutive=3)
    d = deployments.deploy(tokens.issue(error_silent_report.id).token, "sandbox", monitor=mon)
    done = wait_for(lambda: (x := deployments.get_deployment(d.id)).status != "active" and x,
                    SILENT_AFTER_S + 120, "the monitor to notice the scheduler's error")
    assert done.status == "rolled_back", done.end_reason
    assert done.exit.kind == "error" and done.exit.message == "", done.exit  # no UEI recorded
    assert 'BPF scheduler "error_silent" disabled (scx_bpf_error)' in done.end_reason
    said = done.exit.kernel_message.splitlines()  # the kernel prefixes the source line: "x.bpf.c:36: …"
    assert said[0].startswith("sched_ext: error_silent: ") and said[0].endswith(words), said
    assert words in done.end_reason and any("scx_bpf_error" in ln for ln in said[1:]), done.end_reason  # backtrace
    assert not SandboxTarget().state().enabled
