"""What is generated (`python -m schedcp_mcp.docs`) matches its source: the references in docs/ (the
CLI's `--help` of every command and the MCP server's tool registry) and each policy's policy.json
descriptions and README top (its header comment). A command, option, tool or header that changed
without the files being regenerated fails here, with the diff."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from schedcp_mcp import config, docs

ROOT = Path(__file__).resolve().parent.parent


def test_generated_references_match_the_code():
    stale = docs.drift()
    assert not stale, ("generated files are stale; run `python -m schedcp_mcp.docs` and commit the "
                       "result:\n" + "\n".join(stale.values())[:4000])


def test_the_cli_reference_has_every_command_and_the_mcp_reference_every_tool():
    from schedcp_mcp.cli import main
    from schedcp_mcp.server import server

    cli_md, mcp_md = (ROOT / "docs" / "cli.md").read_text(), (ROOT / "docs" / "mcp.md").read_text()
    for path, _ in docs._commands(main, ("schedcp",)):
        assert f"\n## {' '.join(path)}\n" in cli_md
    assert "\n## schedcp jobs show\n" in cli_md  # subcommands of groups too
    for tool in docs._tools():
        assert f"\n## {tool.name}\n" in mcp_md
    assert len(docs._tools()) == len(server._tool_manager.list_tools())


def test_the_generated_help_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = docs.render_cli()
    monkeypatch.setenv("COLUMNS", "300")
    assert docs.render_cli() == narrow


def test_readme_stays_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md",
               *sorted((ROOT / "policies").glob("*/README.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to missing {target}"


# --- the policies: described once, in the header comment -------------------------------------------

@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A copy of the policies and the docs/ references, taken as the repository by the generator."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    (tmp_path / "docs").mkdir()
    for ref in ("cli.md", "mcp.md"):
        shutil.copy(ROOT / "docs" / ref, tmp_path / "docs" / ref)
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    return tmp_path


def test_an_edited_header_fails_the_check_until_regenerated(checkout, capsys):
    assert docs.main(["--check"]) == 0
    src = checkout / "policies" / "fifo" / "fifo.bpf.c"
    src.write_text(src.read_text().replace(" * Fails: no notion of weight or priority",
                                           " * Fails: starves nobody, but has no notion of weight or priority"))

    assert docs.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "policies/fifo/policy.json" in out and "policies/fifo/README.md" in out
    assert "+- starves nobody, but has no notion" in out  # the diff shows the README's new bullet

    assert docs.main([]) == 0
    meta = json.loads((checkout / "policies" / "fifo" / "policy.json").read_text())
    assert meta["limitations"][0].startswith("starves nobody, but has no notion of weight")
    assert docs.main(["--check"]) == 0


def test_the_hand_kept_part_of_a_readme_is_never_rewritten(checkout):
    readme = checkout / "policies" / "lean_preempt" / "README.md"
    readme.write_text(readme.read_text() + "\n## Measured again\nA new run, by hand.\n")
    assert not docs.drift()  # below the marker, anything goes

    src = checkout / "policies" / "lean_preempt" / "lean_preempt.bpf.c"
    src.write_text(src.read_text().replace("lean_preempt: one global FIFO", "lean_preempt: one shared FIFO"))
    docs.generate()
    text = readme.read_text()
    assert "\nOne shared FIFO with short slices" in text.split(docs.HAND_KEPT)[0]
    assert text.endswith("## Measured again\nA new run, by hand.\n")


def test_a_readme_that_lost_its_marker_is_not_overwritten(checkout, capsys):
    readme = checkout / "policies" / "fifo" / "README.md"
    readme.write_text(readme.read_text().replace(docs.HAND_KEPT + "\n", ""))
    before = readme.read_text()
    assert docs.main([]) == 1
    assert "fifo/README.md has lost its marker line" in capsys.readouterr().err
    assert readme.read_text() == before


def test_a_header_that_does_not_follow_the_structure_says_what_to_write(checkout, capsys):
    src = checkout / "policies" / "batch" / "batch.bpf.c"
    src.write_text(src.read_text().replace(" * Fails: latency:", " * It fails at latency:"))
    assert docs.main(["--check"]) == 1
    assert "batch.bpf.c: the header comment must end with a 'Works well: …' paragraph" in capsys.readouterr().err


def test_contributed_policies_are_not_generated(checkout):
    """An agent wrote a contributed policy's description (policy.json `provenance`): no header to derive
    it from, so generation leaves it alone."""
    d = checkout / "policies" / "mine"
    shutil.copytree(checkout / "policies" / "fifo", d)
    meta = json.loads((d / "policy.json").read_text())
    (d / "policy.json").write_text(json.dumps({**meta, "name": "mine", "provenance": {"report_id": "rep-1"}}))
    assert not docs.drift()


def test_a_header_becomes_policy_json_fields_and_readme_sections():
    source = """/* SPDX-License-Identifier: GPL-2.0 */
/*
 * toy: one queue, in order.
 *
 * Tasks wait in @depth queues:
 *
 *   wait = depth * slice
 *
 * 1. First rule,
 *    on two lines.
 * 2. Second rule.
 *
 * Works well: small boxes (one LLC); tests. Baselines.
 *
 * Fails: no weights. CPU hogs win.
 */
"""
    t = docs.policy_text("toy", source)
    assert t.summary == "One queue, in order."
    assert (t.works, t.fails) == (["small boxes (one LLC)", "tests", "baselines"], ["no weights", "CPU hogs win"])
    meta = {"name": "toy", "source": "toy.bpf.c", "ops_name": "toy", "parameters": []}
    assert json.loads(docs.render_policy_json(meta, t))["description"] == (
        "Tasks wait in @depth queues:\n\nwait = depth * slice\n\n1. First rule, on two lines.\n\n2. Second rule.")
    readme = docs.render_policy_readme(meta, t, "\n## Design\nBy hand.\n")
    assert "Tasks wait in `depth` queues:\n\n    wait = depth * slice\n\n1. First rule, on two lines." in readme
    assert "## Works well\n- small boxes (one LLC)\n- tests\n- baselines\n" in readme
    assert readme.endswith(docs.HAND_KEPT + "\n\n## Design\nBy hand.\n")
