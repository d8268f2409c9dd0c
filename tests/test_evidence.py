"""Evidence for a loss (validate/evidence.py, the tracer's maps read from real guest output) and the
diagnosis rules that turn it into a change (diagnose.py), on recorded validations
(tests/fixtures/evidence/README.md says where each came from)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schedcp_mcp import diagnose
from schedcp_mcp.validate import evidence, starvation
from schedcp_mcp.validate.models import Layer2Result, WorkloadResult

EV = Path(__file__).parent / "fixtures" / "evidence"


def _ev(run: str, phase: str, side: str, text: str | None = None):
    return evidence.parse(phase, side, text if text is not None else (EV / run / f"{phase}-{side}-0.txt").read_text(),
                          starvation.WINDOW_S if phase == "starvation" else None)


def _l2(run: str, phases: list[str], lost: list[str], speedups: dict[str, float] | None = None,
        **kw) -> Layer2Result:
    evs = [_ev(run, ph, side) for ph in phases for side in ("baseline", "candidate")]
    wl = [WorkloadResult(name=n, metric="m", unit="s", direction="lower", baseline=[1.0], candidate=[2.0],
                         speedup=(speedups or {}).get(n), verdict="worse" if n in lost else "same")
          for n in phases if n != "starvation"]
    return Layer2Result(passed=False, ops_name="fifo", evidence=evs, workloads=wl, **kw)


def test_fifo_on_the_wakeup_probe_sleepers_wait_behind_the_probe_hogs():
    """The recorded wakeup phase under fifo (20 ms slices, no preemption) and the default scheduler."""
    b, c = _ev("fifo", "wakeup", "baseline"), _ev("fifo", "wakeup", "candidate")
    assert c.features()["mean_wait_ms"] > 10 * b.features()["mean_wait_ms"]  # 20 ms vs 1.3 ms
    assert c.p50_ms > 16 and b.p50_ms < 1
    assert c.behind_hogs_ms > 0 and {x.comm for x in c.blockers} == {"schedcp-probe"}
    assert c.cpus and all(x.idle_while_waiting_ms < 0.05 * c.wait_ms for x in c.cpus)  # every CPU busy
    assert c.wakeups and c.edges[0].wakee == "schedcp-probe"


def test_the_default_scheduler_wakes_a_pipe_pair_from_idle_and_fifo_keeps_it_on_one_cpu():
    b, c = _ev("fifo", "pipe", "baseline"), _ev("fifo", "pipe", "candidate")
    # the default: the pair's wakeups run on the target CPU from its idle task (an IPI-queued wakeup)
    assert all(e.waker_pid == 0 for e in b.edges[:4]) and b.behind_idle > 0.9 * b.waits.waits
    # fifo: the peers wake each other directly, often on the same CPU, and wait for each other
    pp = c.pingpong[0]
    assert pp.waker == pp.wakee == "sched-pipe" and pp.wakeups > 10000
    assert pp.cross_cpu < 0.5 * pp.wakeups
    assert c.wait_ms > 5 * b.wait_ms


def test_a_side_is_summarised_in_one_line_and_both_sides_side_by_side():
    b, c = _ev("fifo", "pipe", "baseline"), _ev("fifo", "pipe", "candidate")
    lines = evidence.summary_lines(b, c, {"wakeup_preempts": 7})
    assert lines[0] == "pipe:" and lines[1].startswith("  baseline: ") and lines[2].startswith("  candidate: ")
    assert "ping-pong sched-pipe<->sched-pipe" in lines[2] and "queued on an idle CPU" in lines[1]
    assert lines[3] == "  policy counters: wakeup_preempts 7"


def test_output_from_the_tracer_before_it_had_a_wake_graph_still_reads():
    """Reports and fixtures from the first tracer (tasks and histogram only) parse without the new maps."""
    text = (Path(__file__).parent / "fixtures" / "rqw" / "starve_timer-candidate-0.txt").read_text()
    e = evidence.parse("starvation", "candidate", text, 4.0)
    assert e.error is None and e.waits.starved and e.wakeups == 0 and e.cpus == []
    assert "no evidence" not in e.line()


def test_a_tracer_that_failed_to_load_gives_an_error_not_figures():
    e = evidence.parse("wakeup", "candidate", "@@RQWERR libbpf: failed to load\n@@RQW\n@@RQWEND\n")
    assert e.error and "failed to load" in e.line()
    assert diagnose.diagnose(Layer2Result(passed=False, ops_name="x", evidence=[e]), "fifo") == []


def test_wrapped_workload_runs_are_parsed_per_workload_with_their_window():
    block = (EV / "fifo" / "pipe-candidate-0.txt").read_text()
    t0, t1 = map(float, re.search(r"^@@EVT (\S+) (\S+)$", block, re.M).groups())  # recorded: the window
    out = ("@@S 1.0 candidate-1 enabled fifo 0\n@@EVB pipe\n" + block
           + "@@EVE pipe\n@@EVB wakeup\n@@EVT 13 14\n@@RQW\n[]\n@@RQWEND\n@@EVE wakeup\n")
    evs = evidence.parse_wrapped(out, "candidate")
    assert [e.phase for e in evs] == ["pipe", "wakeup"]
    assert evs[0].seconds == pytest.approx(t1 - t0) and 1 < evs[0].seconds < 30 and evs[0].wakeups > 10000
    assert evs[1].waits.waits == 0 and evs[1].error is None


def test_the_wrapper_attaches_the_tracer_opens_its_window_and_dumps_every_map():
    sh = evidence.wrap("pipe", "run-the-workload\n", "/run/l2/rqw.bpf.o")
    assert sh.index("bpftool prog loadall /run/l2/rqw.bpf.o") < sh.index("value 1 0") < sh.index("run-the-workload") \
        < sh.index("value 0 0") < sh.index("@@EVE pipe")
    # this instance's maps by their pinned paths, never by name (a tracer just detached may linger)
    assert f"pinmaps {starvation.MAP_DIR}" in sh and " name rqw" not in sh
    for m in ("rqw_tasks", "rqw_hist", "rqw_wakes", "rqw_cpus"):
        assert f"map dump pinned {starvation.MAP_DIR}/{m}" in sh


# ---------------------------------------------------------------------------------------- rules

def test_fifo_losing_the_wakeup_probe_is_diagnosed_as_waiting_behind_hogs():
    ds = diagnose.diagnose(_l2("fifo", ["wakeup"], ["wakeup"]), "fifo", {})
    assert [d.rule for d in ds] == ["hog_wait"]
    d = ds[0]
    assert "20.36 ms vs 1.27 ms" in d.evidence and "preempt" in d.reason
    # fifo has no preemption knob: a generated FIFO scheduler with the hog-preemption primitive
    assert d.change.tool == "generate_scheduler"
    s = d.change.spec
    assert (s.queue, s.ordering, s.preempt) == ("builtin_global", "fifo", "hog")
    from schedcp_mcp.synth.spec import check_spec
    assert check_spec(s) == []


def test_fifo_losing_pipe_is_diagnosed_as_a_ping_pong_and_idle_cpus():
    ds = diagnose.diagnose(_l2("fifo", ["pipe"], ["pipe"]), "fifo", {})
    rules = {d.rule: d for d in ds}
    assert set(rules) == {"idle_beside", "sync_pingpong"}
    assert rules["sync_pingpong"].change.spec.cpu_select == "prev_sticky"
    assert rules["idle_beside"].change.spec.preempt == "kick_idle"
    assert "sched-pipe<->sched-pipe" in rules["sync_pingpong"].evidence


def test_a_policy_with_the_knob_is_reconfigured_not_regenerated():
    ds = diagnose.diagnose(_l2("fifo", ["wakeup", "pipe"], ["wakeup", "pipe"]), "lean_preempt",
                           {"preempt": "false", "sync_apart": "false"})
    ch = {d.rule: d.change for d in ds}
    # preemption back on (its default: the change names only what differs from the defaults)
    assert ch["hog_wait"].tool == "reconfigure_policy" and ch["hog_wait"].params == {"sync_apart": "false"}
    # idle CPUs beside the pipe pair and its ping-pong on one CPU ask for the same knob: one change, once
    assert ch["idle_beside"].params == {"preempt": "false"} and "sync_pingpong" not in ch
    assert all(c.policy == "lean_preempt" for c in ch.values())
    # latency_boost's preemption is on: preempt sooner (its preempt_min_ns halved, within range)
    lb = diagnose.diagnose(_l2("fifo", ["wakeup"], ["wakeup"]), "latency_boost", {})
    assert lb[0].change.params == {"preempt_min_ns": "500000"}


def test_a_generated_candidate_is_changed_on_one_axis_of_its_spec():
    first = diagnose.diagnose(_l2("fifo", ["wakeup"], ["wakeup"]), "fifo", {})[0].change.spec
    again = diagnose.diagnose(_l2("fifo", ["wakeup"], ["wakeup"]), None, {}, spec=first)[0].change.spec
    assert again.preempt == "hog" and again.params["hog_burst_ns"] == 2_000_000  # half the default
    assert again.queue == first.queue and again.name != first.name


def test_no_rule_fires_on_a_phase_the_candidate_did_not_lose():
    assert diagnose.diagnose(_l2("fifo", ["wakeup", "pipe"], []), "fifo", {}) == []


def test_a_small_throughput_loss_without_more_preemption_names_no_cause():
    """fifo at a 200 us slice on the cpu workload (0.88x): waits and involuntary switches as under the
    default (the 4 ms tick ends slices anyway): no rule claims a cause it cannot show."""
    assert diagnose.diagnose(_l2("fifo_slice200us", ["cpu"], ["cpu"]), "fifo", {"slice_ns": "200000"}) == []


def test_many_more_involuntary_switches_on_a_lost_throughput_workload_ask_for_a_longer_slice():
    """The recorded cpu phase with the candidate's involuntary switches tripled (per CPU)."""
    text = (EV / "fifo_slice200us" / "cpu-candidate-0.txt").read_text()
    tripled = re.sub(r'("involuntary": )(\d+)(,\s*"idle_since")', lambda m: f"{m[1]}{int(m[2]) * 3}{m[3]}", text)
    assert tripled != text
    l2 = _l2("fifo_slice200us", ["cpu"], ["cpu"])
    l2.evidence[1] = _ev("fifo_slice200us", "cpu", "candidate", tripled)
    ds = diagnose.diagnose(l2, "fifo", {"slice_ns": "200000"})
    assert [d.rule for d in ds] == ["short_slices"]
    assert ds[0].change.params == {"slice_ns": "400000"}


