"""Fast checks of layer-3 rules on recorded real outputs (no VM)."""

from __future__ import annotations

import pytest

import hashlib
import time
from pathlib import Path

from schedcp_mcp import config, store
from schedcp_mcp.deploy import tokens
from schedcp_mcp.deploy.deployments import threshold_from_goals
from schedcp_mcp.deploy.targets import parse_metric
from schedcp_mcp.sandbox.scheduler import parse_exit, parse_state
from schedcp_mcp.errors import BadInput, InfrastructureError
from schedcp_mcp.observe.profile import Goal
from schedcp_mcp.reports import invalidate, new_report, save
from schedcp_mcp.validate.models import Layer2Result, WorkloadResult
from schedcp_mcp.verify.models import Layer1Report

# printed by the sandbox kernel when the watchdog removed a scheduler during a test run
KERNEL_LOG = """[    9.625694] sched_ext: BPF scheduler "starve_comm" disabled (runnable task stall)
[    9.626806] sched_ext: starve_comm: starveme[168] failed to run for 3.772s"""


def goal(metric, direction, r):
    return Goal(metric=metric, direction=direction, target_ratio=r)


def test_rollback_threshold_comes_from_goals():
    assert threshold_from_goals([]) == 1.10
    assert threshold_from_goals([goal("throughput", "higher", 0.8)]) == pytest.approx(1.25)
    assert threshold_from_goals([goal("throughput", "higher", 0.97)]) == 1.05  # noise floor
    assert threshold_from_goals([goal("p99_wakeup_latency_us", "lower", 0.9)]) == 1.05
    assert threshold_from_goals([goal("wall_time_s", "lower", 1.3),
                                 goal("throughput", "higher", 0.8)]) == pytest.approx(1.25)


def test_kernel_disable_reason_is_quoted():
    ex = parse_exit("@@J\n\n@@K\n" + KERNEL_LOG, "starve_comm").exit
    assert ex.kind == "stall" and ex.reason == "runnable task stall"
    assert ex.kernel_line.endswith('"starve_comm" disabled (runnable task stall)')
    assert parse_exit("@@J\n\n@@K\n").exit.kind == "unknown"


def test_state_and_metric_parsing():
    st = parse_state("state=enabled\nops=fifo\nenable_seq=3\npsi=some avg10=1.50 avg60=0.2\n"
                     "ctxt=1234\nuptime=12.5\n")
    assert st.enabled and st.ops == "fifo" and st.enable_seq == 3 and st.psi_some_avg10 == 1.5
    assert parse_metric("Running in process mode with 2 groups\nTime: 1.234\n") == 1.234
    with pytest.raises(InfrastructureError, match="printed no number"):
        parse_metric("nothing here")


# --- deployment tokens: pure HMAC rules over a stored report, no VM needed ---------------------------

def validated_report(params: dict[str, str] | None = None, measured: tuple[str, ...] = ()):
    """A stored report that passed both layers, over a real object file on disk (what a token is
    bound to), its layer 2 having measured `measured`; the layers' own verdicts are tested with the
    real kernel elsewhere."""
    obj = config.home() / f"obj-{len(params or {})}-{len(measured)}.bpf.o"
    obj.write_bytes(b"\x7fELF a validated sched_ext object " + repr((params, measured)).encode())
    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256="0" * 64, ops_name="fifo",
                      object_sha256=hashlib.sha256(obj.read_bytes()).hexdigest(), object_path=str(obj))
    r = new_report(l1, policy="fifo", params=params or {})
    r.layer2 = Layer2Result(passed=True, ops_name="fifo", workloads=[
        WorkloadResult(name=w, metric="m", unit="s", direction="lower", baseline=[1.0] * 3, candidate=[1.0] * 3,
                       verdict="same") for w in measured])
    save(r)
    assert r.passed
    return r


def refused(token: str, target: str = "sandbox", match: str = "") -> str:
    with pytest.raises(tokens.TokenRefused) as e:
        tokens.check(token, target, "test")
    assert match in e.value.message
    return e.value.message


