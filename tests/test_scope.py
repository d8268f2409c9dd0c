"""Scoped deployment rules without a VM (issue #26 part 2): what a scope may be, tokens that allow only
a scoped deploy, the loader's partial flag on its command line, and a scheduler program refused for a
scoped deploy (it sets its own partial mode)."""

from __future__ import annotations

import pytest

from schedcp_mcp.deploy import scope, tokens
from schedcp_mcp.errors import BadInput
from schedcp_mcp.sandbox import scheduler
from test_deploy_rules import validated_report


@pytest.mark.parametrize("text,cmd,want", [
    ("pid:1234", None, "pid:1234"),
    ("cgroup:/sys/fs/cgroup/canary/", None, "cgroup:/sys/fs/cgroup/canary"),
    (None, ["stress-ng", "--cpu", "1"], "command: stress-ng --cpu 1"),
])
def test_a_scope_is_a_pid_a_cgroup_or_a_command(text, cmd, want):
    assert scope.parse(text, cmd).describe() == want


@pytest.mark.parametrize("text", ["pid:0", "pid:abc", "pid:", "cgroup:relative", "cgroup:/a/../b", "uid:3", "all"])
def test_a_bad_scope_is_refused_saying_what_a_scope_is(text):
    with pytest.raises(BadInput, match="pid:N, cgroup:/ABSOLUTE/PATH"):
        scope.parse(text)


def test_no_scope_is_system_wide_and_both_is_refused():
    assert scope.parse(None, None) is None
    with pytest.raises(BadInput, match="not both"):
        scope.parse("pid:1", ["sleep", "1"])


def test_the_loader_runs_partial_only_when_scoped():
    assert "--partial" in scheduler.run_argv("/o.bpf.o", {}, 3000, partial=True)
    assert "--partial" not in scheduler.run_argv("/o.bpf.o", {}, 3000)


def test_a_scoped_token_allows_only_a_scoped_deploy():
    r = validated_report()
    t = tokens.issue(r.id, scope="scoped").token
    with pytest.raises(tokens.TokenRefused, match="only a scoped deployment"):
        tokens.check(t, "sandbox", "test", spend=False)
    p, _ = tokens.check(t, "sandbox", "test", spend=False, scoped=True)
    assert p.scope == "scoped"
    system = tokens.issue(r.id).token  # a system-wide token may also be used for a scoped deploy
    assert tokens.check(system, "sandbox", "test", spend=False, scoped=True)[0].scope == "system"
    with pytest.raises(BadInput, match="give system or scoped"):
        tokens.issue(r.id, scope="everything")


def test_the_move_script_moves_exactly_the_scope():
    s = scope.move_script("/run/d", scope.parse("pid:42"))
    assert "/run/d/schedcp-setclass ext pid 42" in s
    c = scope.move_script("/run/d", scope.parse(None, ["sleep", "100", "it's"]))
    # in the foreground: setclass answers once the command runs on SCHED_EXT (no race with a reader)
    assert "schedcp-setclass ext start /run/d/scope.out sleep 100 'it'\"'\"'s'" in c and "&\n" not in c
    assert scope.check_moved("@@SCOPEPID 77\n", 0, scope.parse(None, ["sleep", "100"])) == 77
    with pytest.raises(BadInput, match="cannot run nope"):
        scope.check_moved("schedcp-setclass: cannot run nope: No such file or directory\n", 1,
                          scope.parse(None, ["nope"]))
    assert "normal all" in scope.restore_script("/run/d")
    with pytest.raises(Exception, match="could not move pid:42"):
        scope.check_moved("moved 0\n", 0, scope.parse("pid:42"))


def test_ab_refuses_bad_input_before_anything_runs():
    from schedcp_mcp.deploy.ab import ab

    r = validated_report()
    t = tokens.issue(r.id).token
    with pytest.raises(BadInput, match="give the command"):
        ab(t, [], "sandbox")
    with pytest.raises(BadInput, match="rounds must be 2..50"):
        ab(t, ["true"], "sandbox", rounds=1)


def _judged(correctness_ok: bool, failed: list[str], passed: list[str]):
    """A stored report whose layer 2 failed exactly the performance gates of `failed` (workload names)
    and passed those of `passed`; the correctness gates passed or one (stress) did not."""
    from schedcp_mcp.reports import save
    from schedcp_mcp.validate.models import Gate, Layer2Result

    r = validated_report()
    perf = [Gate(name=f"{'guard' if w in ('wakeup', 'pipe', 'cpu') else 'goal'}:{w}", passed=w in passed,
                 reason="figures", kind="performance", threshold=0.909, workload=w) for w in [*failed, *passed]]
    r.layer2 = Layer2Result(passed=False, ops_name="fifo", performance=perf,
                            correctness=[Gate(name="stress_progress", passed=correctness_ok, reason="…")],
                            failure_reason=f"{perf[0].name}: figures")
    save(r)
    return r


def test_a_scheduler_that_only_harmed_the_guard_set_gets_a_scoped_token_and_nothing_more():
    """#22 item 3 / #26: a candidate that wins its target but harms a guard may run scoped (partial mode,
    the rest of the machine on the default scheduler), never system-wide."""
    r = _judged(True, failed=["wakeup", "pipe"], passed=["hackbench"])
    with pytest.raises(tokens.TokenRefused, match=r"harmed the guard set \(wakeup, pipe\)") as e:
        tokens.issue(r.id)
    assert f"schedcp token {r.id} --scoped" in e.value.hint
    t = tokens.issue(r.id, scope="scoped").token
    with pytest.raises(tokens.TokenRefused, match="only a scoped deployment"):
        tokens.check(t, "sandbox", "test", spend=False)
    p, rep = tokens.check(t, "sandbox", "test", spend=False, scoped=True)
    assert p.scope == "scoped" and rep.id == r.id


@pytest.mark.parametrize("correctness_ok,failed,passed", [
    (False, ["wakeup"], ["hackbench"]),        # a correctness gate failed too
    (True, ["wakeup", "hackbench"], []),       # the target lost as well
    (True, ["wakeup"], []),                    # nothing but guards measured: no win to run scoped for
    (True, ["build"], ["hackbench"]),          # a failure outside the guard set
])
def test_any_other_failure_gets_no_token_at_all(correctness_ok, failed, passed):
    r = _judged(correctness_ok, failed, passed)
    for scope_ in ("system", "scoped"):
        with pytest.raises(tokens.TokenRefused, match="did not pass layers 1 and 2"):
            tokens.issue(r.id, scope=scope_)
