"""Layer 2: workload parsers (on real tool output), the gates (on recorded facts), and — marked `vm` —
whole sandbox runs: a stalling scheduler, an erroring one, and a repository policy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import json
import math
import re
import statistics

import pytest

from schedcp_mcp.errors import BadInput
from schedcp_mcp.observe.profile import Goal
from schedcp_mcp.validate import gates
from schedcp_mcp.validate.models import Observations, StateSample, StressSummary
from schedcp_mcp.workloads import (get_workloads, list_workloads, parse, parse_hackbench,
                                            parse_perf_pipe, parse_probe_compile, parse_probe_time,
                                            parse_probe_wakeup, parse_redis_benchmark, parse_stress_ng_cpu,
                                            parse_stress_ng_metrics)

FIXTURES = Path(__file__).parent / "fixtures" / "bpf_l2"

# ---------------------------------------------------------------- outputs captured from the real tools
# (hackbench/perf/stress-ng on this Debian bookworm host; the stress-ng 0.19 one inside the sandbox guest)

HACKBENCH = """Running in process mode with 4 groups using 40 file descriptors each (== 160 tasks)
Each sender will pass 300 messages of 100 bytes
Time: 1.124
"""
PERF_MESSAGING = """# Running 'sched/messaging' benchmark:
# 20 sender and receiver processes per group
# 4 groups == 160 processes run

     Total time: 0.477 [sec]
"""
PERF_PIPE = """# Running 'sched/pipe' benchmark:
# Executed 20000 pipe operations between two processes

     Total time: 0.144 [sec]

       7.243600 usecs/op
         138052 ops/sec
