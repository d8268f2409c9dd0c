"""What an MCP client may do beyond the sandbox, and how HTTP clients prove who they are.

The operator decides when starting the server (`schedcp serve` flags, passed to this module through
the environment like `--allow-host-deploy`); an MCP client cannot widen it. The CLI is a human at a
shell and is never limited here.

Commands on this host (profile_workload's `command`, a host deploy's `metric_cmd`/`workload_cmd`):
  - off for MCP clients by default, except the sandbox's own benchmark workloads, argument for argument;
  - `--allow-command-prefix "PROG ARGS…"` (repeatable): argv that starts with those exact words;
  - `--allow-exact-command "PROG ARGS…"` (repeatable): exactly that argv (`schedcp optimize -- CMD`);
  - `--allow-command`: any command (the client then runs programs as the server's user).

HTTP: every request carries `Authorization: Bearer <token>`, loopback included (any local user can
reach a loopback port). The token comes from `--token-file` (owned by the server's user and not
readable by group or others) or is generated once into `$SCHEDCP_HOME/http-token` (0600).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import shlex
import stat
from pathlib import Path

from . import config
from .errors import BadInput, SchedcpError

ALLOW_ANY_ENV = "SCHEDCP_ALLOW_COMMAND"
ALLOW_PREFIXES_ENV = "SCHEDCP_ALLOW_COMMAND_PREFIXES"  # a JSON list of argv prefixes
HTTP_TOKEN_FILE = "http-token"


class CommandRefused(SchedcpError):
    """An MCP client asked to run a command the operator did not allow."""


ALLOW_EXACT_ENV = "SCHEDCP_ALLOW_COMMANDS_EXACT"  # a JSON list of whole argvs (sandbox workloads)


def _argv_list(env: str) -> list[list[str]]:
    try:
        value = json.loads(os.environ.get(env) or "[]")
    except ValueError:
        return []
    return [list(map(str, p)) for p in value if isinstance(p, list) and p]


def argv(words: str, flag: str) -> list[str]:
    """An operator's command given as shell words, e.g. 'hackbench -g 2'."""
    try:
        out = shlex.split(words)
    except ValueError as e:
        raise BadInput(f"cannot parse {flag} {words!r}: {e}", "quote it as shell words") from None
    if not out:
        raise BadInput(f"empty {flag} {words!r}", "give a program, e.g. 'hackbench'")
    return out


def set_policy(allow_any: bool, prefixes: list[str], exact: list[list[str]] = ()) -> None:
    """Record the operator's choice for this server process (and the monitors it starts):
    any command, argv prefixes (shell words, e.g. 'hackbench -g'), and whole argvs."""
    if allow_any:
        os.environ[ALLOW_ANY_ENV] = "1"
    argvs = [argv(p, "--allow-command-prefix") for p in prefixes]
    if argvs:
        os.environ[ALLOW_PREFIXES_ENV] = json.dumps(argvs)
    if exact:
        os.environ[ALLOW_EXACT_ENV] = json.dumps([list(a) for a in exact])


def command_allowed(argv: list[str]) -> bool:
    if os.environ.get(ALLOW_ANY_ENV) == "1":
        return True
    if argv in _argv_list(ALLOW_EXACT_ENV):
        return True
    return any(argv[: len(p)] == p for p in _argv_list(ALLOW_PREFIXES_ENV))


def check_command(argv: list[str] | str, actor: str, what: str = "command") -> None:
    """Refuse a command an MCP client may not run on this host (the CLI may run anything, and so
    may schedcp itself, actor "schedcp": a command it chose, e.g. a sandbox workload's benchmark
    picked by name)."""
    if actor in ("cli", "schedcp"):
        return
    if isinstance(argv, str):
        try:
            argv = shlex.split(argv)
        except ValueError as e:
            raise BadInput(f"cannot parse {what} {argv!r}: {e}") from None
    if command_allowed(list(argv)):
        return
    shown = shlex.join(argv)[:200]
    raise CommandRefused(
        f"running a {what} on this host is off for MCP clients ({shown!r} is not allowlisted)",
        "profile a running process with pid=..., or one of the sandbox workloads' commands "
        "(list_workloads); the operator can allow commands with `schedcp serve "
        "--allow-command-prefix 'PROG'` or `--allow-command`")


# --- how much one caller may pile up ---------------------------------------------------------------

#: caps on what an MCP client (any caller but the CLI and schedcp itself) may hold at once;
#: `SCHEDCP_MAX_<NAME>` changes one
CAPS = {"queued_jobs": 64, "callbacks": 32, "plan_candidates": 32, "plan_workloads": 16,
        "campaign_candidates": 32, "text_chars": 8000}


def cap(name: str) -> int:
    return int(os.environ.get(f"SCHEDCP_MAX_{name.upper()}") or CAPS[name])


def check_cap(name: str, n: int, actor: str = "mcp", what: str = "") -> None:
    """Refuse when a caller would hold more than the cap `name` (n: what it would hold)."""
    if actor in ("cli", "schedcp") or n <= cap(name):
        return
    raise BadInput(f"too many {what or name.replace('_', ' ')}: {n}, the limit is {cap(name)}",
                   "wait for some to finish or remove some; the operator can raise it with "
                   f"SCHEDCP_MAX_{name.upper()}")


# --- HTTP ------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- HTTP bearer token ---------------------------------------------------------------------------

def read_token_file(path: Path) -> str:
    """The token in an operator-given file; refused if others could read it or it is not ours."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadInput(f"cannot read token file {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise BadInput(f"token file {path} is readable or writable by group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):04o})", f"chmod 600 {path}")
    if st.st_uid != os.geteuid():
        raise BadInput(f"token file {path} belongs to uid {st.st_uid}, not to this user",
                       "use a file you own, mode 600")
    token = path.read_text().strip()
    if len(token) < 16:
        raise BadInput(f"token file {path} holds {'no' if not token else 'a too short'} token",
                       "put a long random token in it (at least 16 characters), e.g. "
                       "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def generated_token() -> tuple[str, Path]:
    """The server's own HTTP token, created once (0600) under $SCHEDCP_HOME."""
    path = config.home() / HTTP_TOKEN_FILE
    if not path.exists():
        config.write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
    return read_token_file(path), path


def bearer_ok(header: bytes | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header value."""
    expected = b"Bearer " + token.encode()
    return hmac.compare_digest(header or b"", expected)