def test_a_starved_task_asks_for_aging_and_a_bound_on_local_priority():
    from schedcp_mcp.validate import gates

    rqw = Path(__file__).parent / "fixtures" / "rqw"
    evs = [evidence.parse("starvation", side, (rqw / f"starve_timer-{side}-0.txt").read_text(), 4.0)
           for side in ("baseline", "candidate")]
    l2 = Layer2Result(passed=False, ops_name="x", evidence=evs,
                      correctness=[gates.starvation_gate([e.waits for e in evs])])
    ds = diagnose.diagnose(l2, "lean_preempt", {})
    assert [d.rule for d in ds] == ["starved"]
    assert ds[0].change.params["lane_max"] == "8" and ds[0].change.params["local_max"] == "1"
    assert diagnose.diagnose(l2, "vtime_fair", {})[0].change.params == {"max_credit_ns": "5000000"}
    assert diagnose.diagnose(l2, "fifo", {})[0].change.spec.ordering == "vtime"


# ---------------------------------------------------------------------------------------- stored

def _stored(l2: Layer2Result, policy="fifo"):
    from schedcp_mcp.reports import new_report, save
    from schedcp_mcp.verify.models import Layer1Report

    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256="0" * 64, ops_name=l2.ops_name)
    r = new_report(l1, policy=policy, params={})
    r.layer2 = l2
    save(r)
    return r


