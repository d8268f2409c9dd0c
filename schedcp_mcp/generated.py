"""Files generated from the code and committed (the agent definitions and plugin, the docs/
references): write them, or say which differ from what generation would write now."""

from __future__ import annotations

import difflib
from pathlib import Path


def write(files: dict[str, str], root: Path) -> list[str]:
    """Write each file (path relative to `root`) whose text differs; returns the changed paths."""
    changed = []
    for rel, text in files.items():
        path = root / rel
        if path.exists() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        changed.append(rel)
    return changed


def drift(files: dict[str, str], root: Path) -> dict[str, str]:
    """The files under `root` that differ from `files`: {path: unified diff, committed → generated}."""
    out = {}
    for rel, text in files.items():
        path = root / rel
        have = path.read_text() if path.exists() else ""
        if have != text:
            out[rel] = "".join(difflib.unified_diff(have.splitlines(True), text.splitlines(True),
                                                    f"{rel} (committed)", f"{rel} (generated)"))
    return out
