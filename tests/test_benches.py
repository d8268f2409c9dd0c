"""The sandbox benchmarks as supervised jobs (`schedcp_mcp/bench/runs.py`): their graphs, their dedupe
(a policy's validation is the one `schedcp validate` runs; stability's fresh boots are never
shared), `--background`, and the report nodes, which run once the validations ended however they
ended. No VM boots here: the validations are cancelled before a pool could start them (the report
then says so for every row); the measured runs are in tests/test_benches_vm.py."""

from __future__ import annotations

import json

import pytest
from rich.text import Text

from schedcp_mcp import candidates
from schedcp_mcp.bench import runs as benches
from schedcp_mcp.errors import BadInput, InfrastructureError, NotFound
from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.pool import Pool
from test_jobs_interfaces import schedcp


def nodes(camp) -> dict:
    return {j.inputs["node"]: queue.get(j.id) for j in queue.list_jobs(parent=camp.id)}


def test_policies_campaign_is_one_validation_per_policy_then_a_report(manifest, tmp_path):
    camp = benches.policies_campaign(["fifo", "kernel:scx_simple"], rounds=2, out_dir=tmp_path)
    n = nodes(camp)
    assert set(n) == {"validate:fifo", "validate:kernel:scx_simple", "report"}
    fifo, simple, report = n["validate:fifo"], n["validate:kernel:scx_simple"], n["report"]
    assert fifo.kind == simple.kind == "validate" and fifo.inputs["policy"] == "fifo"
    assert "scx_simple" not in json.dumps(simple.inputs.get("policy")) and "ops" in simple.inputs["source"]
    assert report.kind == "bench_policies_report" and report.join_all
    assert set(report.deps) == {fifo.id, simple.id}
    # the same content key as `schedcp validate --policy fifo --rounds 2`: one answers the other
    alone = candidates.validate_job(policy="fifo", rounds=2)
    assert fifo.dedupe_key is not None and alone.dedupe_key == fifo.dedupe_key
    queue.cancel(camp.id)
    queue.cancel(alone.id)


def test_stability_validations_are_never_shared_or_cached(manifest):
    a = benches.stability_campaign("fifo", runs=3)
    b = benches.stability_campaign("fifo", runs=3)
    runs = [j for c in (a, b) for k, j in nodes(c).items() if k.startswith("run")]
    assert len(runs) == 6 and len({j.id for j in runs}) == 6
    assert all(j.cached_from is None and j.state == "pending" for j in runs)
    assert all(j.kind == "validate" and j.inputs["policy"] == "fifo" and not j.deps for j in runs)
    na = nodes(a)
    assert set(na["report"].deps) == {na[f"run{k}"].id for k in (1, 2, 3)} and na["report"].join_all
    with pytest.raises(BadInput, match="at least 2"):
        benches.stability_campaign("fifo", runs=1)
    with pytest.raises(NotFound, match="no policy named 'no_such_policy'"):
        benches.stability_campaign("no_such_policy")
    for c in (a, b):
        queue.cancel(c.id)


def test_policies_report_runs_after_validations_that_did_not_run(manifest, tmp_path):
    camp = benches.policies_campaign(["fifo", "batch"], out_dir=tmp_path / "out")
    n = nodes(camp)
    for k in ("validate:fifo", "validate:batch"):
        queue.cancel(n[k].id, actor="test")
    with Pool(1, scope=camp.id):
        camp = queue.wait(camp.id, 60)
    assert camp.state == "succeeded"
    res = benches.report_of(camp)
    assert [r["policy"] for r in res["rows"]] == ["fifo", "batch"]
    assert all(r["error"] == "cancelled by test" for r in res["rows"])
    text = Text.from_ansi(res["printed"]).plain
    assert "speedup vs the default scheduler" in text and "error: cancelled by test" in text
    assert "fifo (1/2)" in text and "batch (2/2)" in text
    md = (tmp_path / "out" / "policies-ab.md").read_text()
    assert "| fifo |" in md and "cancelled by test" in md
    assert (tmp_path / "out" / "policies-ab.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "policies-ab.json").read_text())[0]["policy"] == "fifo"
    shown = schedcp("jobs", "show", camp.id)  # a background run's tables: where to read them
    assert shown.returncode == 0 and "speedup vs the default scheduler" in shown.stdout
    assert "\x1b[" not in shown.stdout  # (styles only on a terminal)


def test_stability_report_says_which_run_did_not_finish(manifest):
    camp = benches.stability_campaign("fifo", runs=2)
    for k in ("run1", "run2"):
        queue.cancel(nodes(camp)[k].id, actor="test")
    with Pool(1, scope=camp.id):
        camp = queue.wait(camp.id, 60)
    with pytest.raises(InfrastructureError, match=r"run 1 of fifo did not finish \(cancelled\): cancelled by test"):
        benches.report_of(camp)


@pytest.mark.parametrize("args,kind", [
    (("aa", "--rounds", "2"), "bench_aa"),
    (("synth",), "bench_synth"),
    (("policies", "--policy", "fifo"), "campaign"),
    (("stability", "--policy", "fifo", "--runs", "2"), "campaign"),
])
def test_bench_background_prints_a_job_id(manifest, args, kind):
    p = schedcp("bench", *args, "--background", "--deadline", "600", "--json")
    assert p.returncode == 0, p.stderr
    j = queue.get(json.loads(p.stdout)["job_id"])
    assert j.kind == kind and j.lane == "normal" and j.deadline is not None
    queue.cancel(j.id)


def test_bench_stability_refuses_one_run():
    p = schedcp("bench", "stability", "--policy", "fifo", "--runs", "1")
    assert p.returncode == 2 and "at least 2" in p.stderr