def test_token_refusals():
    r = validated_report()
    t = tokens.issue(r.id).token
    body, sig = t.split(".")
    refused(body + "." + sig[:-2] + ("AA" if not sig.endswith("AA") else "BB"), match="signature")
    refused(t[: len(t) // 2], match="malformed")
    refused("", match="malformed")
    expired = tokens.issue(r.id, ttl_s=1).token
    time.sleep(1.1)
    refused(expired, match="expired")
    for ttl in (-100, 0, 8 * 24 * 3600):  # a negative or unbounded lifetime is refused
        with pytest.raises(BadInput, match="out of range"):
            tokens.issue(r.id, ttl_s=ttl)
    refused(t, target="host", match="for target 'sandbox'")
    payload, report = tokens.check(t, "sandbox", "test")  # spends it
    assert payload.report_id == report.id == r.id
    refused(t, match="already used")
    actions = [a["action"] for a in store.audit_log()]
    assert actions.count("deploy_refused") >= 6  # every refusal is audited


def test_a_dry_run_check_does_not_spend_the_token():
    t = tokens.issue(validated_report().id).token
    tokens.check(t, "sandbox", "test", spend=False)
    tokens.check(t, "sandbox", "test")
    refused(t, match="already used")


def test_token_for_changed_artifact_or_invalidated_report_is_refused():
    r = validated_report()
    t1 = tokens.issue(r.id).token
    obj = Path(r.object_path)
    original = obj.read_bytes()
    obj.write_bytes(original + b"\0")
    refused(t1, match="differs from the validated artifact")
    obj.write_bytes(original)
    tokens.check(t1, "sandbox", "test", spend=False)  # the same bytes again: accepted
    r2 = validated_report({"slice_ns": "5000000"})
    t2 = tokens.issue(r2.id).token
    invalidate(r2.id, "test: found a bug in it")
    refused(t2, match="invalidated")
    with pytest.raises(tokens.TokenRefused, match="did not pass"):
        tokens.issue(r2.id)


def test_host_deploy_refused_without_sched_ext_and_says_what_is_missing():
    if Path("/sys/kernel/sched_ext").exists():
        pytest.skip("this host has sched_ext")
    from schedcp_mcp.deploy import deployments

    t = tokens.issue(validated_report(measured=ALL).id, target="host").token
    with pytest.raises(tokens.TokenRefused, match="no sched_ext"):
        deployments.deploy(t, "host", actor="mcp")
    tokens.check(t, "host", "test", spend=False)  # the refusal did not spend it


ALL = ("hackbench", "wakeup", "pipe", "cpu")


def test_a_system_wide_host_token_needs_the_guard_set_measured():
    """A validation on its target alone says nothing of the rest of the machine: the host gets such a
    scheduler only scoped; the sandbox (the staging VM) takes it as it is."""
    target_only = validated_report(measured=("hackbench",))
    with pytest.raises(tokens.TokenRefused, match="without the guard workload.*wakeup, pipe, cpu") as e:
        tokens.issue(target_only.id, target="host")
    assert "--scoped" in e.value.hint
    assert tokens.issue(target_only.id, target="host", scope="scoped").token
    assert tokens.issue(target_only.id, target="sandbox").token
    partial = validated_report(measured=("hackbench", "wakeup", "cpu"))
    with pytest.raises(tokens.TokenRefused, match="guard workload\\(s\\) pipe:"):
        tokens.issue(partial.id, target="host")
    assert tokens.issue(validated_report(measured=ALL).id, target="host").token
    assert [a for a in store.audit_log() if a["action"] == "token_refused"][0]["detail"]["missing"] == ["pipe"]


def test_a_second_measurement_is_a_new_report_and_the_first_is_kept():
    """validate on a report that has a layer 2 (optimize's measure-again, `validate --report` twice)
    measures into a fresh report of the same layer 1; the first report and its figures stay."""
    from schedcp_mcp.reports import get_report

    first = validated_report(measured=("pipe",))
    again = get_report(first.id).measured_again("rep-again00001")
    assert again.id == "rep-again00001" and again.layer2 is None and again.again_of == first.id
    assert again.layer1 == first.layer1 and again.artifact_sha256 == first.artifact_sha256
    assert get_report(first.id).layer2.workloads[0].name == "pipe"  # untouched until a save, and after
    again.layer2 = Layer2Result(passed=False, ops_name="fifo")
    save(again)
    assert get_report(first.id).passed and not get_report(again.id).passed
    third = get_report(again.id).measured_again("rep-again00002")
    assert third.again_of == first.id  # every measurement points at the first
    fresh = new_report(first.layer1, policy="fifo", params={})
    assert fresh.measured_again("rep-unused") is fresh  # nothing measured yet: measured in place
    invalidate(first.id, "rolled back")
    assert get_report(first.id).measured_again("rep-again00003").invalidated  # a rollback is not undone
