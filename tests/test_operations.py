"""One typed request and result per operation, the same at every hop: the queue stores the request as
its model writes it, the worker reads it back typed, a row written before the models loads as its
request, and a request of the wrong shape is refused before anything is queued."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from schedcp_mcp import store
from schedcp_mcp.errors import BadInput
from schedcp_mcp.jobs import queue
from schedcp_mcp.jobs.kinds import JobContext
from schedcp_mcp.jobs.models import job_outcome
from schedcp_mcp.operations import TuneRequest, ValidateRequest, ValidateResult, VerifyRequest


def _rewrite(job_id: str, inputs: dict, result: dict | None = None) -> None:
    """Make a job's row what an older schedcp wrote (a plain dict, its own keys and no others)."""
    store.db().execute("UPDATE jobs SET inputs=?, result=?, state=? WHERE id=?",
                       (json.dumps(inputs), json.dumps(result) if result else None,
                        "succeeded" if result else "pending", job_id))


def test_a_job_row_written_in_the_old_shape_loads_as_its_typed_request():
    j = queue.submit("validate", ValidateRequest(policy="fifo"), use_cache=False)
    old = {"node": "validate:fifo[slice_ns=5000000]", "goals": [{"metric": "wall_time_s", "direction": "lower",
                                                                "target_ratio": 1.0}],
           "workloads": ["hackbench"], "rounds": 3, "budget_s": 40, "profile_id": "prof-0123456789",
           "use_cache": True, "candidate": {"policy": "fifo", "params": {"slice_ns": "5000000"},
                                            "report_id": None, "source_sha256": None}}
    _rewrite(j.id, old, {"report_id": "rep-0123456789", "passed": False, "status": "failed: wakeup worse"})
    job = queue.get(j.id)
    req = JobContext(job).request
    assert isinstance(req, ValidateRequest)
    assert (req.budget_s, req.rounds, req.workloads, req.profile_id) == (40, 3, ["hackbench"], "prof-0123456789")
    assert req.goals[0].metric == "wall_time_s" and req.candidate.params == {"slice_ns": "5000000"}
    assert req.report_id is None and req.params == {}  # missing in the old row: the defaults
    assert job.node == "validate:fifo[slice_ns=5000000]"
    assert job.result_as(ValidateResult).report_id == "rep-0123456789"
    assert job_outcome(job) == ("failed", "failed: wakeup worse") and job.passed is False

    v = queue.submit("verify", VerifyRequest(policy="fifo"), use_cache=False)
    _rewrite(v.id, {"policies": ["fifo", "batch"], "target": "sandbox", "actor": "cli"},
             {"reports": [{"report_id": "rep-0123456789-0", "verdict": "accepted", "status": "accepted"},
                          {"report_id": "rep-0123456789-1", "verdict": "rejected", "status": "rejected: x"}]})
    vjob = queue.get(v.id)
    vreq = JobContext(vjob).request
    assert vreq.policies == ["fifo", "batch"] and vreq.actor == "cli" and vreq.use_cache is True
    assert job_outcome(vjob)[0] == "rejected" and "rep-0123456789-1: rejected: x" in job_outcome(vjob)[1]

    t = queue.submit("tune", TuneRequest(name="fifo"), use_cache=False)
    _rewrite(t.id, {"name": "fifo", "workloads": None, "goals": None, "budget_rounds": 6, "budget_s": None,
                    "configs": 4, "space": None, "seed": 0, "actor": "mcp"})
    treq = JobContext(queue.get(t.id)).request
    assert isinstance(treq, TuneRequest) and (treq.budget_rounds, treq.actor) == (6, "mcp")


def test_the_queue_stores_the_request_as_its_model_writes_it_and_refuses_a_wrong_one():
    j = queue.submit("verify", {"policy": "fifo", "params": {"slice_ns": 5000000}}, use_cache=False)
    assert j.inputs == VerifyRequest(policy="fifo", params={"slice_ns": "5000000"}).model_dump(mode="json")
    with pytest.raises(BadInput, match="not a validate request"):
        queue.submit("validate", {"rounds": "many"})
    with pytest.raises(BadInput, match="not a tune request"):
        queue.submit("tune", {"workloads": ["hackbench"]})  # no name
    assert [x.id for x in queue.list_jobs(limit=10)] == [j.id]