def test_report_evidence_prints_each_phase_both_sides_and_the_wake_graph():
    from click.testing import CliRunner

    from schedcp_mcp.cli import main

    l2 = _l2("fifo", ["wakeup", "pipe"], ["wakeup", "pipe"], counters={"wakeup_preempts": 3})
    r = _stored(l2)
    out = CliRunner().invoke(main, ["report", r.id, "--evidence"])
    assert out.exit_code == 0, out.output
    assert "wakeup:" in out.output and "pipe:" in out.output
    assert out.output.count("  baseline: ") == 2 and out.output.count("  candidate: ") == 2
    assert "policy counters (candidate's measured runs): wakeup_preempts 3" in out.output
    assert "wake graph" in out.output and "sched-pipe[" in out.output
    js = json.loads(CliRunner().invoke(main, ["report", r.id, "--evidence", "--json"]).output)
    assert {(e["phase"], e["side"]) for e in js["evidence"]} == {(p, s) for p in ("wakeup", "pipe")
                                                                for s in ("baseline", "candidate")}


def test_diagnose_report_answers_with_the_evidence_and_the_changes(schedcp_home):
    from schedcp_mcp.server import diagnose_answer

    r = _stored(_l2("fifo", ["wakeup", "pipe"], ["wakeup", "pipe"]))
    a = diagnose_answer(r.id)
    assert a.lost == ["wakeup", "pipe"] and a.candidate == "fifo"
    assert [d.rule for d in a.diagnoses] == ["hog_wait", "idle_beside", "sync_pingpong"]
    assert any(ln.startswith("  candidate: ") for ln in a.evidence)


