"""Repository evolution: a validated candidate that met its goals becomes a policy that the verifier
accepts; a failed one or a taken name is refused with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from schedcp_mcp import candidates
from schedcp_mcp.errors import BadInput
from schedcp_mcp.learn.contribute import contribute_policy
from schedcp_mcp.observe.profile import Goal
from schedcp_mcp.repository.policies import get_policy

pytestmark = pytest.mark.image


def test_contributed_policy_is_a_valid_policy_the_verifier_accepts(contributed_dir):
    goal = Goal(metric="wall_time_s", direction="lower", target_ratio=2.0, why="test")
    r = candidates.validate(policy="fifo", params={"slice_ns": "5000000"},
                                   workloads=["hackbench"], rounds=3, budget_s=0, goals=[goal]).report
    assert r.passed, r.status
    p = contribute_policy(r.id, "fifo_short_slice", "FIFO with 5 ms slices, for message passing.",
                          ["throughput", "simple"])
    d = contributed_dir / "fifo_short_slice"
    meta = json.loads((d / "policy.json").read_text())
    assert meta["provenance"]["parent_policy"] == "fifo"
    assert meta["provenance"]["report_id"] == r.id
    assert meta["provenance"]["source_sha256"] == r.source_sha256
    assert {q["name"]: q["default"] for q in meta["parameters"]}["slice_ns"] == 5_000_000
    assert get_policy("fifo_short_slice").name == p.name
    # the whole repository, the new policy included, passes the real verifier through the CLI
    out = subprocess.run([sys.executable, "-m", "schedcp_mcp", "verify", "--all-policies", "--json"],
                         capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["passed"] and "fifo_short_slice" in {x["policy"] for x in res["reports"]}
    with pytest.raises(BadInput, match="already exists"):
        contribute_policy(r.id, "fifo_short_slice", "again")


def test_contributing_a_rejected_candidate_is_refused(contributed_dir):
    r = candidates.submit(source="#include <scx/common.bpf.h>\nchar _license[] SEC(\"license\") = "
                                 "\"GPL\";\nint broken( {\n")
    assert not r.passed_layer1
    with pytest.raises(BadInput, match="did not pass"):
        contribute_policy(r.id, "broken_one", "does not compile")
    assert not (contributed_dir / "broken_one").exists()
