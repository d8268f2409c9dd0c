"""Synthesis without a VM: the primitive catalog, spec checks (refused before rendering, saying which
and why), rendering, the matrix, patch application and reconfigure's range checks; CLI and MCP
surfaces of the refusals. The kernel-verifier side is in test_synth_vm.py."""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from schedcp_mcp import store
from schedcp_mcp.errors import BadInput
from schedcp_mcp.models import Goal
from schedcp_mcp.synth import primitives as prims
from schedcp_mcp.synth.generate import generate
from schedcp_mcp.synth.matrix import matrix
from schedcp_mcp.synth.reconfigure import reconfigure
from schedcp_mcp.synth.render import render
from schedcp_mcp.synth.revise import PatchRefused, apply_patch, revise
from schedcp_mcp.synth.spec import EXAMPLE_SPEC, SpecRefused, catalog, validate_spec
from schedcp_mcp.verify.source_check import check_source

ROOT = Path(__file__).resolve().parent.parent


def schedcp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "schedcp_mcp", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def refused(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecRefused) as e:
        validate_spec(spec)
    return {p.field: p.message for p in e.value.problems}


def nothing_stored() -> bool:
    return not store.ids("candidate") and not store.ids("report")


# ---------------------------------------------------------------- catalog

def test_every_primitive_is_documented_with_typed_ranged_knobs():
    c = catalog()
    for axis in c.axes:
        assert prims.names(axis), f"no primitives on axis {axis}"
    for p in c.primitives:
        assert p.what and p.when and p.fails, p.name
        for k in p.params:
            assert k.description and k.type in ("u64", "u32", "bool")
            if k.type != "bool":
                assert k.min is not None and k.max is not None and k.min <= k.default <= k.max
    # the primitives, by name
    assert set(prims.names("queue")) == {"global", "builtin_global", "per_cpu", "per_llc", "per_numa"}
    assert set(prims.names("ordering")) == {"fifo", "vtime", "deadline"}
    assert set(prims.names("cpu_select")) == {"default", "builtin", "prev_sticky", "llc_first", "idle_core",
                                              "sync_waker"}
    assert set(prims.names("slice")) == {"fixed", "scaled", "interactive"}
    assert set(prims.names("preempt")) == {"none", "kick_idle", "wakeup", "hog"}
    assert set(prims.names("task_class")) == {"kthread", "short_lived", "comm", "cgroup"}
    validate_spec(c.spec_example)  # the example an agent copies is itself valid


# ---------------------------------------------------------------- spec refusals

def test_unknown_primitive_is_refused_with_the_choices_and_a_suggestion():
    why = refused({"name": "x1", "queue": "per_cpus"})
    assert "per_cpus" in why["queue"] and "did you mean 'per_cpu'" in why["queue"]
    assert "global, builtin_global, per_cpu, per_llc, per_numa" in why["queue"]


def test_incompatible_combinations_are_refused_saying_why():
    why = refused({"name": "x1", "ordering": "fifo", "preempt": "wakeup"})
    assert "fifo ordering has none" in why["preempt"]
    why = refused({"name": "x1", "ordering": "fifo",
                   "classes": [{"match": "comm", "pattern": "make", "treat": "background"}]})
    assert "background needs ordering vtime or deadline" in why["classes[0].treat"]
    why = refused({"name": "x1", "classes": [{"match": "comm", "pattern": "make", "treat": "local"}]})
    assert "only for kthread" in why["classes[0].treat"]
    why = refused({"name": "x1", "queue": "per_cpu", "preempt": "kick_idle", "params": {"steal": False}})
    assert "steal" in why["preempt"]
    why = refused({"name": "x1", "queue": "builtin_global", "ordering": "vtime", "queued_wakeup": True})
    assert "FIFO only" in why["ordering"] and "cpu_select builtin" in why["queued_wakeup"]
    why = refused({"name": "x1", "ordering": "deadline", "preempt": "wakeup",
                   "params": {"slice_ns": 1_000_000, "preempt_min_ns": 2_000_000}})
    assert "ever have run long enough" in why["params.preempt_min_ns"]