def test_diagnosing_a_report_without_a_sandbox_run_is_a_clear_error():
    from schedcp_mcp.errors import BadInput
    from schedcp_mcp.reports import new_report
    from schedcp_mcp.server import diagnose_answer
    from schedcp_mcp.verify.models import Layer1Report

    r = new_report(Layer1Report(verdict="accepted", stage="done", source_sha256="0" * 64, ops_name="x"),
                   policy="fifo", params={})
    with pytest.raises(BadInput, match="no sandbox run"):
        diagnose_answer(r.id)


# ---------------------------------------------------------------------------------------- planning

def test_a_plan_of_one_family_gets_a_candidate_of_another():
    from schedcp_mcp.optimize import diverse

    fits = [{"name": "fifo", "score": 3.0, "reason": "won hackbench"},
            {"name": "lean_preempt", "score": 1.0, "reason": "matches latency"}]
    one = [{"policy": "fifo", "params": {}, "strategy": "reconfigure", "why": "a"},
           {"policy": "fifo", "params": {"slice_ns": "5000000"}, "strategy": "reconfigure", "why": "b"}]
    out = diverse(one, fits, 2)
    assert [c["policy"] for c in out] == ["fifo", "lean_preempt"] and "diversity" in out[1]["why"]
    assert diverse(one[:1], fits, 1) == one[:1]  # no room for two: the best alone
    mixed = [one[0], {"policy": "lean_preempt", "params": {}, "strategy": "reconfigure", "why": "c"}]
    assert diverse(mixed, fits, 2) == mixed


