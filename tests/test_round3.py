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