def test_out_of_range_and_unknown_knobs_are_refused_naming_range_and_owner():
    why = refused({"name": "x1", "params": {"slice_ns": 5}})
    assert "slice_ns=5 is out of range" in why["params.slice_ns"] and "100000" in why["params.slice_ns"]
    why = refused({"name": "x1", "queue": "global", "params": {"steal_min": 2}})
    assert "belongs to queue per_cpu" in why["params.steal_min"]
    why = refused({"name": "x1", "queue": "per_cpu", "params": {"steal": 3}})
    assert "is a bool" in why["params.steal"]


def test_patterns_and_text_that_would_escape_the_c_source_are_refused():
    why = refused({"name": "x1", "classes": [{"match": "comm", "pattern": 'a"; } int evil() { "'}]})
    assert "pattern" in why["classes[0].pattern"]
    assert "description" in refused({"name": "x1", "description": "nice */ int x; /*"})
    assert "name" in refused({"name": "X; drop"})
    assert "unknown field" in refused({"name": "x1", "queues": "global"})["queues"]


def test_a_bad_spec_is_refused_before_rendering_or_storing_anything(monkeypatch):
    import schedcp_mcp.synth.render as r

    monkeypatch.setattr(r, "_env", lambda: pytest.fail("rendered a refused spec"))
    with pytest.raises(SpecRefused):
        generate({"name": "x1", "ordering": "fifo", "preempt": "wakeup"})
    assert nothing_stored()


# ---------------------------------------------------------------- rendering and the matrix

def test_rendered_source_reads_like_a_policy():
    r = render(EXAMPLE_SPEC)
    src = r.source
    assert src.startswith("/* SPDX-License-Identifier: GPL-2.0 */")
    assert "#include <scx/common.bpf.h>" in src and 'SEC("license") = "GPL"' in src
    head = src[:src.index("#include")]
    for text in ("Works well:", "Fails:", "deadline:", '"preempt":"wakeup"', "gen_latency"):
        assert text in head
    assert "const volatile u64 slice_ns = 3000000ULL;" in src  # the spec's value, as a knob
    assert "const volatile u64 preempt_min_ns = 500000ULL;" in src
    assert src.rstrip().endswith('.name\t\t\t= "gen_latency");')  # the ops table is last
    tail = src[src.index("SCX_OPS_DEFINE(gen_latency_ops"):]
    assert "{" not in tail and ".enqueue" in tail and ".running" in tail
    assert check_source(src) == []  # layer 1's untrusted-source checks pass
    assert r.params["slice_ns"] == "3000000" and render(EXAMPLE_SPEC).source == src  # deterministic


def test_lean_preempts_mechanisms_render_to_a_one_callback_scheduler():
    """The repository's winner (lean_preempt) as a spec: only enqueue and exit, the kernel's global
    FIFO, hog preemption, queued wakeups — generation can reach it."""
    from schedcp_mcp.synth.spec import LEAN_SPEC

    src = render(LEAN_SPEC).source
    table = src[src.index("SCX_OPS_DEFINE("):]
    assert ".enqueue" in table and ".exit" in table and "SCX_OPS_ALLOW_QUEUED_WAKEUP" in table
    for cb in (".select_cpu", ".dispatch", ".init", ".running"):
        assert cb not in table
    assert "SCX_DSQ_GLOBAL" in src and "sum_exec_runtime / (1 + t->nvcsw)" in src
    assert "SCX_ENQ_PREEMPT" in src and check_source(src) == []


def test_the_matrix_covers_every_choice_and_every_pair_of_axes():
    specs = matrix()
    assert len(specs) >= 24
    for s in specs:
        validate_spec(s)
    for axis in ("queue", "ordering", "cpu_select", "slice", "preempt"):
        assert {getattr(s, axis) for s in specs} == set(prims.names(axis)), axis
    assert {(s.queue, s.preempt) for s in specs} >= {("per_numa", "wakeup"), ("per_cpu", "kick_idle"),
                                                     ("builtin_global", "hog")}
    assert any(s.queued_wakeup for s in specs)
    assert {c.match for s in specs for c in s.classes} == set(prims.names("task_class"))
    assert len({s.name for s in specs}) == len(specs)


