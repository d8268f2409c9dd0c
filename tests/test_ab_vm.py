"""`schedcp ab --target sandbox` (issue #26 part 2): the candidate in partial mode, the user's command
in paired rounds as SCHED_EXT and SCHED_NORMAL in the staging VM, with a plain FIFO's partial-mode A/A
beside it; nothing stays loaded and every task is back on SCHED_NORMAL."""

from __future__ import annotations

import pytest

from conftest import home_env
from schedcp_mcp import candidates, reports
from schedcp_mcp.deploy import tokens
from schedcp_mcp.deploy.ab import ab
from schedcp_mcp.deploy.targets import SandboxTarget
from schedcp_mcp.sandbox.vm import VM
from schedcp_mcp.validate.models import Layer2Result

pytestmark = pytest.mark.image


def test_ab_prints_paired_intervals_with_the_partial_mode_aa_beside_them(tmp_path_factory, manifest):
    with home_env(tmp_path_factory.mktemp("abhome")):
        try:
            r = candidates.submit(policy="vtime_fair")  # real layer 1
            assert r.passed_layer1, r.layer1.errors
            r.layer2 = Layer2Result(passed=True, ops_name=r.ops_name)  # stand-in: the A/B itself is under test
            reports.save(r)
            tok = tokens.issue(r.id, scope="scoped").token
            res = ab(tok, ["hackbench", "-g", "1", "-l", "10"], "sandbox", rounds=2)
            for w in (res.candidate, res.aa):
                assert w is not None and w.pairs == 2 and w.speedup_low is not None and w.speedup_high is not None
            t = SandboxTarget()
            assert not t.state().enabled  # nothing stays loaded
            tokens.check(tok, "sandbox", spend=False, scoped=True)  # the A/B did not spend the token
        finally:
            VM.stop_named("staging")
