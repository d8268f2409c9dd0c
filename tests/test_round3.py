"""Security, round 3 (issue #23): each class of attack that broke, tried again with other spellings.
The fleet's attacks are in tests/test_fleet.py (they need the real broker)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from schedcp_mcp import access
from schedcp_mcp.deploy import deployments
from schedcp_mcp.deploy.targets import HostTarget


@pytest.fixture(autouse=True)
def no_operator_allowances(monkeypatch):
    for env in (access.ALLOW_ANY_ENV, access.ALLOW_PREFIXES_ENV, access.ALLOW_EXACT_ENV):
        monkeypatch.setenv(env, "")


# --- High: what the allowlist checked is exactly what runs -----------------------------------------

SHELL_SPELLINGS = ["echo 1; touch {m}", "echo 1\ntouch {m}", "echo 1 $(touch {m})", "echo 1 `touch {m}`",
                   "echo 1 && touch {m}", "echo 1 | tee {m}", "echo 1 > {m}"]


@pytest.mark.parametrize("spelling", SHELL_SPELLINGS)
def test_shell_syntax_after_an_allowed_prefix_is_only_words(spelling, tmp_path):
    """With `--allow-command-prefix echo`, a metric command that smuggles shell syntax after the
    allowed word passes the check (it is echo's arguments) and runs as echo's arguments: nothing else."""
    access.set_policy(False, ["echo"])
    marker = tmp_path / "ran"
    cmd = spelling.format(m=marker)
    words = deployments.command_argv(cmd, "metric command")
    access.check_command(words, "mcp", "metric command")
    assert HostTarget().run_metric(words) == 1.0 or "1" in cmd
    assert not marker.exists()


def test_a_background_workload_is_words_too(tmp_path):
    marker = tmp_path / "ran"
    t = HostTarget()
    t.start_workload(deployments.command_argv(f"sleep 0.2; touch {marker}", "workload command"))
    time.sleep(1)
    t.stop_workload()
    assert not marker.exists()  # `sleep 0.2;` fails as an argv (invalid time interval): never a shell
    access.set_policy(False, ["sleep 0.2"])
    with pytest.raises(access.CommandRefused):  # the newline is not a command separator either
        access.check_command(deployments.command_argv(f"sleep 5\ntouch {marker}", "x"), "mcp")


def test_no_shell_text_is_built_from_a_command_anywhere():
    """Every `sh -c` left in the code base gets its words as "$@", quoted by shlex.join, or a fixed
    script of schedcp's own (reviewed; a new file with one fails here until someone reasons about it):
    deploy/targets.py (metric/workload argv as "$@" or shlex.join; scheduler-control scripts of
    fixed text), observe/profile.py (`"$@"` in the pid-namespace wrapper; `repeated` gets
    shlex.join(argv) or a sandbox workload's own command), learn/match.py via profile.repeated,
    jobs/bench.py (`schedcp bench vm-noise`, the CLI user's own command, inside a VM),
    sandbox/toolchain.py (the jail script, arguments as "$@"), verify/compile.py (a fixed bpftool
    line), validate/workloads.py (the sandbox's own benchmark, in the VM), deploy/deployments.py
    (a docstring)."""
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent / "schedcp_mcp"
    hits = subprocess.run(["grep", "-rnE", r"shell=True|sh\", \"-c\"|sh -c", str(root),
                           "--include=*.py"], capture_output=True, text=True).stdout.splitlines()
    where = sorted({re.sub(r":\d+:.*", "", h).split("schedcp_mcp/")[1] for h in hits})
    assert not any("shell=True" in h for h in hits)
    assert where == ["deploy/deployments.py", "deploy/targets.py", "jobs/bench.py", "observe/profile.py",
                     "sandbox/toolchain.py", "validate/workloads.py", "verify/compile.py"], where


# --- Medium: a rolled-back artifact needs a new validation; Low: host rollback needs the opt-in --------

def _active_deployment(target: str, report_id: str):
    from schedcp_mcp import store
    from schedcp_mcp.models import Deployment, MonitorPolicy, ScxState
    from schedcp_mcp.records import save

    d = Deployment(id=store.new_id("dep"), created_at=time.time(), report_id=report_id, artifact_sha256="0" * 64,
                   policy="fifo", params={}, ops_name="fifo", target=target, actor="cli", token_jti="j",
                   previous=ScxState(state="disabled"), baseline=1.0, monitor=MonitorPolicy(metric_cmd="echo 1"))
    save(d)
    return d


@pytest.mark.parametrize("how", ["requested", "degradation"])
def test_a_rolled_back_report_gets_no_new_token(how):
    from test_deploy_rules import validated_report

    from schedcp_mcp.deploy import tokens
    from schedcp_mcp.reports import get_report

    r = validated_report()
    old = tokens.issue(r.id).token  # issued before the deploy went wrong
    d = _active_deployment("sandbox", r.id)  # the staging VM is not running: nothing to unload
    if how == "requested":
        deployments.rollback(d.id, "sandbox", "agent asked", actor="mcp")
    else:
        deployments.end_deployment(d, "rolled_back", "degradation: 1.5x baseline", "monitor")
    assert get_report(r.id).invalidated and not get_report(r.id).passed
    with pytest.raises(Exception, match="invalidated|did not pass"):
        tokens.issue(r.id)
    with pytest.raises(tokens.TokenRefused, match="invalidated"):
        tokens.check(old, "sandbox", "cli", spend=False)


@pytest.mark.parametrize("env", ["", "0"])
def test_an_mcp_client_cannot_roll_back_the_host_without_the_opt_in(env, monkeypatch):
    from test_deploy_rules import validated_report

    from schedcp_mcp.deploy import tokens
    from schedcp_mcp.records import get_deployment

    monkeypatch.setenv("SCHEDCP_ALLOW_HOST_DEPLOY", env)
    d = _active_deployment("host", validated_report().id)
    for who in ({"deployment_id": d.id}, {"target": "host"}):  # by id, or "whatever runs on host"
        with pytest.raises(tokens.TokenRefused, match="no one allowed MCP clients"):
            deployments.rollback(who.get("deployment_id"), who.get("target", "sandbox"), "x", actor="mcp")
    assert get_deployment(d.id).status == "active"


# --- Medium: dedupe keys cover every input and the code of every deciding layer ------------------------

def test_job_keys_cover_the_policies_their_sources_and_every_layers_code(manifest, tmp_path, monkeypatch):
    import shutil

    from schedcp_mcp import candidates, config

    key = candidates._content_key
    assert key("verify", {"policies": ["fifo"]}) != key("verify", {"policies": ["fifo", "vtime_fair"]})
    assert key("verify", {"policies": ["fifo"]}) != key("verify", {"policies": ["vtime_fair"]})
    base_v = key("verify", {"policies": ["fifo"]})
    base_l2 = key("validate", {"policy": "fifo", "workloads": ["hackbench"]})
    repo = tmp_path / "policies"
    shutil.copytree(config.policies_dir(), repo)
    monkeypatch.setenv("SCHEDCP_POLICIES", str(repo))
    src = next((repo / "fifo").glob("*.bpf.c"))
    src.write_text(src.read_text() + "\n/* broken on purpose */ }\n")
    assert key("verify", {"policies": ["fifo"]}) != base_v  # a policy's source changed
    assert key("validate", {"policy": "fifo", "workloads": ["hackbench"]}) != base_l2
    monkeypatch.delenv("SCHEDCP_POLICIES")
    assert key("verify", {"policies": ["fifo"]}) == base_v
    for layer in ("verify/pipeline.py", "validate/gates.py", "sandbox/vm.py"):  # layer 1, layer 2, the VM
        candidates.code_version.cache_clear()
        real = Path(candidates.__file__).parent / layer
        orig = Path.read_bytes

        def changed(p, _real=real, _orig=orig):
            return _orig(p) + (b"# changed" if p == _real else b"")

        monkeypatch.setattr(Path, "read_bytes", changed)
        assert key("validate", {"policy": "fifo", "workloads": ["hackbench"]}) != base_l2, layer
        monkeypatch.setattr(Path, "read_bytes", orig)
    candidates.code_version.cache_clear()
