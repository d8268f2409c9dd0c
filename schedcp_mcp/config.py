"""Where schedcp keeps things. One place decides every path."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import InfrastructureError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: the data a wheel ships inside the package (pyproject: [tool.setuptools.package-dir] maps the
#: checkout's policies/, templates/, agents/ and the generated .claude/ to schedcp_mcp/bundled/...)
BUNDLED = {"policies": "policies", "templates": "templates", "agents": "agents", ".claude": "claude"}


def in_checkout() -> bool:
    """Running from a source checkout (a clone, an editable install), not an installed wheel."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "schedcp_mcp").is_dir()


def resource_dir(name: str) -> Path:
    """`policies`, `templates`, `agents` or `.claude` (the generated subagents): the checkout's
    directory, or in an installed wheel the copy shipped as package data (found with
    importlib.resources; a plain directory in a normal, unzipped install)."""
    if name not in BUNDLED:
        raise ValueError(name)
    if in_checkout():
        return PROJECT_ROOT / name
    from importlib.resources import files

    return Path(str(files("schedcp_mcp") / "bundled" / BUNDLED[name]))


def home() -> Path:
    """$SCHEDCP_HOME, default ~/.local/share/schedcp. Created on first use, private (0700): it holds
    every report, profile, token key and the audit log."""
    p = Path(os.environ.get("SCHEDCP_HOME") or Path.home() / ".local/share/schedcp")
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_dir(p)
    return p


def private_dir(p: Path) -> Path:
    """`p` as a directory only this user can enter: created 0700, an existing one of ours tightened
    to 0700; one that is a symlink or belongs to someone else is refused."""
    try:
        p.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(p)
    except OSError as e:
        raise InfrastructureError(f"cannot create {p}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise InfrastructureError(f"{p} is not a directory owned by this user (uid {os.geteuid()})",
                                  "remove it or point $SCHEDCP_HOME elsewhere")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
    return p


def write_private(path: Path, data: bytes) -> None:
    """Write a file only this user can read (0600 from its creation, never briefly wider): a new
    file of its own (O_EXCL: never through a symlink or into another's file) renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def open_private(path: Path, mode: str = "ab"):
    """Open (create) a file 0600, e.g. a log, without following a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def runtime_dir() -> Path:
    """Private scratch space for this user's short-lived files (profiles, sockets): under the home,
    so no other user can plant or read anything there."""
    return private_dir(home() / "run")


def db_path() -> Path:
    return home() / "schedcp.db"


def sandbox_dir() -> Path:
    """The sandbox image (kernel, rootfs, toolchain, headers). Big and slow to build, so it can be
    shared between homes with $SCHEDCP_SANDBOX_DIR (tests use a throwaway home but the real image)."""
    p = Path(os.environ.get("SCHEDCP_SANDBOX_DIR") or home() / "sandbox")
    p.mkdir(parents=True, exist_ok=True)
    return p


def policies_dir() -> Path:
    """The policies the project ships, read and never written: $SCHEDCP_POLICIES, else `policies/` of
    the checkout or the copy an installed wheel carries."""
    if os.environ.get("SCHEDCP_POLICIES"):
        return Path(os.environ["SCHEDCP_POLICIES"])
    return resource_dir("policies")


def contributed_policies_dir() -> Path:
    """Where a policy that passed and met its goals joins the repository: `$SCHEDCP_HOME/policies`.
    A run never writes into the checkout or the installed package, and an empty home starts from the
    shipped repository alone."""
    return home() / "policies"


def templates_dir() -> Path:
    """jinja2 templates of generated schedulers (`templates/` of the checkout or the wheel)."""
    return resource_dir("templates")
