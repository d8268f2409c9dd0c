"""The references in docs/ are generated from the code (`python -m schedcp_mcp.docs`): the CLI's
`--help` of every command and the MCP server's tool registry. A command, option or tool that
changed without the docs being regenerated fails here, with the diff."""

from __future__ import annotations

import re
from pathlib import Path

from schedcp_mcp import docs

ROOT = Path(__file__).resolve().parent.parent


def test_generated_references_match_the_code():
    stale = docs.drift()
    assert not stale, ("docs/ references are stale; run `python -m schedcp_mcp.docs` and commit the "
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
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to missing {target}"
