"""The runner's round plan and adaptive rounds, the gates, deploy and the monitor, driven by a FAKE VM
that plays guest answers recorded from the real one (tests/fakevm.py): fast, no image, no boot. The
same flows against the real VM are in test_validate.py and test_deploy.py (`image`)."""

from __future__ import annotations

import hashlib
import re

import pytest

from fakevm import FakeVM, fake_image
from schedcp_mcp import config
from schedcp_mcp.deploy import deployments, monitor, targets, tokens
from schedcp_mcp.errors import InfrastructureError
from schedcp_mcp.models import MonitorPolicy
from schedcp_mcp.reports import get_report, new_report, save
from schedcp_mcp.validate import gates, runner, starvation
from schedcp_mcp.validate.models import Layer2Result
from schedcp_mcp.validate.workloads import get_workloads
from schedcp_mcp.verify.models import Layer1Report


@pytest.fixture
def replay(monkeypatch, tmp_path):
    """replay(scenario, **validate_in_sandbox args) -> (result, fake): a validation against the fake
    VM, on the fake's clock (the budget is spent as the recorded run spent it). The probe and the
    tracer the setup step ships are placeholders (they are built in the image's toolchain; the fake
    guest runs nothing)."""
    placeholder = tmp_path / "placeholder"
    placeholder.write_bytes(b"placeholder: the fake VM runs nothing")
    monkeypatch.setattr(runner, "ensure_probe", lambda: placeholder)
    monkeypatch.setattr(starvation, "ensure_tracer", lambda: placeholder)

    def go(scenario: str, edit=None, hang=None, **kw):
        fake = FakeVM(scenario, edit, hang)
        monkeypatch.setattr(runner, "time", fake.clock)
        m = fake.meta
        # the workloads as recorded: a step's answer holds the runs per side of the recording
        wls = [w.model_copy(update={"reps": m.get("reps", {}).get(w.name, w.reps)})
               for w in get_workloads(m["workloads"])]
        args = {"ops_name": m["ops_name"], "params": m["params"], "workloads": wls,
                "rounds": m["rounds"], "budget_s": 0, **kw}
        return runner.validate_in_sandbox(b"\x7fELF placeholder object", vm=fake, **args), fake

    return go


def steps(fake: FakeVM) -> list[str]:
    return [k.removeprefix("step ") for k in fake.calls]


# ---------------------------------------------------------------- the runner's round plan


def test_a_validation_pairs_each_workloads_sides_back_to_back_and_runs_the_phases_in_order(replay):
    res, fake = replay("validate_fifo")
    assert steps(fake) == [
        "setup", "warmup-# hackbench pipe",
        # round 1: A B | B A — neighbours share a side, one scheduler switch per workload
        "baseline-# hackbench", "load-#", "candidate-# hackbench pipe", "unload-#", "baseline-# pipe",
        # after round 1: the starvation phase on both sides, then stress under the candidate
        "starve-baseline", "load-#", "starve-candidate", "stress",
        # round 2 starts on the side round 1 ended on (B A | A B), round 3 like round 1
        "candidate-# hackbench", "unload-#", "baseline-# hackbench pipe", "load-#", "candidate-# pipe",
        "unload-#", "baseline-# hackbench", "load-#", "candidate-# hackbench pipe", "unload-#", "baseline-# pipe",
        "dmesg 2>/dev/null"]
    assert fake.files[0] == ["obj.bpf.o", "rqw.bpf.o", "schedcp-probe", "w_hackbench.sh", "w_pipe.sh"]
    assert res.rounds == 3 and all(len(w.baseline) == len(w.candidate) == 3 for w in res.workloads)
    assert all(g.passed for g in res.correctness), [g for g in res.correctness if not g.passed]
    # exactly the rounds asked for (budget 0): pipe's interval still straddles the no-harm threshold,
    # and an undecided gate fails (the candidate was not shown to do no harm)
    pipe = next(w for w in res.workloads if w.name == "pipe")
    assert pipe.verdict == "undecided" and pipe.speedup_low < 1 / 1.1 < pipe.speedup_high
    assert not res.passed and res.failure_reason.startswith("no_regression:pipe") and "undecided" in res.failure_reason


def measured(fake: FakeVM) -> list[list[str]]:
    """The workloads of each measuring step, in order."""
    return [k.split()[1:] for k in steps(fake) if k.startswith(("baseline-#", "candidate-#"))]


