"""The `schedcp` command as a user runs it: the installed console script in a subprocess, its exit
codes (0 ok, 1 rejected, 2 usage or infrastructure), and output a script can parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "bpf"


def schedcp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m schedcp_mcp` of this interpreter: the code under test, whatever is on PATH."""
    return subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_policy_exits_2_with_a_hint_and_no_traceback():
    p = schedcp("verify", "--policy", "vtime_fiar")
    assert p.returncode == 2
    assert "no policy named 'vtime_fiar'" in p.stderr and "vtime_fair" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_errors_under_json_are_json_on_stdout():
    p = schedcp("verify", "--policy", "vtime_fiar", "--json")
    assert p.returncode == 2
    err = json.loads(p.stdout)["error"]
    assert err["kind"] == "NotFound" and "vtime_fiar" in err["message"] and "vtime_fair" in err["hint"]


def test_bad_parameter_value_exits_2_naming_the_allowed_range():
    p = schedcp("verify", "--policy", "fifo", "--param", "slice_ns=fast")
    assert p.returncode == 2 and "slice_ns" in p.stderr


def test_usage_errors_under_json_are_json_too():
    p = schedcp("verify", "--policy", "fifo", "--param", "no-equals-sign", "--json")
    assert p.returncode == 2
    err = json.loads(p.stdout)["error"]
    assert err["kind"] == "UsageError" and "NAME=VALUE" in err["message"]


def test_a_rejected_source_exits_1_with_the_reason_in_json():
    p = schedcp("verify", str(FIXTURES / "include_passwd.bpf.c"), "--json")
    assert p.returncode == 1, p.stderr
    r = json.loads(p.stdout)
    assert (r["verdict"], r["stage"]) == ("rejected", "source_check")
    assert any("/etc/passwd" in e["message"] for e in r["errors"])
    assert r["report_id"]


def test_host_target_on_a_host_without_sched_ext_exits_2_and_points_at_the_sandbox():
    if Path("/sys/kernel/sched_ext/state").exists():
        pytest.skip("this host kernel has sched_ext")
    p = schedcp("verify", "--policy", "fifo", "--target", "host", "--json")
    assert p.returncode == 2
    err = json.loads(p.stdout)["error"]
    assert "no sched_ext" in err["message"] and "--target sandbox" in err["hint"]


def test_policies_list_json_is_the_repository():
    p = schedcp("policies", "list", "--json")
    assert p.returncode == 0, p.stderr
    names = {x["name"] for x in json.loads(p.stdout)}
    assert {"fifo", "vtime_fair", "latency_boost"} <= names


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    """`schedcp policies list | head -1`: the reader closes the pipe before schedcp has written; schedcp
    stops quietly, without an 'internal error' (`true` closes it before schedcp has even started writing;
    0 when the write failed inside a command, 1 when click's own flush at exit met the closed pipe)."""
    import subprocess
    import sys

    for cmd in ("policies list", "jobs --all"):
        p = subprocess.run(f"{sys.executable} -m schedcp_mcp {cmd} | true; exit ${{PIPESTATUS[0]}}",
                           shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
        assert p.returncode in (0, 1) and "error" not in p.stderr and "Traceback" not in p.stderr, (cmd, p.stderr)