def test_plan_versions_link_to_the_plan_they_replace(schedcp_home):
    from schedcp_mcp import plans
    from schedcp_mcp.errors import NotFound
    from schedcp_mcp.observe.profile import WorkloadProfile
    from schedcp_mcp import store

    prof = store.list_records("profile", WorkloadProfile, limit=1)
    if not prof:
        from schedcp_mcp.observe import profile
        prof = [profile.profile_workload(["true"], duration_s=1, use_runqlat=False)]
    pid = prof[0].id
    c = plans.PlannedCandidate(policy="fifo", strategy="reconfigure", why="first")
    p1 = plans.create_plan(pid, ["wakeup"], None, "reconfigure", "first round", [c])
    lesson = plans.Lesson(candidate="fifo", report_id="rep-x", rule="hog_wait", evidence="20 ms vs 1.3 ms",
                          change="reconfigure lean_preempt with preempt=true", next_candidate="lean_preempt")
    c2 = plans.PlannedCandidate(policy="lean_preempt", params={"preempt": "true"}, strategy="reconfigure",
                                why="from fifo: hog_wait")
    p2 = plans.create_plan(pid, ["wakeup"], None, "reconfigure", "second round", [c2], replaces=p1.id,
                           lessons=[lesson])
    assert (p2.version, p2.replaces, p2.lessons[0].rule) == (2, p1.id, "hog_wait")
    assert [p.id for p in plans.plan_versions(p2.id)] == [p2.id, p1.id]
    assert plans.get_plan(p1.id).candidates[0].policy == "fifo"  # the old version stays as it was
    with pytest.raises(NotFound, match="optimization plan"):
        plans.create_plan(pid, ["wakeup"], None, "reconfigure", "x", [c], replaces="plan-nosuch")


def test_a_plain_validation_traces_no_round_optimize_traces_round_one_and_the_knobs_measure_the_tracer(monkeypatch):
    from schedcp_mcp import optimize

    monkeypatch.delenv(evidence.ROUNDS_ENV, raising=False)
    assert not evidence.traced(1, "baseline") and not evidence.traced(1, "candidate")
    env = optimize.server_params(optimize.OptimizeRequest(workloads=["pipe"])).env
    monkeypatch.setenv(evidence.ROUNDS_ENV, env[evidence.ROUNDS_ENV])  # what optimize's server sees
    assert evidence.traced(1, "baseline") and evidence.traced(1, "candidate")
    assert not evidence.traced(2, "candidate") and not evidence.traced(1, "warmup")
    monkeypatch.setenv(evidence.ROUNDS_ENV, "all")
    monkeypatch.setenv(evidence.SIDE_ENV, "again")  # an A/A whose A' side alone carries the tracer
    assert evidence.traced(7, "again") and not evidence.traced(7, "baseline")
    monkeypatch.setenv(evidence.ROUNDS_ENV, "every")
    from schedcp_mcp.errors import BadInput
    with pytest.raises(BadInput, match="SCHEDCP_TRACE_ROUNDS"):
        evidence.traced(1, "again")


# ---------------------------------------------------------------------------------------- the real tracer

@pytest.mark.image
def test_the_tracer_in_the_guest_sees_a_pipe_pair_wake_each_other_and_the_cpus_idle(manifest):
    """The tracer as a validation runs it (`evidence.wrap`), around perf's pipe ping-pong under the
    default scheduler in a real sandbox VM: every map it dumps reads, and the figures are the pair's."""
    from schedcp_mcp.sandbox.vm import VM
    from schedcp_mcp.validate import runner

    with VM(full=True) as vm:
        body = "perf bench sched pipe -l 5000 >/dev/null 2>&1; echo \"@@PIPE $?\"\n"
        out = vm.run(runner.LIB + "mkdir -p $L\n" + evidence.wrap("pipe", body, "rqw.bpf.o"),
                     files={"rqw.bpf.o": starvation.ensure_tracer().read_bytes()}, timeout_s=120).stdout
    assert "@@PIPE 0" in out, out[-2000:]
    (ev,) = evidence.parse_wrapped(out, "baseline")
    assert ev.error is None and ev.seconds and ev.seconds > 0
    assert ev.waits.waits >= 5000 and ev.wakeups >= 5000 and ev.switches >= 10000
    assert {c.cpu for c in ev.cpus} == {0, 1} and ev.idle_ms > 0
    # the pair: perf's two sched-pipe tasks, woken 5000 times each way (the waker may be the idle task
    # of the CPU the wakeup was queued to)
    assert sum(e.wakeups for e in ev.edges if e.wakee == "sched-pipe") >= 5000 or \
        any(p.wakee == "sched-pipe" for p in ev.pingpong)