def test_extra_rounds_measure_only_the_workloads_still_open_until_every_verdict_settles(replay):
    """From one round up, with room in the budget: round 1's one pair decides nothing, so round 2
    measures both workloads; then only pipe, whose interval is still open, while hackbench is settled.
    (Rounds beyond the recorded three replay the last recorded answers.)"""
    res, fake = replay("validate_fifo", rounds=1, budget_s=600)
    m = measured(fake)
    assert m[:6] == [["hackbench"], ["hackbench", "pipe"], ["pipe"], ["hackbench"], ["hackbench", "pipe"], ["pipe"]]
    assert m[6:8] == [["pipe"], ["pipe"]]  # round 3: pipe alone, its two sides back to back
    hb, pipe = res.workloads
    assert hb.pairs < pipe.pairs == res.rounds
    assert res.passed and all(gates.settled(w) for w in res.workloads)
    assert res.rounds < runner.MAX_ROUNDS and fake.clock.now - 1000 < 600


def test_the_budget_ends_the_extra_rounds_and_an_open_interval_then_fails(replay):
    done = {}
    for budget in (90, 180, 600):
        res, fake = replay("validate_fifo", rounds=1, budget_s=budget)
        # the next round is started only when it fits; what runs over is the unload and kernel log
        assert fake.clock.now - 1000 <= budget + runner.TAIL_S
        done[budget] = res
    assert 1 < done[90].rounds < done[180].rounds < done[600].rounds
    for budget in (90, 180):
        pipe = next(w for w in done[budget].workloads if w.name == "pipe")
        assert pipe.verdict == "undecided" and not done[budget].passed


# ---------------------------------------------------------------- gates on recorded guest output


def test_a_stall_is_failed_in_the_kernels_words_and_the_candidate_is_never_measured(replay):
    res, fake = replay("validate_stall")
    s = steps(fake)
    # the watchdog threw it out at once: after the load nothing more is measured, no starvation or
    # stress phase runs; the loader is stopped and read, then the kernel log
    assert s[:4] == ["setup", "warmup-# hackbench", "baseline-# hackbench", "load-#"]
    assert s[-2:] == ["unload-#", "dmesg 2>/dev/null"] and len(s) <= 7
    assert not [k for k in s if k.startswith(("starve", "stress", "baseline"))][1:]
    assert not res.passed and res.failure_reason.startswith("no_stall:")
    assert "runnable task stall" in res.failure_reason and "failed to run for" in res.failure_reason
    assert any("runnable task stall" in ln for ln in res.kernel_log)
    assert res.workloads[0].verdict == "failed" and not res.workloads[0].candidate and res.rounds == 0


def test_a_candidate_that_starves_a_few_tasks_fails_with_them_named(replay):
    res, _ = replay("validate_starve_timer")
    gate = next(g for g in res.correctness if g.name == "no_starvation")
    assert not res.passed and not gate.passed
    named = re.search(r"\S+\[\d+\] waited 250 ms or more (\d+) times", gate.reason)
    assert named and int(named.group(1)) >= 2, gate.reason
    base, cand = res.starvation
    assert len(cand.starved) > len(base.starved)


def test_a_guest_that_stops_answering_fails_the_run_saying_where(replay):
    res, fake = replay("validate_fifo", hang="step stress")
    assert steps(fake)[-3:] == ["load-#", "starve-candidate", "stress"]  # nothing after the dead VM
    g = {x.name: x for x in res.correctness}
    assert not res.passed and res.failure_reason.startswith("vm_responsive:")
    assert "did not finish within" in g["vm_responsive"].reason and "after starve-candidate" in g["vm_responsive"].reason
    # it died with the candidate attached: the unloads of the earlier rounds do not count as the last
    assert not g["default_restored"].passed and "not reached" in g["default_restored"].reason


# ---------------------------------------------------------------- deploy and monitor on the staging VM


@pytest.fixture
def staging(monkeypatch):
    """The sandbox target's staging VM, fake: the recorded deploy of fifo (a good metric reading, then a
    bad one, the monitor's rollback). Returns (fake, a validated report of fifo to deploy)."""
    fake = FakeVM("deploy")
    monkeypatch.setattr(targets, "VM", fake.named())
    monkeypatch.setattr(targets, "image", fake_image())
    monkeypatch.setattr(monitor, "time", fake.clock)
    obj = config.home() / "fifo.bpf.o"
    obj.write_bytes(b"\x7fELF placeholder object")
    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256="0" * 64, ops_name="fifo",
                      object_sha256=hashlib.sha256(obj.read_bytes()).hexdigest(), object_path=str(obj))
    r = new_report(l1, policy="fifo", params=fake.meta["params"])
    r.layer2 = Layer2Result(passed=True, ops_name="fifo")
    save(r)
    return fake, r


