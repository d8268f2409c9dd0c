"""Shared fixtures: every test gets its own $SCHEDCP_HOME (a real SQLite file in a temp dir); the
sandbox image is shared (it is big and slow to build) through $SCHEDCP_SANDBOX_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_SANDBOX = Path(os.environ.get("SCHEDCP_SANDBOX_DIR")
                    or Path(os.environ.get("SCHEDCP_HOME") or Path.home() / ".local/share/schedcp")
                    / "sandbox")


@pytest.fixture(autouse=True)
def schedcp_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SCHEDCP_HOME", str(home))
    monkeypatch.setenv("SCHEDCP_SANDBOX_DIR", str(REAL_SANDBOX))
    return home


@pytest.fixture
def anyio_backend():
    return "asyncio"