def test_generated_sources_compile(manifest):
    from schedcp_mcp.verify.compile import compile_source

    # one of each queue, with the most classes (the heaviest feature mixes)
    picked = {}
    for s in sorted(matrix(), key=lambda s: -len(s.classes)):
        picked.setdefault(s.queue, s)
    assert len(picked) == 5
    for s in picked.values():
        c = compile_source(render(s).source, manifest)
        assert c.ok, (s.name, [e.message for e in c.errors])


# ---------------------------------------------------------------- revise and reconfigure

def fifo_source() -> str:
    return (ROOT / "policies/fifo/fifo.bpf.c").read_text()


def diff(old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "a/fifo.bpf.c",
                                        "b/fifo.bpf.c"))


def test_a_patch_applies_to_a_copy():
    src = fifo_source()
    new = src.replace("20000000ULL", "4000000ULL")
    assert apply_patch(src, diff(src, new)) == new
    assert fifo_source() == src  # the policy itself is untouched


def test_a_patch_that_does_not_apply_is_refused_with_the_failing_hunk():
    src = fifo_source()
    stale = diff(src.replace("const volatile u64 slice_ns", "const volatile u64 slice_len"),
                 src.replace("const volatile u64 slice_ns", "const volatile u64 slice_len").replace(
                     "20000000ULL", "4000000ULL"))
    with pytest.raises(PatchRefused) as e:
        revise("fifo", stale)
    assert "Hunk #1 FAILED" in e.value.message
    assert "+const volatile u64 slice_len = 4000000ULL;" in e.value.failed_hunks
    assert "slice_len" in e.value.hint  # the failing hunk is shown to whoever sent it
    with pytest.raises(PatchRefused, match="not a unified diff"):
        revise("fifo", "replace line 3 with foo")
    two = diff(src, src + "\n") + diff(src, src + "\n").replace("fifo.bpf.c", "other.c")
    with pytest.raises(PatchRefused, match="changes 2 files"):
        revise("fifo", two)
    assert nothing_stored()


def test_reconfigure_refuses_out_of_range_and_unknown_parameters_before_any_build():
    with pytest.raises(BadInput, match=r"slice_ns=5 is out of range") as e:
        reconfigure("fifo", {"slice_ns": 5})
    assert "100000" in e.value.hint
    with pytest.raises(BadInput, match="has no parameter 'slice'"):
        reconfigure("fifo", {"slice": 5_000_000})
    with pytest.raises(BadInput, match="no parameters given"):
        reconfigure("fifo", {})
    assert nothing_stored()


# ---------------------------------------------------------------- CLI and MCP

def test_cli_primitives_prints_the_catalog_and_an_example_spec_generate_accepts():
    p = schedcp("primitives")
    assert p.returncode == 0, p.stderr
    assert "per_llc" in p.stdout and "Traceback" not in p.stderr
    example = next(line for line in p.stdout.splitlines() if line.startswith("example spec: "))
    spec = json.loads(example.removeprefix("example spec: "))
    assert validate_spec(spec).name == spec["name"]  # what `schedcp generate` takes, as printed


def test_cli_primitives_json_and_refusals_exit_2_with_json_errors(tmp_path):
    p = schedcp("primitives", "--json")
    assert p.returncode == 0, p.stderr
    assert {x["name"] for x in json.loads(p.stdout)["primitives"]} >= {"per_llc", "sync_waker"}

    p = schedcp("generate", "-", "--json", stdin=json.dumps({"name": "x1", "slice": "elastic"}))
    assert p.returncode == 2
    err = json.loads(p.stdout)["error"]
    assert "slice: unknown slice primitive 'elastic'" in err["message"]

    p = schedcp("reconfigure", "fifo", "--param", "slice_ns=5", "--json")
    assert p.returncode == 2 and "out of range" in json.loads(p.stdout)["error"]["message"]

    bad = tmp_path / "bad.patch"
    src = fifo_source()
    bad.write_text(diff(src.replace("char _license", "char _licence"), src.replace("char _license",
                                                                                   "char _lic")))
    p = schedcp("revise", "fifo", str(bad))
    assert p.returncode == 2 and "Hunk #1 FAILED" in p.stderr and "Traceback" not in p.stderr

    p = schedcp("tune", "fifo", "--workload", "hackbench", "--space", "slice_len=1,2", "--json")
    assert p.returncode == 2 and "slice_len" in json.loads(p.stdout)["error"]["message"]