MON = MonitorPolicy(metric_cmd="cat /run/schedcp-metric", interval_s=1, consecutive=2)
STATE = 'echo "state=$(scx_state)"'  # how the target's state reading starts


def kinds(calls: list[str]) -> list[str]:
    """The deploy target's commands by what they do."""
    out = []
    for c in calls:
        out.append("state" if c.startswith(STATE) else "metric" if c == "cat /run/schedcp-metric" else
                   "load" if "deploy.bpf.o" in c else "unload" if "program.pid" in c else
                   "exit" if c.startswith("echo '@@J'") else c)
    return out


def test_deploy_measures_the_baseline_loads_confirms_and_the_monitor_rolls_back_a_bad_metric(staging):
    fake, report = staging
    t = targets.SandboxTarget()
    t.sh("echo 1.0 > /run/schedcp-metric")
    token = tokens.issue(report.id).token
    d = deployments.deploy(token, "sandbox", monitor=MON, start_monitor=False)
    assert d.status == "active" and d.baseline == 1.0 and d.previous.state == "disabled"
    assert kinds(fake.calls[1:]) == ["state", "metric", "metric", "metric", "load", "state"]
    assert fake.files[5] == ["obj.bpf.o"]
    # the token is spent: a second deploy is refused before anything runs in the target
    n = len(fake.calls)
    with pytest.raises(tokens.TokenRefused, match="already used"):
        deployments.deploy(token, "sandbox", monitor=MON, start_monitor=False)
    assert len(fake.calls) == n

    d = monitor.monitor_loop(d.id, max_samples=1)  # a reading as good as the baseline: nothing happens
    assert d.status == "active" and d.readings[-1].metric == 1.0 and not d.readings[-1].degraded
    t.sh("echo 5.0 > /run/schedcp-metric")
    n = len(fake.calls)
    d = monitor.monitor_loop(d.id, max_samples=5)
    assert d.status == "rolled_back" and d.consecutive_bad == 2
    assert "5.0" in d.end_reason and "2 consecutive samples" in d.end_reason
    assert kinds(fake.calls[n:]) == ["state", "metric", "state", "metric", "unload", "exit"]
    assert d.exit is not None and "unregistered from user space" in (d.exit_info or "")
    with pytest.raises(tokens.TokenRefused, match="invalidated"):  # no token for it without a new validation
        tokens.issue(report.id)


def test_the_monitor_rolls_back_when_the_kernel_disabled_the_scheduler(staging):
    fake, report = staging
    d = deployments.deploy(tokens.issue(report.id).token, "sandbox", monitor=MON, start_monitor=False)
    n = len(fake.calls)
    # from here on the guest's sched_ext state reads disabled: the kernel threw the scheduler out
    fake.edit = lambda k, a: ({**a, "stdout": a["stdout"].replace("state=enabled", "state=disabled")}
                              if k.startswith(STATE) else a)
    d = monitor.monitor_loop(d.id, max_samples=5)
    assert d.status == "rolled_back" and d.end_reason.startswith("the kernel disabled the scheduler")
    assert d.readings[-1].state == "disabled" and d.readings[-1].metric is None  # no metric taken
    assert kinds(fake.calls[n:]) == ["state", "unload", "exit"]


def test_a_scheduler_that_does_not_come_up_fails_the_deploy_and_is_unloaded(staging):
    fake, report = staging
    # after the load the state reads disabled: it did not start
    loaded = []

    def edit(k, a):
        if "deploy.bpf.o" in k:
            loaded.append(k)
        if loaded and k.startswith(STATE):
            return {**a, "stdout": a["stdout"].replace("state=enabled", "state=disabled")}
        return a

    fake.edit = edit
    with pytest.raises(InfrastructureError, match="did not start"):
        deployments.deploy(tokens.issue(report.id).token, "sandbox", monitor=MON, start_monitor=False)
    d = deployments.list_deployments(1)[0]
    assert d.status == "failed" and "state is 'disabled'" in d.end_reason
    assert kinds(fake.calls) == ["state", "metric", "metric", "metric", "load", "state", "unload", "exit"]
    assert get_report(report.id).invalidated
