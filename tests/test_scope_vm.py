"""Scoped deployment in the staging VM playing the host (issue #26 part 2): a BPF scheduler loaded in
partial mode (the loader's --partial) with exactly the scope's tasks moved to SCHED_EXT; a task outside
the scope stays SCHED_NORMAL; status shows the scope; rollback returns the scope to SCHED_NORMAL."""

from __future__ import annotations

import pytest

from conftest import home_env
from schedcp_mcp import candidates, reports
from schedcp_mcp.deploy import deployments, scope, tokens
from schedcp_mcp.deploy.targets import SandboxTarget
from schedcp_mcp.errors import BadInput
from schedcp_mcp.sandbox.vm import VM
from schedcp_mcp.validate.models import Layer2Result

pytestmark = pytest.mark.image


@pytest.fixture(scope="module")
def home(tmp_path_factory, manifest):
    with home_env(tmp_path_factory.mktemp("scopehome")) as h:
        yield h
        VM.stop_named("staging")


@pytest.fixture
def fifo_passed(home, monkeypatch):
    """fifo through the real layer 1 (compiled, the sandbox kernel's verifier); layer 2's pass is a
    stand-in (its validation is tests/test_deploy.py's; here the scope is under test), named as such."""
    monkeypatch.setenv("SCHEDCP_HOME", str(home))
    r = candidates.submit(policy="fifo")
    assert r.passed_layer1, r.layer1.errors
    r.layer2 = Layer2Result(passed=True, ops_name="fifo")  # the stand-in
    reports.save(r)
    return r


def _policy(t: SandboxTarget, pid: int) -> int:
    return int(t.sh(f"{t.run_dir}/schedcp-setclass policy {pid}", 20).stdout.strip())


def test_a_scoped_deploy_moves_exactly_its_task_and_rollback_moves_it_back(fifo_passed):
    t = SandboxTarget()
    with t.vm() as v:
        out = v.run("setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!; "
                    "setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!", timeout_s=20).stdout.split()
    inside, outside = int(out[0]), int(out[1])
    tok = tokens.issue(fifo_passed.id, scope="scoped").token
    with pytest.raises(tokens.TokenRefused, match="only a scoped deployment"):
        deployments.deploy(tok, "sandbox", start_monitor=False)  # system-wide with a scoped token
    d = deployments.deploy(tok, "sandbox", start_monitor=False, scope=scope.parse(f"pid:{inside}"))
    st = t.state()
    assert d.scope == f"pid:{inside}" and st.enabled and st.ops == "fifo"
    assert _policy(t, inside) == scope.SCHED_EXT
    assert _policy(t, outside) == 0  # outside the scope: SCHED_NORMAL, on the default scheduler
    assert deployments.status().deployments[0].scope == f"pid:{inside}"
    ended = deployments.rollback(d.id, reason="test")
    assert ended.status == "rolled_back" and not t.state().enabled
    assert _policy(t, inside) == 0 and _policy(t, outside) == 0


def test_a_command_scope_starts_the_command_on_the_scheduler(fifo_passed):
    t = SandboxTarget()
    d = deployments.deploy(tokens.issue(fifo_passed.id, scope="scoped").token, "sandbox", start_monitor=False,
                           scope=scope.parse(None, ["sleep", "1000"]))
    assert d.scope == "command: sleep 1000" and d.scope_pid
    assert _policy(t, d.scope_pid) == scope.SCHED_EXT
    assert _policy(t, 1) == 0  # init stays on the default scheduler
    deployments.rollback(d.id, reason="test")
    assert _policy(t, d.scope_pid) == 0


def test_a_command_that_cannot_run_is_refused_in_its_own_words_and_the_scheduler_unloaded(fifo_passed):
    t = SandboxTarget()
    with pytest.raises(BadInput, match="cannot run no-such-command-here"):
        deployments.deploy(tokens.issue(fifo_passed.id, scope="scoped").token, "sandbox", start_monitor=False,
                           scope=scope.parse(None, ["no-such-command-here", "--flag"]))
    assert not t.state().enabled
    last = deployments.status().deployments[0]  # newest first: recorded as failed, with the reason
    assert last.scope == "command: no-such-command-here --flag" and last.status == "failed"
    assert "cannot run no-such-command-here" in (last.end_reason or "")
