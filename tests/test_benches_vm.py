"""The benchmarks as jobs, measured for real (kept small: one workload, few rounds): `bench policies`
is a validation per policy whose identical twin answers a second run from the cache; `bench aa` is
one job whose table the command prints."""

from __future__ import annotations

import json

import pytest

from schedcp_mcp.jobs import queue
from test_jobs_interfaces import schedcp

pytestmark = pytest.mark.image


def test_bench_policies_runs_a_validation_per_policy_and_a_second_run_is_cached(manifest, tmp_path):
    out = tmp_path / "out"
    args = ("bench", "policies", "--policy", "fifo", "--rounds", "2", "--budget", "0", "--out", str(out))
    first = schedcp(*args, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "speedup vs the default scheduler" in first.stdout and "fifo (1/1)" in first.stdout
    assert "fifo: 2 paired rounds" in first.stdout  # its own interval table
    assert "answered from the cache" not in first.stdout
    md = (out / "policies-ab.md").read_text()
    assert "| fifo |" in md and (out / "policies-ab.png").exists()
    camp = queue.list_jobs(kind="campaign", top_level=True)[0]
    run = next(j for j in queue.list_jobs(parent=camp.id) if j.kind == "validate")
    assert run.state == "succeeded" and run.cached_from is None and run.attempts == 1
    # the same validation as `schedcp validate --policy fifo --rounds 1 --budget 0`: a twin
    second = schedcp(*args, "--json", timeout=120)
    assert second.returncode == 0, second.stderr
    res = json.loads(second.stdout)
    assert res["cached"] == ["fifo"] and res["rows"][0]["report_id"] == run.result["report_id"]
    again = schedcp("validate", "--policy", "fifo", "--rounds", "2", "--budget", "0", "--json", timeout=120)
    assert json.loads(again.stdout)["report_id"] == run.result["report_id"]


def test_bench_aa_is_one_job_and_prints_its_table(manifest):
    p = schedcp("bench", "aa", "--workload", "hackbench", "--rounds", "2", "--budget", "0", timeout=600)
    assert p.returncode in (0, 1), p.stderr
    assert "A/A: default scheduler vs itself, one boot, 2 paired rounds" in p.stdout  # its table
    job = queue.list_jobs(kind="bench_aa")[0]
    assert job.state == "succeeded" and job.result["rounds"] == 2
    assert [w["workload"] for w in job.result["workloads"]] == ["hackbench"]
    assert (p.returncode == 0) == job.result["within_margin"]
    assert "host: other processes used" in p.stdout and job.result["host"]["seconds"] > 0


def test_bench_stability_is_n_validations_each_its_own_boot_and_report(manifest, tmp_path):
    p = schedcp("bench", "stability", "--policy", "fifo", "--runs", "2", "--rounds", "1", "--budget", "0",
                "--out", str(tmp_path), timeout=1200)
    assert p.returncode in (0, 1), p.stderr
    assert "stability of fifo: 2 fresh boots" in p.stdout and "run 2/2: fifo in a fresh boot" in p.stdout
    camp = queue.list_jobs(kind="campaign", top_level=True)[0]
    runs = [j for j in queue.list_jobs(parent=camp.id) if j.kind == "validate"]
    assert len(runs) == 2 and all(j.state == "succeeded" and j.cached_from is None for j in runs)
    assert len({j.result["report_id"] for j in runs}) == 2  # two reports: two measurements
    out = json.loads((tmp_path / "stability-fifo.json").read_text())
    assert out["runs"] == 2 and (p.returncode == 0) == (out["flips"] == 0)
