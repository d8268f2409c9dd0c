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
    c = scope.move_script("/run/d", scope.parse(None, ["sleep", "100"]))
    assert "schedcp-setclass ext exec sleep 100" in c and "@@SCOPEPID" in c
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