@pytest.mark.anyio
async def test_mcp_lists_primitives_and_refuses_a_bad_spec_as_a_tool_error():
    import os

    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=["-m", "schedcp_mcp", "serve"], env={
        "SCHEDCP_HOME": os.environ["SCHEDCP_HOME"], "SCHEDCP_SANDBOX_DIR": os.environ["SCHEDCP_SANDBOX_DIR"],
        "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)})  # this checkout's server

    async def call(name: str, args: dict | None = None):
        async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            return await s.call_tool(name, args or {})

    res = await call("list_primitives")
    assert not res.is_error
    assert "per_numa" in {p["name"] for p in res.structured_content["primitives"]}
    res = await call("generate_scheduler", {"spec": {"name": "x1", "ordering": "fifo",
                                                     "preempt": "wakeup"}})
    assert res.is_error
    text = res.content[0].text
    assert "preempt" in text and "fifo ordering has none" in text and "Traceback" not in text


# ---------------------------------------------------------------- tuning (no VM: the search's parts)

def test_candidate_set_starts_from_defaults_stays_in_range_and_takes_warm_starts():
    from schedcp_mcp.repository.policies import get_policy
    from schedcp_mcp.synth.tune import candidate_set

    knobs = get_policy("latency_boost").parameters
    cs = candidate_set(knobs, 6, warm=[{"slice_ns": "3000000"}])
    assert cs[0] == {k.name: int(k.default) for k in knobs}
    assert cs[1]["slice_ns"] == 3_000_000  # the earlier best comes right after the defaults
    assert len({json.dumps(c, sort_keys=True) for c in cs}) == 6
    for c in cs:
        for k in knobs:
            k.check(c[k.name])  # every value within its policy.json range
    # moves cover different knobs before repeating one
    changed = [next(n for n in c if c[n] != cs[0][n]) for c in cs[2:5]]
    assert len(set(changed)) == 3
    only = candidate_set(knobs, 5, space={"slice_ns": [2_000_000, 4_000_000]})
    assert {c["slice_ns"] for c in only} == {5_000_000, 2_000_000, 4_000_000}


def test_compare_gives_an_interval_on_the_winner_over_the_defaults():
    import math

    from schedcp_mcp.synth.tune import compare

    same = [math.log(1.2), math.log(1.25), math.log(1.18)]
    better = [math.log(1.5), math.log(1.55), math.log(1.45)]
    ratio, low, high = compare(better, same)
    assert 1.2 < ratio < 1.3 and 1.0 < low < ratio < high
    ratio, low, high = compare(same, same)
    assert low < 1.0 < high and abs(ratio - 1) < 1e-9
    assert compare(better[:1], same) is None


def test_tune_refuses_bad_input_before_booting_anything():
    from schedcp_mcp.synth.tune import tune

    with pytest.raises(BadInput, match="unknown workload"):
        tune("fifo", ["hackbnech"])
    with pytest.raises(BadInput, match="not measured by the chosen workloads"):
        tune("fifo", ["hackbench"], goals=[Goal(metric="p99_wakeup_latency_us", direction="lower",
                                               target_ratio=0.9)])
    with pytest.raises(BadInput, match="unknown or untunable"):
        tune("fifo", ["hackbench"], space={"slice": [1]})
    with pytest.raises(BadInput, match="no parameters to tune|scx scheduler"):
        tune("scx_rusty")
    assert nothing_stored()
