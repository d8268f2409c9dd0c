"""The policy repository: metadata of every policy is valid and truthful; search ranks sensibly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from schedcp_mcp import config
from schedcp_mcp.errors import BadInput, NotFound
from schedcp_mcp.repository.policies import get_policy, list_policies, load_all, search_policies

# the shipped policies (the developer's home may hold contributed ones; tests get homes of their own)
OURS = [p for p in load_all()[0] if p.kind == "schedcp" and Path(p.path).parent == config.policies_dir()]
SCX = [p for p in load_all()[0] if p.kind == "scx"]


def test_no_policy_directory_fails_to_load():
    assert load_all()[1] == []


def test_at_least_six_own_policies_with_distinct_algorithms():
    # the shipped ones: a policy contributed by a run (`schedcp optimize`'s learning stage, e.g. fifo
    # with fitted parameters) carries its provenance and may share its parent's algorithm
    shipped = [p for p in OURS if not p.provenance]
    assert len(shipped) >= 6
    assert len({p.algorithm for p in shipped}) == len(shipped)


@pytest.mark.parametrize("p", OURS, ids=lambda p: p.name)
def test_policy_metadata_matches_its_source(p):
    src = p.source_text()
    assert "#include <scx/common.bpf.h>" in src
    assert re.search(r'_license\[\]\s*SEC\("license"\)\s*=\s*"GPL"', src)
    assert "SCX_OPS_DEFINE" in src
    assert re.search(rf'\.name\s*=\s*"{re.escape(p.ops_name)}"', src), "ops_name is the ops .name"
    assert len(p.ops_name) <= 31
    for q in p.parameters:
        assert re.search(rf"const volatile \w+ {q.name}\b", src), f"{q.name} is a const volatile"
        assert q.min is None or q.max is None or q.min <= q.default <= q.max
    assert p.summary and p.description and p.use_cases and p.limitations and p.tags
    assert (p.path and __import__("pathlib").Path(p.path, "README.md").exists())


def test_scx_catalog_lists_production_schedulers():
    names = {p.name for p in SCX}
    assert {"scx_rusty", "scx_lavd", "scx_bpfland", "scx_flash", "scx_cosmos", "scx_layered",
            "scx_p2dq", "scx_tickless"} <= names
    for p in SCX:
        assert p.summary and p.use_cases and p.binary
        assert p.runnable == bool(__import__("shutil").which(p.binary))


def test_search_ranks_latency_policy_first_for_latency_query():
    hits = search_policies("interactive latency wakeup", include_catalog=False)
    assert hits[0].name == "latency_boost"
    assert "latency" in hits[0].reason


def test_search_ranks_batch_first_for_throughput_query():
    hits = search_policies("batch throughput long slices", include_catalog=False)
    assert hits[0].name == "batch"


def test_search_by_tag_filters():
    hits = search_policies("", tags=["locality"], limit=50)
    assert hits and all("locality" in h.tags for h in hits)


def test_search_includes_catalog_and_says_not_runnable():
    hits = search_policies("gaming desktop interactive", limit=20)
    scx = [h for h in hits if h.kind == "scx"]
    assert scx
    for h in scx:
        if not h.runnable:
            assert "not installed" in h.reason


def test_get_policy_unknown_suggests_nearest():
    with pytest.raises(NotFound) as e:
        get_policy("vtime_fiar")
    assert "vtime_fair" in e.value.hint


def test_parameters_are_type_and_range_checked():
    p = get_policy("vtime_fair")
    assert p.resolve_params({"slice_ns": "5000000"})["slice_ns"] == 5_000_000
    with pytest.raises(BadInput, match="out of range"):
        p.resolve_params({"slice_ns": "1"})
    with pytest.raises(BadInput, match="not a u64"):
        p.resolve_params({"slice_ns": "fast"})
    with pytest.raises(BadInput, match="no parameter"):
        p.resolve_params({"nope": "1"})


def test_a_parameter_that_sizes_a_map_must_be_a_usable_map_size():
    from pydantic import ValidationError

    from schedcp_mcp.repository.policies import Parameter, Policy

    ok = Parameter(name="max_cpus", type="u32", default=64, min=1, sizes_map="cpu_enqueues",
                   description="CPUs")
    assert ok.loader_key == "map:cpu_enqueues"
    assert Parameter(name="slice_ns", type="u64", default=1, description="x").loader_key == "slice_ns"
    for bad in (dict(type="bool", default=True), dict(type="u32", default=4),          # min 0 allowed
                dict(type="u64", default=4, min=1)):                                 # > 2^32 allowed
        with pytest.raises(ValidationError, match="sizes map"):
            Parameter(name="n", sizes_map="m", description="x", **bad)
    with pytest.raises(ValidationError, match="size the same map"):
        Policy(name="p", summary="s", description="d", algorithm="a",
               parameters=[ok, ok.model_copy(update={"name": "other"})])
    with pytest.raises(BadInput, match="sizes_map"):
        get_policy("fifo").resolve_params({"map:x": "4"})


def test_a_contribution_lands_in_the_home_and_the_shipped_repository_is_never_written():
    shipped = config.policies_dir()
    before = sorted(p.name for p in shipped.iterdir())
    mine = config.contributed_policies_dir()
    assert mine.parent == config.home() and mine != shipped
    assert {p.name for p in list_policies() if p.kind == "schedcp"} == {p.name for p in OURS}  # empty home
    shutil.copytree(shipped / "fifo", mine / "fifo_mine")
    meta = json.loads((mine / "fifo_mine" / "policy.json").read_text())
    (mine / "fifo_mine" / "policy.json").write_text(json.dumps({**meta, "name": "fifo_mine"}))
    assert get_policy("fifo_mine").path == str(mine / "fifo_mine")
    assert sorted(p.name for p in shipped.iterdir()) == before


def test_a_home_policy_named_like_a_shipped_one_is_refused_unless_it_is_an_unchanged_copy():
    shipped, mine = config.policies_dir(), config.contributed_policies_dir()
    shutil.copytree(shipped / "fifo", mine / "fifo")  # what older wheels seeded homes with
    policies, errors = load_all()
    assert errors == [] and [p.path for p in policies if p.name == "fifo"] == [str(shipped / "fifo")]
    src = next((mine / "fifo").glob("*.bpf.c"))
    src.write_text(src.read_text() + "\n/* changed */\n")
    policies, errors = load_all()
    assert [p.path for p in policies if p.name == "fifo"] == [str(shipped / "fifo")]
    assert len(errors) == 1 and errors[0].path == str(mine / "fifo") and "rename" in errors[0].error
