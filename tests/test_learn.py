"""Learning: outcome history changes ranking; callbacks fire on real conditions and retry."""

from __future__ import annotations


import pytest

from conftest import CallbackReceiver, home_env
from schedcp_mcp.errors import BadInput
from schedcp_mcp.learn import callbacks, history
from schedcp_mcp.learn.history import MetricResult
from schedcp_mcp.observe import profile
from schedcp_mcp.repository.policies import search_policies


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """Two real CPU-hog profiles and one real hackbench profile, in a shared home."""
    home = tmp_path_factory.mktemp("learnhome")
    with home_env(home):
        hog1 = profile.profile_workload(["stress-ng", "--cpu", "2", "--timeout", "2"], duration_s=5,
                                        use_runqlat=False)
        hog2 = profile.profile_workload(["stress-ng", "--cpu", "2", "--timeout", "1"], duration_s=5,
                                        use_runqlat=False)
        hb = profile.profile_workload(["hackbench", "-g", "2", "-l", "300"], duration_s=20,
                                      use_runqlat=False)
    return home, hog1, hog2, hb


def test_similarity_separates_cpu_hogs_from_messaging(profiles):
    _, hog1, hog2, hb = profiles
    assert history.similarity(hog1, hog2) >= history.MIN_SIMILARITY
    assert history.similarity(hog1, hb) < history.MIN_SIMILARITY
    assert history.similarity(hog1, hb) < history.similarity(hog1, hog2)


def test_reward_formula():
    better = MetricResult(metric="t", direction="lower", baseline=2.0, candidate=1.0, ratio=0.5)
    worse = MetricResult(metric="ops", direction="higher", baseline=100, candidate=50, ratio=0.5)
    assert history.reward([better]) == pytest.approx(0.693, abs=1e-3)
    assert history.reward([worse]) == pytest.approx(-0.693, abs=1e-3)
    assert history.reward([better, worse]) == pytest.approx(0.0, abs=1e-9)


def test_good_outcome_raises_policy_for_similar_profile_only(profiles, monkeypatch):
    home, hog1, hog2, hb = profiles
    monkeypatch.setenv("SCHEDCP_HOME", str(home))
    query = "throughput"
    before_hog = [h.name for h in search_policies(query, limit=20, history=history.scorer_for(hog2.id))]
    # the policy that ranked lowest for this query did very well on a CPU hog
    winner = before_hog[-1]
    history.record(history.new_outcome(
        source="external", policy=winner, profile_id=hog1.id,
        metrics=[MetricResult(metric="throughput", direction="higher", baseline=100, candidate=150,
                              ratio=1.5)]))
    after_hog = search_policies(query, limit=20, history=history.scorer_for(hog2.id))
    assert [h.name for h in after_hog].index(winner) < before_hog.index(winner)
    hit = next(h for h in after_hog if h.name == winner)
    assert hit.history_score > 0 and "history" in hit.reason
    # a dissimilar workload's ranking is unchanged by it
    after_hb = search_policies(query, limit=20, history=history.scorer_for(hb.id))
    hb_hit = next(h for h in after_hb if h.name == winner)
    assert hb_hit.history_score == 0


def test_callback_fires_on_real_psi_condition_and_retries_failed_receiver():
    rx = CallbackReceiver(fail_first=2)
    try:
        # threshold -1: CPU PSI some avg10 is always >= 0, so the condition really holds
        cb = callbacks.register(rx.url, callbacks.Condition(kind="psi_cpu_above", threshold=-1))
        fired = callbacks.evaluate_once()
        assert fired == [cb.id]
        assert len(rx.events) == 1 and rx.events[0]["callback_id"] == cb.id
        attempts = sorted(callbacks.deliveries(cb.id), key=lambda d: d.attempt)
        assert [d.ok for d in attempts] == [False, False, True]
        assert attempts[0].status == 500
        # edge-triggered: still true, no second firing
        assert callbacks.evaluate_once() == []
    finally:
        rx.close()


def test_callback_does_not_fire_when_condition_is_false():
    rx = CallbackReceiver()
    try:
        callbacks.register(rx.url, callbacks.Condition(kind="psi_cpu_above", threshold=101))
        assert callbacks.evaluate_once() == []
        assert rx.events == []
    finally:
        rx.close()