def test_the_optimize_report_shows_the_chain_from_a_lost_candidate_to_the_next():
    import time as _t

    from schedcp_mcp.optimize import CandidateResult, OptimizeReport, OptimizeRequest, WorkloadFigure, chain_lines

    fig = WorkloadFigure(workload="wakeup", metric="mean_wakeup_latency_us", unit="us", direction="lower",
                         baseline=800.0, candidate=600.0, ratio=0.75, ratio_low=0.6, ratio_high=0.9, noise=0.2,
                         verdict="better")
    lost = CandidateResult(label="fifo", policy="fifo", strategy="reconfigure", why="w", report_id="rep-a",
                           round=1, lost_because=["wakeup:", "  baseline: 5444 waits", "  candidate: 1138 waits"],
                           diagnoses=["hog_wait (wakeup): mean wait 20 ms vs 1.3 ms -> generate fifo_preempt (…)"])
    nxt = CandidateResult(label="rep-b", policy=None, strategy="generate", why="from fifo", report_id="rep-b", round=2,
                          came_from="fifo: hog_wait", passed=True, figures=[fig])
    rep = OptimizeReport(started_at=_t.time(), request=OptimizeRequest(workloads=["wakeup"]), candidates=[lost, nxt],
                         plan_versions=["plan-1", "plan-2"], replans=["after round 1: every candidate failed; …"])
    lines = chain_lines(rep)
    assert lines[0] == "re-planning: plan versions plan-1 -> plan-2"
    i = lines.index("  round 1: fifo: lost")
    assert lines[i + 1] == "    evidence wakeup: 1138 waits" and lines[i + 2].startswith("    -> hog_wait (wakeup)")
    assert lines[i + 3].startswith("  round 2: rep-b (from fifo: hog_wait): passed; wakeup better by 1.33x")
    assert chain_lines(rep.model_copy(update={"plan_versions": ["plan-1"], "replans": []})) == []


def test_a_change_to_a_stored_report_names_only_what_differs_from_the_defaults():
    """A report stores every parameter resolved (bools as 1/0): the change must still compare equal to
    the plan candidate it would be, or the re-plan validates the same thing twice."""
    stored = {"slice_ns": "5000000", "lag_ns": "40000000", "preempt": "1", "preempt_min_ns": "1000000"}
    ch = diagnose.diagnose(_l2("fifo", ["wakeup"], ["wakeup"]), "latency_boost", stored)[0].change
    assert ch.params == {"preempt_min_ns": "500000"}


def test_the_worst_loss_is_diagnosed_first_whatever_the_rule_order():
    """fifo's recorded validation lost wakeup by 0.039x and pipe by 0.34x (rep-b992896483): the wakeup
    diagnosis comes first; with the losses the other way round, pipe's do."""
    l2 = _l2("fifo", ["wakeup", "pipe"], ["wakeup", "pipe"], {"wakeup": 0.039, "pipe": 0.34})
    assert [d.phase for d in diagnose.diagnose(l2, "fifo", {})] == ["wakeup", "pipe", "pipe"]
    l2 = _l2("fifo", ["wakeup", "pipe"], ["wakeup", "pipe"], {"wakeup": 0.7, "pipe": 0.34})
    ds = diagnose.diagnose(l2, "fifo", {})
    assert [d.rule for d in ds] == ["idle_beside", "sync_pingpong", "hog_wait"]
    assert ds[0].loss == pytest.approx(1.0788, abs=1e-3)