"""
STRESS_NG_HOST = """stress-ng: info:  [18450] setting to a 2 second run per stressor
stress-ng: info:  [18450] dispatching hogs: 2 cpu
stress-ng: metrc: [18450] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s
stress-ng: metrc: [18450]                           (secs)    (secs)    (secs)   (real time) (usr+sys time)
stress-ng: metrc: [18450] cpu                2768      2.00      1.05      0.01      1383.81        2605.69
stress-ng: info:  [18450] successful run completed in 2.01s
"""
STRESS_NG_GUEST = """stress-ng: info:  [885] setting to a 3 secs run per stressor
stress-ng: info:  [885] dispatching hogs: 2 cpu, 2 fork, 1 affinity, 2 switch, 1 sleep
stress-ng: warn:  [885] WARNING! using HPET clocksource (refer to /sys/devices/system/clocksource/clocksource0), this may impact benchmarking performance
stress-ng: metrc: [885] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s
stress-ng: metrc: [885]                           (secs)    (secs)    (secs)   (real time) (usr+sys time)
stress-ng: metrc: [885] cpu                  22      3.38      0.94      0.25         6.52          18.48
stress-ng: metrc: [885] fork                 32      3.14      0.05      0.57        10.20          51.48
stress-ng: metrc: [885] affinity           1886      3.05      0.09      1.63       617.58        1097.49
stress-ng: metrc: [885] switch             1197      3.08      0.03      0.44       388.23        2546.47
stress-ng: metrc: [885] sleep               276      3.04      0.12      0.99        90.80         249.12
stress-ng: info:  [885] skipped: 0
stress-ng: info:  [885] passed: 8: cpu (2) fork (2) affinity (1) switch (2) sleep (1)
stress-ng: info:  [885] failed: 0
stress-ng: info:  [885] successful run completed in 3.49 secs
"""
PROBE_WAKEUP = ('{"samples": 1306, "p50_us": 306.8, "p90_us": 4662.1, "p99_us": 8175.4, "max_us": 19953.8, '
                '"rq_mean_us": 27.13, "rq_p50_us": 41.0, "rq_p90_us": 102.3, "rq_p99_us": 391.5, "rq_max_us": 12858.0, '
                '"hog_loops": 34417, "sleepers": 4, "hogs": 2, "period_us": 2000}\n')

# the redis workload in the sandbox guest (redis 8.0.2 from trixie), and redis 7.0 on this bookworm host
REDIS_GUEST = """"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"GET","7496.25","1.558","0.552","1.383","2.959","4.743","10.375"
"""
REDIS_HOST = """"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"GET","100000.00","0.050","0.008","0.039","0.119","0.327","2.287"
"""
# the compile workload in the guest: make -s prints nothing when the build is clean
COMPILE_GUEST = '{"elapsed_s": 3.767597, "rc": 0}\n'
COMPILE_FAILED = """libfdt/fdt_wip.c:12:10: fatal error: libfdt_env.h: No such file or directory
compilation terminated.
make: *** [Makefile:42: /tmp/tmp.x/libfdt/fdt_wip.o] Error 1
{"elapsed_s": 0.912000, "rc": 2}
"""


def test_parsers_read_real_tool_output():
    assert parse_hackbench(HACKBENCH) == {"messaging_time_s": 1.124}
    assert parse_hackbench(PERF_MESSAGING) == {"messaging_time_s": 0.477}
    assert parse_perf_pipe(PERF_PIPE) == {"pipe_time_s": 0.144, "pipe_usecs_per_op": 7.2436,
                                          "pipe_ops_per_s": 138052.0}
    assert parse_stress_ng_cpu(STRESS_NG_HOST)["cpu_bogo_ops_per_s"] == 1383.81
    rows = parse_stress_ng_metrics(STRESS_NG_GUEST)
    assert set(rows) == {"cpu", "fork", "affinity", "switch", "sleep"}
    assert rows["affinity"] == {"bogo_ops": 1886.0, "real_time_s": 3.05, "bogo_ops_per_s": 617.58}
    w = parse_probe_wakeup(PROBE_WAKEUP)
    # the primary figure is the mean run-queue wait; its tail and deadline → running stay as secondaries
    assert parse(next(x for x in list_workloads() if x.name == "wakeup"), PROBE_WAKEUP)[
        "mean_wakeup_latency_us"] == 27.13
    assert w["p99_wakeup_latency_us"] == 391.5 and w["p50_wakeup_latency_us"] == 41.0
    assert w["p99_timer_wakeup_us"] == 8175.4
    with pytest.raises(ValueError, match="run-queue"):
        parse_probe_wakeup('{"samples": 3, "p50_us": 1, "p90_us": 1, "p99_us": 1, "max_us": 1, "hog_loops": 1}')
    assert parse_probe_time('{"elapsed_s": 0.607890, "rc": 0}\n') == {"build_time_s": 0.60789}
    (compile_, redis) = get_workloads(["compile", "redis"])
    assert parse(compile_, COMPILE_GUEST) == {"compile_time_s": 3.767597}
    r = parse(redis, REDIS_GUEST)
    # the median request latency is the primary figure; p99, the mean, max and requests/s come with it
    assert r == {"redis_p50_latency_ms": 1.383, "redis_p99_latency_ms": 4.743, "redis_p95_latency_ms": 2.959,
                 "redis_avg_latency_ms": 1.558, "redis_max_latency_ms": 10.375, "redis_rps": 7496.25}
    assert parse_redis_benchmark(REDIS_HOST)["redis_p50_latency_ms"] == 0.039


def test_parsers_name_the_problem_in_bad_output():
    with pytest.raises(ValueError, match="hackbench time"):
        parse_hackbench("hackbench: fork failed: Resource temporarily unavailable\n")
    with pytest.raises(ValueError, match="exited with 3"):
        parse_probe_time('{"elapsed_s": 0.002, "rc": 3}\n')
    with pytest.raises(ValueError, match="no cpu stressor"):
        parse_stress_ng_cpu("stress-ng: error: [1] cpu: cannot allocate\n")
    with pytest.raises(ValueError, match="make exited with 2.*libfdt_env.h"):
        parse_probe_compile(COMPILE_FAILED)  # a failed build is an error, not a fast build
    with pytest.raises(ValueError, match="no redis-benchmark CSV header"):
        parse_redis_benchmark("Could not connect to Redis at 127.0.0.1:6399: Connection refused\n")
    with pytest.raises(ValueError, match="no GET row"):
        parse_redis_benchmark(REDIS_GUEST.splitlines()[0] + "\n")


@pytest.mark.parametrize("tool,argv,workload", [
    ("hackbench", ["hackbench", "-g", "1", "-l", "20"], "hackbench"),
    ("perf", ["perf", "bench", "sched", "pipe", "-l", "2000"], "pipe"),
    ("stress-ng", ["stress-ng", "--cpu", "1", "--cpu-method", "int64", "-t", "1", "--metrics-brief"], "cpu"),
])
def test_parsers_read_the_tools_running_on_this_host(tool, argv, workload):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed on this host")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        pytest.skip(f"{tool} cannot run here: {p.stderr.strip()[-200:]}")
    (w,) = get_workloads([workload])
    values = parse(w, p.stdout + p.stderr)
    assert values[w.metric] > 0


def test_every_workload_has_a_metric_direction_and_parser():
    ws = list_workloads()
    assert {w.name for w in ws} == {"hackbench", "pipe", "wakeup", "build", "cpu", "compile", "redis"}
    for w in ws:
        assert w.direction in ("lower", "higher") and w.unit and w.command
    with pytest.raises(BadInput, match="known: hackbench"):
        get_workloads(["nope"])


def test_the_real_workloads_run_only_when_named():
    # a default validation stays affordable: compile and redis cost seconds a run under TCG
    assert [w.name for w in get_workloads(None)] == ["hackbench", "pipe", "wakeup", "build", "cpu"]
    assert [w.name for w in get_workloads(["redis", "compile"])] == ["redis", "compile"]
    from schedcp_mcp.workloads import host_commands

    assert not any("redis" in " ".join(c) or "make" in c for c in host_commands())  # guest-only snippets


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                    reason="redis is not installed on this host")
def test_the_redis_workloads_own_snippet_runs_on_this_host_and_parses():
    (w,) = get_workloads(["redis"])
    p = subprocess.run(["sh", "-c", w.command], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    values = parse(w, p.stdout + p.stderr)
    assert 0 < values["redis_p50_latency_ms"] <= values["redis_p99_latency_ms"] and values["redis_rps"] > 0


def test_probe_built_by_the_sandbox_toolchain_measures_wakeups_on_the_host(manifest):
    from schedcp_mcp.workloads import ensure_probe

    probe = ensure_probe()
    p = subprocess.run([str(probe), "wakeup", "-P", "-t", "2", "-H", "1", "-p", "1000", "-d", "300"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    v = parse_probe_wakeup(p.stdout)
    assert 0 <= v["p50_wakeup_latency_us"] <= v["p99_wakeup_latency_us"] <= v["max_wakeup_latency_us"]
    assert 0 <= v["mean_wakeup_latency_us"] <= v["max_wakeup_latency_us"]
    t = subprocess.run([str(probe), "time", "sh", "-c", "sleep 0.2"], capture_output=True, text=True, timeout=30)
    assert 0.19 < parse_probe_time(t.stdout)["build_time_s"] < 5


# ---------------------------------------------------------------- gates on recorded facts

WL = {w.name: w for w in list_workloads()}
WL["wakeup_tail"] = __import__("schedcp_mcp.validate.runner", fromlist=["x"]).tail_workload(WL["wakeup"])


def _result(name, base, cand):
    return gates.summarize(WL[name], base, cand)


def test_the_interval_is_a_t_interval_on_paired_log_ratios():
    # per-round ratios 0.8, 0.75, 0.8 (hackbench: lower is better, so a speedup of ~1.28)
    r = _result("hackbench", [2.0, 2.0, 2.0], [1.6, 1.5, 1.6])
    logs = [math.log(0.8), math.log(0.75), math.log(0.8)]
    half = 4.302652729911275 * statistics.stdev(logs) / math.sqrt(3)   # t(0.975, 2)
    assert r.pairs == 3 and r.ratio == pytest.approx(math.exp(statistics.fmean(logs)))
    assert r.ratio_low == pytest.approx(math.exp(statistics.fmean(logs) - half))
    assert r.speedup == pytest.approx(1 / r.ratio) and r.speedup_low == pytest.approx(1 / r.ratio_high)
    assert r.verdict == "better" and r.speedup_low > 1
    # higher-is-better: cpu 10 % down in every round, tightly → a confident loss beyond the margin
    higher = _result("cpu", [100, 101, 99], [88, 89, 87])
    assert higher.verdict == "worse" and higher.improvement == pytest.approx(-0.12, abs=0.01)
    failed = gates.summarize(WL["pipe"], [1.0], [], errors=["candidate-1: exit 1"])
    assert failed.verdict == "failed" and failed.ratio is None


def test_pairing_cancels_drift_that_unpaired_spreads_would_call_noise():
    # the host got twice as slow between rounds; each round's candidate was 20 % faster than its baseline
    base, cand = [1.0, 2.0, 4.0, 1.5], [0.8, 1.6, 3.2, 1.2]
    r = _result("build", base, cand)
    assert r.ratio == pytest.approx(0.8) and r.noise == pytest.approx(0.0, abs=1e-9)
    assert r.verdict == "better"


def test_verdicts_better_same_worse_undecided():
    assert gates.classify(1.15, 1.4) == "better"          # a gain beyond the 10 % margin
    assert gates.classify(1.05, 1.4) == "same"            # a gain, but not shown beyond the margin
    assert gates.classify(1.003, 1.03) == "same"          # ... so a 1 % gain does not flip verdicts
    assert gates.classify(0.95, 1.08) == "same"           # no harm beyond the 10 % margin
    assert gates.classify(0.80, 0.88) == "worse"          # all of it beyond the margin
    assert gates.classify(0.70, 1.30) == "undecided"      # straddles the margin: more rounds could decide
    one = _result("wakeup", [1000], [500])                # one pair: no interval
    assert one.speedup_high == math.inf and one.verdict == "undecided"


def test_without_goals_no_workload_may_be_worse_beyond_the_margin():
    ok = _result("hackbench", [2.0, 2.1, 1.9, 2.0], [2.02, 2.1, 1.93, 2.05])  # tight, ~1 % worse
    bad = _result("pipe", [1.0, 1.01, 0.99], [1.3, 1.31, 1.29])
    wide = _result("wakeup", [100, 40, 180], [120, 60, 150])
    g = gates.performance_gates([ok, bad, wide], list_workloads(), None)
    assert [x.passed for x in g] == [True, False, False]
    assert "high end" in g[1].reason and "1/1.3" not in g[1].reason and g[1].decided
    assert not g[2].decided and "undecided" in g[2].reason and "--budget" in g[2].reason
    assert gates.undecided(g) == ["no_regression:wakeup"]


def test_a_pass_with_a_wide_interval_carries_a_warning():
    quiet = _result("hackbench", [2.0, 2.1, 1.9], [2.0, 2.1, 1.9])
    noisy = _result("wakeup", [100, 100, 100, 100], [40, 75, 50, 45])     # better, but ±54 %
    assert noisy.verdict == "better"
    warnings = gates.noise_warnings([quiet, noisy])
    assert len(warnings) == 1 and warnings[0].startswith("wakeup: interval ±") and "--budget" in warnings[0]


def test_goals_map_onto_workloads_in_the_goals_direction():
    wake = _result("wakeup", [1000, 1100, 900], [700, 770, 630])  # 0.7 in every round
    build = _result("build", [2.0, 2.0, 2.1], [1.6, 1.6, 1.68])     # time 0.8 → throughput 1.25
    cpu = _result("cpu", [100, 100, 100], [99, 100, 101])
    goals = [Goal(metric="p99_wakeup_latency_us", direction="lower", target_ratio=0.9),
             Goal(metric="throughput", direction="higher", target_ratio=0.97)]
    g = {x.name: x for x in gates.performance_gates([wake, build, cpu], list_workloads(), goals)}
    assert g["goal:p99_wakeup_latency_us@wakeup"].passed
    assert g["goal:p99_wakeup_latency_us@wakeup"].threshold == pytest.approx(1 / 0.9)
    assert g["goal:throughput@build"].passed and "1.250x" in g["goal:throughput@build"].reason
    assert g["goal:throughput@cpu"].passed  # no-harm goal: the margin applies
    stricter = [Goal(metric="p99_wakeup_latency_us", direction="lower", target_ratio=0.5)]
    (only,) = [x for x in gates.performance_gates([wake], list_workloads(), stricter) if x.name.startswith("goal")]
    assert not only.passed and only.decided and "< 2.000" in only.reason


def test_a_goal_no_workload_measures_fails_with_advice():
    g = gates.performance_gates([_result("cpu", [1.0, 1.0], [1.0, 1.0])], list_workloads(),
                                [Goal(metric="p99_wakeup_latency_us", direction="lower", target_ratio=0.9)])
    assert not g[0].passed and "not measured by any workload" in g[0].reason


def test_goals_do_not_excuse_a_severe_regression_elsewhere():
    wake = _result("wakeup", [1000, 1000, 1000], [500, 510, 490])
    build = _result("build", [1.0, 1.0, 1.0], [3.0, 3.1, 2.9])
    g = gates.performance_gates([wake, build], list_workloads(),
                                [Goal(metric="p99_wakeup_latency_us", direction="lower", target_ratio=0.9)])
    assert {x.name: x.passed for x in g} == {"goal:p99_wakeup_latency_us@wakeup": True,
                                             "no_severe_regression:build": False}


def test_a_target_win_does_not_excuse_harm_to_the_guard_workloads():
    # hackbench 1.5x better (its goal met), but the wakeup probe's tail 3x worse and pipe 1.2x worse:
    # beyond the margin on the guard set, which a scheduler for the whole machine may not harm
    hack = _result("hackbench", [2.0, 2.0, 2.0], [1.3, 1.35, 1.3])
    tail = _result("wakeup_tail", [100, 110, 105], [300, 320, 310])
    pipe = _result("pipe", [1.0, 1.0, 1.0], [1.2, 1.21, 1.19])
    cpu = _result("cpu", [100.0, 100.0, 100.0], [99.0, 100.5, 99.5])
    g = gates.performance_gates([hack, tail, pipe, cpu], list_workloads(),
                                [Goal(metric="messaging_time_s", direction="lower", target_ratio=0.9)])
    assert {x.name: x.passed for x in g} == {"goal:messaging_time_s@hackbench": True, "guard:wakeup_tail": False,
                                             "guard:pipe": False, "guard:cpu": True}
    assert gates.harmed_guards(g) == ["wakeup_tail", "pipe"]
    assert not gates.verdict([], g)[0]


def test_stability_counts_a_flip_per_workload_whose_verdict_changed_and_one_for_pass_fail():
    from schedcp_mcp.bench.validate import count_flips

    steady = {"hackbench": ["better"] * 3, "pipe": ["undecided"] * 3}
    assert count_flips(steady, [False] * 3) == ([], 0)
    shaky = {"hackbench": ["better", "better", "same"], "pipe": ["undecided"] * 3}
    assert count_flips(shaky, [True, False, True]) == (["hackbench"], 2)


def test_only_verdicts_that_cannot_both_be_true_count_as_contradictions():
    from schedcp_mcp.bench.validate import count_contradictions

    compatible = {"pipe": ["better", "same", "same"], "build": ["same", "undecided", "same"]}
    assert count_contradictions(compatible, [True] * 3) == ([], 0)
    harm = {"pipe": ["same", "worse", "same"], "cpu": ["better", "worse", "better"], "wakeup": ["worse"] * 3}
    assert count_contradictions(harm, [True, False, True]) == (["pipe", "cpu"], 3)


def test_policy_counters_are_read_from_bpftool_json():
    from schedcp_mcp.validate.runner import _counter_delta

    out = ("@@C0\n[{\"key\":0,\"value\":{\"wakeup_preempts\":5,\"idle_dispatches\":7}}]\n@@C0END\n"
           "...\n@@C1\n[{\"key\":[\"0x00\"],\"value\":[\"0x00\"],\"formatted\":{\"key\":0,\"value\":"
           "{\"wakeup_preempts\":9,\"idle_dispatches\":17}}}]\n@@C1END\n")
    assert _counter_delta(out) == {"wakeup_preempts": 4, "idle_dispatches": 10}
    assert _counter_delta("no map here") == {}


RQW = Path(__file__).parent / "fixtures" / "rqw"


def _phase(name: str) -> list:
    """The starvation phase's two sides as the guest printed them (recorded in the sandbox, the tracer's
    bpftool map dumps included): `name`'s candidate side and the default scheduler's before it."""
    from schedcp_mcp.validate import starvation

    return [starvation.parse_phase(side, (RQW / f"{name}-{side}-0.txt").read_text())
            for side in ("baseline", "candidate")]


def _clean_obs(**kw) -> Observations:
    base = dict(
        ops_name="fifo", loads=[{"state": "enabled", "ops": "fifo", "error": None}],
        loader_exits=[{"ok": True, "uei": {"kind": 64, "kind_name": "SCX_EXIT_UNREG",
                                           "reason": "unregistered from user space", "message": ""}}],
        kernel_log=['[ 40.01] sched_ext: BPF scheduler "fifo" enabled',
                    '[ 59.79] sched_ext: BPF scheduler "fifo" disabled (unregistered from user space)'],
        timeline=[StateSample(t=41, phase="stress", state="enabled", ops="fifo", nr_rejected=0),
                  StateSample(t=50, phase="candidate-1", state="enabled", ops="fifo", nr_rejected=0)],
        stress=StressSummary(duration_s=6, stressors={"cpu": 296, "fork": 135}, samples=5, rc=0),
        starvation=_phase("lean_preempt"), final_state="disabled", final_ops="")
    base.update(kw)
    return Observations(**base)


def test_a_clean_run_passes_every_correctness_gate():
    g = gates.correctness_gates(_clean_obs())
    assert all(x.passed for x in g), [x for x in g if not x.passed]
    assert gates.verdict(g, [])[0]


def test_a_stall_is_reported_in_the_kernels_words():
    # the kernel log and loader result recorded from the stall fixture in the sandbox
    obs = _clean_obs(
        loads=[{"state": "disabled", "ops": "", "error": "the loader exited at enabled: sched_ext state is "
                "'disabling' after attach, not 'enabled'"}],
        loader_exits=[], stress=None, final_state="disabled",
        kernel_log=['[   21.365319] sched_ext: BPF scheduler "stall" enabled',
                    '[   26.028848] sched_ext: BPF scheduler "stall" disabled (runnable task stall)',
                    '[   26.029914] sched_ext: stall: schedcp-loader[448] failed to run for 4.460s'])
    passed, why = gates.verdict(gates.correctness_gates(obs), [])
    assert not passed and why.startswith("no_stall:")
    assert "runnable task stall" in why and "failed to run for 4.460s" in why


def test_an_error_exit_gives_the_exit_kind_and_message():
    obs = _clean_obs(loader_exits=[{"ok": True, "uei": {
        "kind": 1025, "kind_name": "SCX_EXIT_ERROR_BPF", "reason": "scx_bpf_error",
        "message": "error.bpf.c:33: schedcp test: deliberate error after 5000 context switches"}}])
    passed, why = gates.verdict(gates.correctness_gates(obs), [])
    assert not passed and why.startswith("no_error_exit:")
    assert "SCX_EXIT_ERROR_BPF" in why and "deliberate error after 5000" in why


def test_starving_workers_rejected_tasks_and_a_hung_vm_each_fail_with_a_reason():
    g = {x.name: x for x in gates.correctness_gates(_clean_obs(
        stress=StressSummary(duration_s=6, stressors={"cpu": 10}, samples=5, rc=0,
                             stalled_workers=["stress-ng-sleep[91] (not run once in 2.4 s)"]),
        timeline=[StateSample(t=41, phase="stress", state="enabled", ops="fifo", nr_rejected=3)],
        hang="the guest command did not finish within 90 s; the VM was killed (after candidate-1)"))}
    assert not g["stressors_progressed"].passed and "stress-ng-sleep[91]" in g["stressors_progressed"].reason
    assert not g["nr_rejected_zero"].passed and "nr_rejected = 3" in g["nr_rejected_zero"].reason
    assert not g["vm_responsive"].passed and "did not finish within 90 s" in g["vm_responsive"].reason


def test_a_worker_is_starving_when_its_switch_in_count_stands_still():
    from schedcp_mcp.validate.runner import STALL_S, _longest_standstill

    assert _longest_standstill([(10.0, 5), (10.8, 9), (11.5, 14), (12.3, 20)]) == 0.0
    stuck = [(10.0, 5), (10.8, 9), (11.5, 9), (12.3, 9), (13.1, 9), (13.9, 12)]
    assert _longest_standstill(stuck) == pytest.approx(2.3) and _longest_standstill(stuck) >= STALL_S


CRASH_CONSOLE = """[    8.113240] schedcp-agent: serving on /dev/vport0p1 (idle poweroff: 0s)
[    9.000000] schedcp-l2: begin 1a2b3c4d
[    9.894159] Oops: int3: 0000 [#1] SMP NOPTI
[    9.894159] CPU: 0 UID: 0 PID: 15 Comm: rcu_preempt Not tainted 7.2.13+deb14-cloud-amd64 #1 PREEMPT(lazy)
[    9.894159] Sched_ext: error (enabling+all)
[    9.894159] RIP: 0010:__schedule+0x190/0x1070
[    9.894159] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_a_crashed_guest_is_reported_with_the_kernels_oops():
    from schedcp_mcp.errors import InfrastructureError
    from schedcp_mcp.validate.runner import _hang_reason, _kernel_lines

    old = '[    5.0] sched_ext: BPF scheduler "stall" disabled (runnable task stall)\n'
    lines = _kernel_lines(old + CRASH_CONSOLE, "schedcp-l2: begin 1a2b3c4d")
    assert not any("stall" in ln for ln in lines)  # an earlier validation's lines in the same boot
    run = type("R", (), {})()
    run.obs = Observations(ops_name="error", kernel_log=lines,
                           timeline=[StateSample(t=9, phase="load-1", state="enabled", ops="error")])
    why = _hang_reason(InfrastructureError("the VM closed the agent channel"), run)
    assert why.startswith("the guest kernel crashed (after load-1): ")
    assert "Oops: int3" in why and "Sched_ext: error (enabling+all)" in why
    g = {x.name: x for x in gates.correctness_gates(_clean_obs(kernel_log=lines, hang=why))}
    assert not g["vm_responsive"].passed and not g["kernel_healthy"].passed


# ---------------------------------------------------------------- whole runs in the sandbox VM

@pytest.fixture(scope="module")
def sandbox_vm(manifest):
    from schedcp_mcp.sandbox.vm import VM

    holder = {"vm": VM(full=True).start()}

    def get():
        if not holder["vm"].alive:  # a candidate may take the guest down; the next test gets a fresh one
            holder["vm"].close(graceful=False)
            holder["vm"] = VM(full=True).start()
        return holder["vm"]

    yield get
    holder["vm"].close()


def _layer1(source_path: Path, vm, **kw):
    from schedcp_mcp.verify.pipeline import verify_source

    r = verify_source(source_path.read_text(), vm=vm, **kw)
    assert r.accepted, r.errors
    return r


@pytest.mark.image
def test_a_scheduler_that_never_dispatches_is_caught_as_a_stall(sandbox_vm):
    """Caught at layer 1 already: the loader's settle visits every CPU, so a scheduler that never runs
    a task there stalls the loader itself, and layer 1's watchdog (3 s, as layer 2's) disables it.
    Layer 2's no_stall gate on the same guest output: test_fakevm_flows (recorded)."""
    from schedcp_mcp.verify.pipeline import verify_source

    r = verify_source((FIXTURES / "stall.bpf.c").read_text(), vm=sandbox_vm())
    assert not r.accepted and r.stage == "init", r.errors
    msg = r.errors[0].message
    assert "runnable task stall" in msg and "SCX_EXIT_ERROR_STALL" in msg, msg
    took = float(re.search(r"failed to run for ([0-9.]+)s", msg).group(1))
    assert took < 10, msg  # the 3 s watchdog, not the kernel's 30 s default


@pytest.mark.image
def test_a_scheduler_calling_scx_bpf_error_is_reported_with_its_message(sandbox_vm):
    from schedcp_mcp.validate.runner import validate_layer1

    vm = sandbox_vm()
    res = validate_layer1(_layer1(FIXTURES / "error.bpf.c", vm), rounds=1, budget_s=0, vm=vm,
                          workloads=["hackbench", "wakeup"])
    assert not res.passed
    assert res.failure_reason.startswith("no_error_exit:")
    assert "SCX_EXIT_ERROR_BPF" in res.failure_reason and "deliberate error" in res.failure_reason
    assert res.timeline[-1].state == "disabled"


@pytest.mark.image
@pytest.mark.parametrize("fixture,victim", [("starve_timer", ""), ("starve_kthreads", " (kthread)")])
def test_a_scheduler_that_starves_a_few_tasks_below_the_watchdog_fails_with_them_named(sandbox_vm, fixture, victim):
    from schedcp_mcp.validate.runner import validate_layer1

    vm = sandbox_vm()
    res = validate_layer1(_layer1(FIXTURES / f"{fixture}.bpf.c", vm), rounds=1, budget_s=0, vm=vm,
                          workloads=["hackbench"])
    gate = next(g for g in res.correctness if g.name == "no_starvation")
    assert not res.passed and not gate.passed, gate.reason
    named = re.search(rf"\S+\[\d+\]{re.escape(victim)} waited 250 ms or more (\d+) times", gate.reason)
    assert named and int(named.group(1)) >= 2, gate.reason
    base, cand = res.starvation
    assert (base.side, cand.side) == ("baseline", "candidate") and len(cand.starved) > len(base.starved)


@pytest.mark.image
def test_a_repository_policy_passes_correctness_with_real_ab_figures(sandbox_vm):
    from schedcp_mcp.validate.runner import validate_layer1
    from schedcp_mcp.verify.pipeline import verify_policy

    vm = sandbox_vm()
    l1 = verify_policy("lean_preempt", vm=vm)
    assert l1.accepted, l1.errors
    res = validate_layer1(l1, rounds=2, budget_s=0, vm=vm)
    assert all(g.passed for g in res.correctness), [g for g in res.correctness if not g.passed]
    assert res.rounds == 2 and res.kernel_version and res.kernel_version.startswith("7.")
    for w in res.workloads:
        assert len(w.baseline) == 2 and len(w.candidate) == 2, (w.name, w.errors)
        assert w.ratio and w.ratio > 0 and w.noise is not None
    phases = {s.phase.split("-")[0] for s in res.timeline}
    assert {"baseline", "load", "stress", "candidate", "unload"} <= phases
    # each workload's sides back to back (one switch per workload and round), the stress test after round 1
    phases = [s.phase for s in res.timeline]
    loads = [p for p in dict.fromkeys(phases) if p.startswith("load")]
    # rounds 1 and 2: 3 + 2 loads, each between a workload's two sides, and one for the starvation
    # phase's candidate side (its baseline side runs first, after an unload)
    assert len(loads) == 6, loads
    stress = phases.index("stress")
    assert "candidate-1" in phases[:stress] and "candidate-2" not in phases[:stress] and "candidate-2" in phases
    assert phases.index("starve-baseline") < phases.index("starve-candidate") < stress
    assert res.stress and set(res.stress.stressors) == {"cpu", "fork", "affinity", "switch", "sleep"}
    assert any('"lean_preempt" enabled' in ln for ln in res.kernel_log)
    assert next(g for g in res.correctness if g.name == "no_starvation").passed  # the bounded fast lane
    assert res.durations["total"] > 0 and res.performance  # perf gates judged (pass or fail by the numbers)
    # what else used the host meanwhile; the VM under test (its qemu) is not among the others
    assert res.host and res.host.seconds > 0 and not any(f"[{vm.pid}]" in b for b in res.host.busiest)


@pytest.mark.image
def test_a_policy_is_judged_on_the_real_compile_and_redis_workloads(sandbox_vm):
    from schedcp_mcp.validate.runner import validate_layer1
    from schedcp_mcp.verify.pipeline import verify_policy

    vm = sandbox_vm()
    l1 = verify_policy("fifo", vm=vm)
    assert l1.accepted, l1.errors
    res = validate_layer1(l1, workloads=["compile", "redis"], rounds=2, budget_s=0, vm=vm)
    assert all(g.passed for g in res.correctness), [g for g in res.correctness if not g.passed]
    by = {w.name: w for w in res.workloads}
    assert set(by) == {"compile", "redis"}
    for name, metric in (("compile", "compile_time_s"), ("redis", "redis_p50_latency_ms")):
        w = by[name]
        assert not w.errors, w.errors
        assert w.metric == metric and w.pairs == 2 and len(w.baseline) == 2 and len(w.candidate) == 2
        assert all(0 < x < 60 for x in w.baseline + w.candidate)  # seconds / milliseconds, measured
        assert w.ratio_low is not None and 0 < w.ratio_low <= w.ratio <= w.ratio_high
    secondary = {m.metric for m in by["redis"].secondary}
    assert {"redis_p99_latency_ms", "redis_rps"} <= secondary


def test_rounds_for_margin_is_the_fewest_rounds_whose_interval_fits():
    from schedcp_mcp.validate.tquantile import t_quantile

    from schedcp_mcp.bench.validate import rounds_for

    quiet, noisy = rounds_for(0.03), rounds_for(0.12)
    assert quiet is not None and noisy is not None and 2 <= quiet < noisy
    half = lambda n, sd: t_quantile(0.975, n - 1) * sd / math.sqrt(n)  # noqa: E731
    assert half(noisy, 0.12) <= math.log(1.1) < half(noisy - 1, 0.12)
    assert rounds_for(5.0) is None


def test_an_extra_round_measures_only_the_undecided_workloads_and_only_if_it_fits():
    import time

    from schedcp_mcp.validate import runner

    wls = list_workloads()
    run = runner._Run(None, b"", "x", {}, wls, 3000, lambda m, f: None)
    for w in wls:  # three rounds; every workload clearly equal except pipe, which is all over the place
        b, c = run.samples[w.name]
        for r, (x, y) in enumerate([(1.0, 1.0), (1.0, 1.01), (1.0, 0.99)] if w.name != "pipe"
                                   else [(1.0, 1.6), (1.0, 0.7), (1.0, 1.2)], start=1):
            b[r], c[r] = [x], [y]
        run.cost[w.name] = 1.0
    tb, tc = run.extra["wakeup"].setdefault("tail_wakeup_latency_us", ({}, {}))  # wakeup_tail: equal
    for r in (1, 2, 3):
        tb[r], tc[r] = [100.0], [100.0]
    run.rounds_done = 3
    t0 = time.monotonic()
    assert [w.name for w in runner._next_round(run, None, 90.0, t0, overhead_s=2.0)] == ["pipe"]
    # 2 s overhead + 2 sides x 1 s + the tail: no longer fits 5 s before the budget ends
    assert runner._next_round(run, None, 90.0, t0 - 85.0, overhead_s=2.0) == []
    assert runner._next_round(run, None, 0.0, t0, overhead_s=2.0) == []  # budget 0: exactly --rounds
    # the overhead is per workload: a full round's switches and replies are not charged to a round of one
    full = runner._overhead(run, None, 2 * len(wls) * 1.0 + 2.0 * len(wls))
    assert full == pytest.approx(2.0) and runner._overhead(run, [wls[0]], 2 * 1.0 + 2.0) == pytest.approx(2.0)
    assert runner.reduce_reps([1.0, 9.0, 1.2]) == 1.2  # one far-off run does not move a round's figure
    # hackbench: no harm shown ("same", gate passed) but the interval reaches up to a 1.4x gain — its
    # verdict class is not settled, so while the budget allows it is measured again too
    b, c = run.samples["hackbench"]
    for r, y in enumerate([0.8, 0.95, 0.85], start=1):
        b[r], c[r] = [1.0], [y]
    hb = next(x for x in run.results() if x.name == "hackbench")
    assert hb.verdict == "same" and hb.speedup_high > 1.1 and not gates.settled(hb)
    assert [w.name for w in runner._next_round(run, None, 90.0, t0, overhead_s=2.0)] == ["pipe"]  # undecided first
    assert all(gates.settled(x) for x in run.results() if x.name not in ("hackbench", "pipe"))
    b, c = run.samples["pipe"]  # pipe decided (same, within ±10 %): now hackbench gets the rounds
    for r, y in enumerate([1.0, 1.01, 0.99], start=1):
        b[r], c[r] = [1.0], [y]
    assert [w.name for w in runner._next_round(run, None, 90.0, t0, overhead_s=2.0)] == ["hackbench"]
    b, c = run.samples["wakeup"]  # better, but ±60 %: weak evidence, measured again while it fits
    for r, y in enumerate([0.4, 0.55, 0.47], start=1):
        b[r], c[r] = [1.0], [y]
    wk = next(x for x in run.results() if x.name == "wakeup")
    assert wk.verdict == "better" and wk.noise > gates.NOISY and not gates.settled(wk)
    assert [w.name for w in runner._next_round(run, None, 90.0, t0, overhead_s=2.0)] == ["hackbench", "wakeup"]
    b, c = run.samples["cpu"]  # cpu clearly worse: the validation has failed, nothing to settle
    for r, y in enumerate([0.5, 0.52, 0.49], start=1):
        b[r], c[r] = [1.0], [y]
    assert runner._next_round(run, None, 90.0, t0, overhead_s=2.0) == []


def test_a_warning_early_in_a_long_validation_is_kept_among_dozens_of_routine_load_lines():
    from schedcp_mcp.validate.runner import _kernel_lines

    log = ["[    1.0] MARK", "[    2.0] WARNING: CPU: 1 PID: 7 at kernel/sched/ext.c:123 scx_foo",
           *[f"[ {10 + i}.0] sched_ext: BPF scheduler \"p\" {'enabled' if i % 2 == 0 else 'disabled (unregistered from user space)'}"
             for i in range(200)]]
    kept = _kernel_lines("\n".join(log), "MARK", limit=80)
    assert any("WARNING: CPU" in ln for ln in kept) and len(kept) == 81 and kept[-1] == log[-1]


def test_each_workloads_two_sides_run_back_to_back_in_alternating_order():
    from schedcp_mcp.validate import runner

    wls = get_workloads(None)
    plans = {r: [(side, [w.name for w in group]) for side, group in runner.round_plan(r, wls, ("A", "B"))]
             for r in (1, 2)}
    assert plans[1] == [("A", ["hackbench"]), ("B", ["hackbench", "pipe"]), ("A", ["pipe", "wakeup"]),
                        ("B", ["wakeup", "build"]), ("A", ["build", "cpu"]), ("B", ["cpu"])]
    for r, plan in plans.items():
        seq = [(side, name) for side, names in plan for name in names]
        for w in wls:  # each workload: one figure per side, the two adjacent in time
            i = [k for k, (_, n) in enumerate(seq) if n == w.name]
            assert len(i) == 2 and i[1] == i[0] + 1 and {seq[i[0]][0], seq[i[1]][0]} == {"A", "B"}
    assert plans[2][:2] == [("B", ["hackbench"]), ("A", ["hackbench", "pipe"])]  # ABBA across rounds
    assert len(plans[1]) == len(wls) + 1  # neighbours share a side: one switch per workload


def test_an_unbounded_interval_prints_as_inf_also_after_a_json_round_trip():
    from schedcp_mcp.bench.validate import fmt_interval

    one_pair = _result("hackbench", [2.0], [1.6])
    assert one_pair.speedup_high == math.inf
    assert fmt_interval(one_pair).endswith(", inf] ?")
    as_json = json.loads(one_pair.model_dump_json())  # a job's result: inf became null
    assert fmt_interval(as_json) == fmt_interval(one_pair)


def test_the_tracer_map_dump_names_each_tasks_longest_wait_and_long_waits():
    base, cand = _phase("starve_timer")
    assert base.tasks > 20 and base.waits > 1000 and not base.starved and base.error is None
    assert cand.worst[0].max_ms == max(t.max_ms for t in cand.worst) > 250
    assert cand.starved and all(t.long_waits >= 2 for t in cand.starved)
    assert base.p99_ms and cand.p99_ms and cand.p99_ms >= base.p99_ms


def test_a_scheduler_that_starves_a_minority_below_the_watchdog_fails_with_the_tasks_named():
    sides = _phase("starve_timer")
    g = gates.starvation_gate(sides)
    assert not g.passed
    victim = sides[1].starved[0]
    assert f"{victim.comm}[{victim.pid}]" in g.reason and "250 ms or more" in g.reason
    # the same figures pass for the repository's policy, and the default scheduler's straggler (one long
    # wait, never repeated) does not count
    assert gates.starvation_gate(_phase("lean_preempt")).passed


def test_the_starvation_gate_fails_when_the_phase_or_the_tracer_did_not_run():
    from schedcp_mcp.validate import starvation

    assert not gates.starvation_gate([]).passed
    broken = starvation.parse_phase("candidate", "@@RQWERR libbpf: failed to load\n@@RQW\n@@RQWEND\n")
    g = gates.starvation_gate([_phase("lean_preempt")[0], broken])
    assert not g.passed and "failed to load" in g.reason
    # as many starved tasks as the default scheduler had in the same phase (a host stalling the guest)
    base, cand = _phase("starve_timer")
    assert gates.starvation_gate([cand.model_copy(update={"side": "baseline"}), cand]).passed


def _with_waits(text: str, pid: int, count: int, max_ms: float | None = None) -> str:
    """The recorded dump with task `pid`'s wait count (and longest wait) changed."""
    out = re.sub(rf'("key": {pid},\s*"value": {{[^}}]*?"count": )\d+', rf"\g<1>{count}", text)
    if max_ms is not None:
        out = re.sub(rf'("key": {pid},\s*"value": {{\s*"max_ns": )\d+', rf"\g<1>{int(max_ms * 1e6)}", out)
    assert out != text
    return out


def test_a_few_long_waits_among_many_are_a_busy_host_unless_far_beyond_the_default():
    """Starved = long waits on a large share of a task's wakeups; a CPU hog preempted hundreds of times
    that waited long twice is what the default scheduler itself does on a busy host (A/A, load 4) —
    unless its longest wait is far beyond anything the default scheduler made any task wait."""
    from schedcp_mcp.validate import starvation

    base, _ = _phase("starve_timer")
    text = (RQW / "starve_timer-candidate-0.txt").read_text()
    cand = starvation.parse_phase("candidate", text)
    victim = next(t for t in cand.starved if t.long_waits < 5)  # a task long-delayed at most every time
    assert victim.long_waits >= starvation.SHARE * victim.waits
    many = starvation.parse_phase("candidate", _with_waits(text, victim.pid, 40 * victim.waits))
    assert victim.pid not in [t.pid for t in many.starved]  # now a small share of its waits
    hog = next(t for t in many.worst if t.pid == victim.pid)
    floor = starvation.foreground_max_ms(base)
    assert starvation.starved(hog, floor) == (hog.max_ms > starvation.RELATIVE * floor)
    # the gate: the same task, 2 long waits of many, at 1.5x / at 3x the default's longest wait
    for factor, fails in ((1.5, False), (3.0, True)):
        t2 = _with_waits(text, victim.pid, 40 * victim.waits, max_ms=factor * floor)
        others = [t.pid for t in cand.starved if t.pid != victim.pid]
        for pid in others:  # leave the victim the only candidate for "starved"
            t2 = _with_waits(t2, pid, 1000)
        side = starvation.parse_phase("candidate", t2)
        side = side.model_copy(update={"worst": [t for t in side.worst if t.max_ms <= factor * floor + 1]})
        g = gates.starvation_gate([base, side])
        assert g.passed != fails, (factor, g.reason)
        if fails:
            assert f"[{victim.pid}]" in g.reason and f"of {40 * victim.waits}" in g.reason


def test_a_task_that_asked_to_wait_is_named_but_never_counted_as_starved():
    from schedcp_mcp.validate import starvation

    text = (RQW / "starve_timer-candidate-0.txt").read_text()
    victim = starvation.parse_phase("candidate", text).starved[0]
    # the same waits, but the task runs at nice 19 (as khugepaged does): background by its own request
    niced = re.sub(rf'("key": {victim.pid},\s*"value": {{[^}}]*?"prio": )120', r"\g<1>139", text)
    assert niced != text
    s = starvation.parse_phase("candidate", niced)
    assert victim.pid not in [t.pid for t in s.starved]
    assert any(t.pid == victim.pid and t.nice == 19 for t in s.worst)  # still named among the worst


def test_report_evidence_names_the_starved_tasks_of_a_stored_validation():
    """`schedcp report ID --evidence`: the starvation phase of a stored report, both sides, by task."""
    from click.testing import CliRunner

    from schedcp_mcp.cli import main
    from schedcp_mcp.verify.models import Layer1Report
    from schedcp_mcp.reports import new_report, save
    from schedcp_mcp.validate.models import Layer2Result

    sides = _phase("starve_timer")
    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256="0" * 64, ops_name="starve_timer")
    r = new_report(l1, policy=None, params={})
    r.layer2 = Layer2Result(passed=False, ops_name="starve_timer", starvation=sides,
                            correctness=[gates.starvation_gate(sides)],
                            failure_reason="no_starvation: " + gates.starvation_gate(sides).reason)
    save(r)
    out = CliRunner().invoke(main, ["report", r.id, "--evidence"])
    assert out.exit_code == 0, out.output
    victim = sides[1].starved[0]
    assert "baseline: " in out.output and "candidate: " in out.output
    assert f"starved: {victim.comm}[{victim.pid}]" in out.output
    js = json.loads(CliRunner().invoke(main, ["report", r.id, "--evidence", "--json"]).output)
    assert [s["side"] for s in js["starvation"]] == ["baseline", "candidate"] and not js["passed"]
