"""Where schedcp keeps things. One place decides every path."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """$SCHEDCP_HOME, default ~/.local/share/schedcp. Created on first use."""
    p = Path(os.environ.get("SCHEDCP_HOME") or Path.home() / ".local/share/schedcp")
    p.mkdir(parents=True, exist_ok=True)
    return p


def db_path() -> Path:
    return home() / "schedcp.db"


def sandbox_dir() -> Path:
    """The sandbox image (kernel, rootfs, toolchain, headers). Big and slow to build, so it can be
    shared between homes with $SCHEDCP_SANDBOX_DIR (tests use a throwaway home but the real image)."""
    p = Path(os.environ.get("SCHEDCP_SANDBOX_DIR") or home() / "sandbox")
    p.mkdir(parents=True, exist_ok=True)
    return p


def policies_dir() -> Path:
    """The policy repository: `policies/` of the checkout, or $SCHEDCP_POLICIES."""
    return Path(os.environ.get("SCHEDCP_POLICIES") or PROJECT_ROOT / "policies")


def templates_dir() -> Path:
    """jinja2 templates of generated schedulers (`templates/` of the checkout)."""
    return PROJECT_ROOT / "templates"