def test_callback_urls_are_restricted():
    with pytest.raises(BadInput, match="scheme"):
        callbacks.register("file:///etc/passwd", callbacks.Condition(kind="psi_cpu_above", threshold=1))
    with pytest.raises(BadInput, match="not loopback"):
        callbacks.register("http://192.0.2.1/x", callbacks.Condition(kind="psi_cpu_above", threshold=1))


def test_list_and_remove_callbacks():
    cb = callbacks.register("http://127.0.0.1:9/x", callbacks.Condition(kind="psi_cpu_above",
                                                                         threshold=50))
    assert [c.id for c in callbacks.list_callbacks()] == [cb.id]
    callbacks.remove(cb.id)
    assert callbacks.list_callbacks() == []


def test_a_contributed_raw_source_keeps_the_values_it_was_validated_with():
    """Without a parent policy the report's params become policy.json parameters: a map size a
    `sizes_map` parameter, a const volatile override a parameter of its name."""
    from types import SimpleNamespace

    from schedcp_mcp.learn.contribute import params_from_report
    from schedcp_mcp.repository.policies import Policy

    report = SimpleNamespace(id="rep-1", params={"map:cpu_enqueues": "64", "slice_ns": "5000000",
                                                 "boost": "true", "nice_bias": "-3"})
    params = params_from_report(report)
    pol = Policy(name="c", summary="s", description="d", algorithm="a", parameters=params)
    assert pol.loader_params(None) == {"map:cpu_enqueues": "64", "slice_ns": "5000000", "boost": "1",
                         "nice_bias": "-3"}


def test_a_metric_1010x_worse_is_not_met_and_is_said_so_in_words():
    """Issue #24: feedback printed "met True" for a metric 1010x worse than the default."""
    from schedcp_mcp.learn.feedback import apply_goals
    from schedcp_mcp.models import Goal, MetricResult, in_words

    worse = MetricResult(metric="wakeup_latency_us", direction="lower", baseline=20.0, candidate=20206.0,
                         ratio=1010.3)
    faster = MetricResult(metric="messaging_time_s", direction="lower", baseline=2.8, candidate=2.0,
                          ratio=0.714)
    (w, f) = apply_goals([worse, faster], [])  # no goals: no harm beyond the 10 % margin
    assert w.met is False and w.target_ratio == 1.1 and w.words == "worse by 1010x"
    assert f.met is True and f.words == "better by 1.40x"
    (w, f) = apply_goals([worse, faster], [Goal(metric="messaging_time_s", direction="lower", target_ratio=0.9)])
    assert w.met is None and f.met is True  # a metric no goal names is not judged
    assert in_words(1.0) == "same (1.00x)" and in_words(0.3125) == "worse by 3.20x"
    rate = MetricResult(metric="throughput", direction="higher", baseline=100, candidate=140, ratio=1.4)
    assert rate.words == "better by 1.40x"


def test_a_win_measured_on_one_workload_does_not_rank_a_policy_first_for_a_broader_goal(profiles, monkeypatch):
    """#27: fifo won hackbench-only runs, then ranked first for a five-workload goal and failed wakeup."""
    from schedcp_mcp.workloads import get_workloads

    home, _, _, hb = profiles
    monkeypatch.setenv("SCHEDCP_HOME", str(home))
    one = get_workloads(["hackbench"])[0]
    broad = {w.metric for w in get_workloads(["hackbench", "wakeup", "pipe", "cpu"])}
    history.record(history.new_outcome(
        source="sandbox", policy="batch", profile_id=hb.id,
        metrics=[MetricResult(metric=one.metric, direction=one.direction, baseline=2.0, candidate=1.0, ratio=0.5)]))
    hit = lambda metrics: next(h for h in search_policies("throughput batch", limit=20,  # noqa: E731
                                                          history=history.scorer_for(hb.id, metrics))
                               if h.name == "batch")
    assert hit(None).history_score > 0  # for a hackbench goal the win counts
    assert hit({one.metric}).history_score > 0
    narrow = hit(broad)
    assert narrow.history_score == 0 and "measured on fewer workloads than this goal's, not counted" in narrow.reason
    # a narrow loss still counts against the policy
    history.record(history.new_outcome(
        source="sandbox", policy="batch", profile_id=hb.id,
        metrics=[MetricResult(metric=one.metric, direction=one.direction, baseline=1.0, candidate=2.0, ratio=2.0)]))
    assert hit(broad).history_score < 0
