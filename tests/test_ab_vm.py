"""A/B by switching the workload's class (issue #26 part 2), through the MCP server's `ab_test` over a
real stdio client: the candidate in partial mode, the user's command in paired rounds as SCHED_EXT and
SCHED_NORMAL in the staging VM, with a plain FIFO's partial-mode A/A beside it; progress is reported,
nothing stays loaded, every task is back on SCHED_NORMAL and the token is not spent. (`schedcp ab`
calls the same deploy.ab.ab.)"""

from __future__ import annotations

import anyio
import pytest

from schedcp_mcp import candidates, reports
from schedcp_mcp.deploy import tokens
from schedcp_mcp.deploy.targets import SandboxTarget
from schedcp_mcp.sandbox.vm import VM
from schedcp_mcp.validate.models import Layer2Result
from test_mcp_stdio import call

pytestmark = pytest.mark.image


def test_ab_test_gives_paired_intervals_with_the_partial_mode_aa_beside_them(manifest):
    try:
        r = candidates.submit(policy="vtime_fair")  # real layer 1
        assert r.passed_layer1, r.layer1.errors
        r.layer2 = Layer2Result(passed=True, ops_name=r.ops_name)  # stand-in: the A/B itself is under test
        reports.save(r)
        tok = tokens.issue(r.id, scope="scoped").token
        seen: list[tuple[float, str | None]] = []

        async def progress(done, total, message):
            seen.append((done, message))

        res = anyio.run(call, "ab_test", {"token": tok, "command": ["hackbench", "-g", "1", "-l", "10"],
                                          "rounds": 2}, progress)
        assert not res.is_error, res.content
        out = res.structured_content
        for side in ("candidate", "aa"):
            w = out[side]
            assert w["pairs"] == 2 and w["speedup_low"] is not None and w["speedup_high"] is not None, out
        assert "SCHED_EXT vs SCHED_NORMAL" in res.content[0].text and "A/A" in res.content[0].text
        msgs = [m or "" for _, m in seen]
        assert any(m.startswith("candidate: round 2/2") for m in msgs) and any(m.startswith("A/A:") for m in msgs)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # progress only moves forward
        assert not SandboxTarget().state().enabled  # nothing stays loaded
        tokens.check(tok, "sandbox", spend=False, scoped=True)  # the A/B did not spend the token
    finally:
        VM.stop_named("staging")