def test_tune_budget_flag_is_rounds_and_its_old_spelling_says_so():
    from schedcp_mcp.cli import main

    r = CliRunner().invoke(main, ["tune", "fifo", "--budget", "6", "--background", "--json"])
    assert r.exit_code == 0, r.output
    assert "--budget is deprecated here: it means paired ROUNDS" in r.output
    job = queue.get(json.loads(r.stdout)["job_id"])
    assert job.inputs["budget_rounds"] == 6
    r = CliRunner().invoke(main, ["tune", "fifo", "--budget-rounds", "8", "--background", "--json"])
    assert r.exit_code == 0 and "deprecated" not in r.output
    assert queue.get(json.loads(r.stdout)["job_id"]).inputs["budget_rounds"] == 8
    r = CliRunner().invoke(main, ["tune", "fifo", "--budget", "6", "--budget-rounds", "8", "--background"])
    assert r.exit_code == 2 and "--budget-rounds only" in r.output


def test_optimize_reads_the_observation_and_planning_answers_with_the_servers_models():
    """Through a real stdio server (no VM: the sandbox workload is profiled on this host), the stages'
    client parses every answer it reads with a model (answers.py, or the record's own)."""
    import anyio
    from mcp import ClientSession, stdio_client

    from schedcp_mcp import agents, optimize
    from schedcp_mcp.answers import StatusAnswer
    from schedcp_mcp.plans import OptimizationPlan

    req = optimize.OptimizeRequest(workloads=["pipe"], budget_s=600)
    rep = optimize.OptimizeReport(started_at=0, request=req)

    async def go():
        async with stdio_client(optimize.server_params(req)) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            stage = {role: optimize.Stage(s, role, agents.allowlist(role)) for role in agents.ROLES}
            await optimize.observe(stage["observation"], req, rep, lambda *_: None)
            await optimize.plan(stage["planning"], req, rep, lambda *_: None)
            plan = await stage["execution"].ask("get_plan", OptimizationPlan, {"plan_id": rep.plan_id})
            status = await stage["execution"].ask("get_status", StatusAnswer)
            return plan, status

    plan, status = anyio.run(go)
    assert rep.host_sched_ext is not None and rep.workloads == ["pipe"] and rep.profile_id.startswith("prof-")
    assert rep._workload_rows and {"pipe", "hackbench"} <= set(rep._measures)
    assert rep.plan_versions == [plan.id] and plan.candidates and plan.workloads == ["pipe"]
    # the plan's budget_s is what its validations may spend (the executor holds a round to it)
    assert plan.budget_s == pytest.approx((600 - optimize.DEPLOY_RESERVE_S - req.watch_s) *
                                          optimize.first_share(req, len(optimize.with_guards(["pipe"]))))
    assert status.deployments == []


def test_a_command_queues_the_kinds_it_needs_in_a_process_of_its_own(tmp_path):
    """Kinds are registered by the modules that own them, not found by name: a command run as its own
    process (no test's imports) queues a campaign of validations and its report node."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SCHEDCP_HOME": str(tmp_path)}
    for args in (["bench", "stability", "--policy", "fifo", "--runs", "2", "--background", "--json"],
                 ["bench", "policies", "--policy", "fifo", "--out", str(tmp_path), "--background", "--json"],
                 ["campaign", "--policy", "fifo", "--background", "--json"]):
        p = subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, (args, p.stderr[-2000:])
        assert json.loads(p.stdout)["job_id"].startswith("job-"), p.stdout


def test_every_answer_model_reads_back_what_the_server_sends():
    """A tool's answer drops None fields (answers.answer: exclude_none), so a model a client parses it
    with may not require a field that can be None: optimize's learning stage failed to read a
    Feedback whose policy was None ('policy: Field required')."""
    import importlib
    import inspect
    import typing

    from pydantic import BaseModel

    required_nullable = []
    for m in ("schedcp_mcp.answers", "schedcp_mcp.learn.feedback", "schedcp_mcp.plans", "schedcp_mcp.diagnose",
              "schedcp_mcp.observe.system", "schedcp_mcp.models", "schedcp_mcp.learn.match",
              "schedcp_mcp.repository.policies", "schedcp_mcp.observe.profile", "schedcp_mcp.operations"):
        mod = importlib.import_module(m)
        for name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, BaseModel) and cls.__module__ == m:
                required_nullable += [f"{m}.{name}.{f}" for f, info in cls.model_fields.items()
                                      if info.is_required() and type(None) in typing.get_args(info.annotation)]
    assert not required_nullable
