"""The four Claude Code subagents (observation, planning, execution, learning), generated.

Source: `agents/<role>.md` (YAML front matter: name, description, model, the role's schedcp tools
and other Claude Code tools; a jinja2 body) and the MCP server's **actual** registered tools. Output:
`.claude/agents/*.md` and `.claude/commands/optimize.md` for this repository, the same under
`plugin/` for the Claude Code plugin (whose MCP tools are named `mcp__plugin_schedcp_schedcp__*`),
and the marketplace file that makes the repository installable with `claude plugin`. A tool a role
lists that the server does not have is left out, so a definition never names a missing tool.
`schedcp agents generate` writes them; `drift()` says which generated files are stale.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import jinja2
import yaml
from pydantic import BaseModel, Field

from . import __version__, config, generated
from .errors import BadInput

ROLES = ("observation", "planning", "execution", "learning")
SERVER = "schedcp"
PLUGIN = "schedcp"
PLUGIN_DIR = "plugin"
PROJECT_PREFIX = f"mcp__{SERVER}__"
PLUGIN_PREFIX = f"mcp__plugin_{PLUGIN}_{SERVER}__"  # Claude Code names plugin servers plugin:P:S
#: only these roles may call tools that change what a kernel runs
DEPLOYING_ROLES = {"execution"}
DEPLOY_TOOLS = {"deploy", "rollback", "ab_test"}
MCP_SERVER_ENTRY = {"type": "stdio", "command": "schedcp", "args": ["serve"], "env": {}}


class Role(BaseModel):
    role: str
    name: str
    description: str
    model: str
    tools: list[str] = Field(description="schedcp MCP tool names this role may use (if they exist)")
    other_tools: list[str] = []
    body: str = Field(description="jinja2 template of the system prompt")


class ToolInfo(BaseModel):
    name: str
    summary: str


def source_dir() -> Path:
    return config.resource_dir("agents")


def split_front_matter(text: str, where: str) -> tuple[dict, str]:
    if not text.startswith("---\n"):
        raise BadInput(f"{where}: no YAML front matter", "start the file with --- … ---")
    head, sep, body = text[4:].partition("\n---\n")
    if not sep:
        raise BadInput(f"{where}: front matter not closed", "end it with a line holding ---")
    meta = yaml.safe_load(head)
    if not isinstance(meta, dict):
        raise BadInput(f"{where}: front matter is not a mapping", "use key: value lines")
    return meta, body


def load_roles(src: Path | None = None) -> list[Role]:
    src = src or source_dir()
    roles = []
    for role in ROLES:
        path = src / f"{role}.md"
        meta, body = split_front_matter(path.read_text(), str(path))
        roles.append(Role(role=role, body=body.strip() + "\n", **meta))
    return roles


@lru_cache(maxsize=1)
def _server_tools() -> tuple[ToolInfo, ...]:
    from .server import server

    tools = asyncio.run(server.list_tools())
    return tuple(ToolInfo(name=t.name, summary=_summary(t.description or "")) for t in tools)


def server_tools() -> dict[str, ToolInfo]:
    """The tools the MCP server registers right now, by name."""
    return {t.name: t for t in _server_tools()}


def _summary(description: str) -> str:
    first = " ".join(description.split())
    end = first.find(". ")
    return (first[:end + 1] if end > 0 else first).replace("|", "/")


def role_tools(role: Role, tools: dict[str, ToolInfo]) -> list[ToolInfo]:
    return [tools[n] for n in role.tools if n in tools]


def unassigned_tools(roles: list[Role] | None = None) -> list[str]:
    """Server tools no role may use: each must be given to a role (or it is dead weight)."""
    roles = roles or load_roles()
    used = {n for r in roles for n in r.tools}
    return sorted(n for n in server_tools() if n not in used)


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(source_dir() / "templates"),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=False, autoescape=False)


def render_agent(role: Role, tools: dict[str, ToolInfo], prefix: str) -> str:
    mine = role_tools(role, tools)
    env = _env()
    present = lambda names: ", ".join(f"`{n}`" for n in names if n in tools)  # noqa: E731
    body = env.from_string(role.body).render(has=lambda n: n in tools, present=present).strip()
    front = {"name": role.name, "description": " ".join(role.description.split()),
             "tools": ", ".join([prefix + t.name for t in mine] + role.other_tools),
             "model": role.model}
    fm = yaml.safe_dump(front, sort_keys=False, width=10_000, allow_unicode=True)
    return env.get_template("subagent.md.j2").render(front_matter=fm, role=role, body=body,
                                                     tools=mine, prefix=prefix)


def render_command(roles: list[Role]) -> str:
    return _env().get_template("optimize.md.j2").render(names={r.role: r.name for r in roles})


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def render_all() -> dict[str, str]:
    """Every generated file, by path relative to the repository root."""
    roles, tools = load_roles(), server_tools()
    out: dict[str, str] = {}
    command = render_command(roles)
    for r in roles:
        out[f".claude/agents/{r.name}.md"] = render_agent(r, tools, PROJECT_PREFIX)
        out[f"{PLUGIN_DIR}/agents/{r.name}.md"] = render_agent(r, tools, PLUGIN_PREFIX)
    out[".claude/commands/optimize.md"] = command
    out[f"{PLUGIN_DIR}/commands/optimize.md"] = command
    description = ("Optimize the Linux CPU scheduler safely with sched_ext: four subagents "
                   "(observation, planning, execution, learning), the /optimize command and the "
                   "schedcp MCP server")
    out[f"{PLUGIN_DIR}/.claude-plugin/plugin.json"] = _json({
        "name": PLUGIN, "version": __version__, "description": description,
        "author": {"name": "schedcp"}, "license": "GPL-2.0-only",
        "keywords": ["sched_ext", "scheduler", "bpf", "linux", "mcp"]})
    out[f"{PLUGIN_DIR}/.mcp.json"] = _json({"mcpServers": {SERVER: MCP_SERVER_ENTRY}})
    out[".claude-plugin/marketplace.json"] = _json({
        "name": PLUGIN, "owner": {"name": "schedcp"},
        "description": "schedcp: safe sched_ext scheduler optimization for Claude Code",
        "plugins": [{"name": PLUGIN, "source": f"./{PLUGIN_DIR}", "description": description,
                     "version": __version__}]})
    return out


def generate(root: Path | None = None) -> list[str]:
    """Write every generated file under `root` (default: the repository); returns changed paths."""
    return generated.write(render_all(), root or config.PROJECT_ROOT)


def drift(root: Path | None = None) -> dict[str, str]:
    """Generated files that differ from what generation would write now: {path: unified diff}."""
    return generated.drift(render_all(), root or config.PROJECT_ROOT)


# --- what a stage may call (read back from the generated definitions) ------------------------------

def agent_path(role: str, root: Path | None = None) -> Path:
    if role not in ROLES:
        raise BadInput(f"unknown role {role!r}", "one of: " + ", ".join(ROLES))
    name = next(r.name for r in load_roles() if r.role == role)
    claude = root / ".claude" if root else config.resource_dir(".claude")  # a wheel ships it
    return claude / "agents" / f"{name}.md"


def parse_agent(path: Path) -> dict:
    """The front matter of a subagent definition (name, description, tools, model)."""
    meta, _ = split_front_matter(path.read_text(), str(path))
    return meta


def allowlist(role: str, root: Path | None = None, prefix: str = PROJECT_PREFIX) -> set[str]:
    """The schedcp MCP tools a role's generated definition allows (names without the prefix)."""
    meta = parse_agent(agent_path(role, root))
    names = [t.strip() for t in str(meta.get("tools", "")).split(",") if t.strip()]
    return {t.removeprefix(prefix) for t in names if t.startswith(prefix)}


# --- install into another project without the plugin system -----------------------------------------

class InstallResult(BaseModel):
    scope: str
    directory: str
    written: list[str]
    unchanged: list[str]
    mcp: str = Field(description="how the MCP server was registered")
    warnings: list[str] = Field([], description="what will not work as expected, and what to do")


def plugin_shadowed(directory: Path | None = None, home: Path | None = None) -> list[str]:
    """When the schedcp plugin is enabled in Claude Code AND a server named `schedcp` is configured
    outside it (`claude mcp add schedcp …` in local or user scope, or a project's .mcp.json),
    Claude Code runs only that one and skips the plugin's server (`claude mcp list` shows no
    `plugin:schedcp:schedcp`), so the plugin's agents — allowed only `mcp__plugin_schedcp_…` tools —
    have none. Returns where each clashing server is configured (empty: no clash)."""
    home = Path(home or Path.home())
    directory = Path(directory or Path.cwd()).resolve()
    try:
        enabled = json.loads((home / ".claude" / "settings.json").read_text()).get("enabledPlugins") or {}
    except (OSError, ValueError):
        return []
    if not any(k.split("@")[0] == PLUGIN and v for k, v in enabled.items()):
        return []
    where = []
    try:
        cfg = json.loads((home / ".claude.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    if SERVER in (cfg.get("mcpServers") or {}):
        where.append(f"user scope ({home / '.claude.json'}): remove it with `claude mcp remove {SERVER} -s user`")
    for proj, entry in (cfg.get("projects") or {}).items():
        here = Path(proj)
        if SERVER in ((entry or {}).get("mcpServers") or {}) and (directory == here or here in directory.parents):
            where.append(f"local scope for {proj} ({home / '.claude.json'}): remove it with "
                         f"`claude mcp remove {SERVER} -s local` in that directory")
    for d in (directory, *directory.parents):
        try:
            if SERVER in (json.loads((d / ".mcp.json").read_text()).get("mcpServers") or {}):
                where.append(f"project scope ({d / '.mcp.json'}): drop its '{SERVER}' entry, or do not "
                             "approve it")
                break
        except (OSError, ValueError):
            continue
    return where


def shadow_warning(where: list[str]) -> list[str]:
    if not where:
        return []
    return [f"the {PLUGIN} plugin is installed and a server named '{SERVER}' is also configured — "
            + "; ".join(where) + ". Claude Code then runs only that one and skips the plugin's server, "
            "so the plugin's agents get none of their tools. Use one: the plugin (nothing else needed), "
            "or this registration (then `claude plugin uninstall schedcp@schedcp`)."]


def install(scope: str = "project", directory: Path | None = None, force: bool = False) -> InstallResult:
    """Install the four agents, the /optimize command and the MCP server registration.

    project scope: `<dir>/.claude/agents`, `<dir>/.claude/commands`, the `schedcp` entry of
    `<dir>/.mcp.json`; user scope: the same under `<dir>/.claude` (default ~) and `claude mcp add
    --scope user`. A file that exists with other content is never overwritten without `force`."""
    if scope not in ("project", "user"):
        raise BadInput(f"unknown scope {scope!r}", "project or user")
    base = Path(directory or (Path.cwd() if scope == "project" else Path.home())).expanduser().resolve()
    if not base.is_dir():
        raise BadInput(f"{base} is not a directory", "give an existing directory with --dir")
    files = {rel.removeprefix(".claude/"): text for rel, text in render_all().items()
             if rel.startswith(".claude/")}
    targets = {base / ".claude" / rel: text for rel, text in files.items()}
    mcp_path = base / ".mcp.json"
    for path in [*targets, mcp_path]:
        _refuse_symlinks(base, path)
    if scope == "project":
        current = {}
        if mcp_path.exists():
            try:
                current = json.loads(mcp_path.read_text())
            except json.JSONDecodeError as e:
                raise BadInput(f"{mcp_path} is not valid JSON ({e})", "fix or remove it") from None
        servers = dict(current.get("mcpServers") or {})
        if servers.get(SERVER, MCP_SERVER_ENTRY) != MCP_SERVER_ENTRY and not force:
            raise BadInput(f"{mcp_path} already registers a different '{SERVER}' server",
                           "rerun with --force to replace it")
        servers[SERVER] = MCP_SERVER_ENTRY
        targets[mcp_path] = _json({**current, "mcpServers": servers})  # other servers kept
    clash = [str(p) for p, text in targets.items()
             if p.exists() and p.read_text() != text and p != mcp_path]
    if clash and not force:
        raise BadInput("these files exist with other content: " + ", ".join(clash),
                       "rerun with --force to overwrite them")
    written, unchanged = [], []
    for path, text in targets.items():
        if path.exists() and path.read_text() == text:
            unchanged.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_symlinks(base, path)
        _replace(path, text)
        written.append(str(path))
    if scope == "project":
        how = f"'{SERVER}' in {mcp_path} (approve it in Claude Code, or set enableAllProjectMcpServers)"
    else:
        how = _register_user_server()
    return InstallResult(scope=scope, directory=str(base), written=written, unchanged=unchanged, mcp=how,
                         warnings=shadow_warning(plugin_shadowed(base)))


def _refuse_symlinks(base: Path, path: Path) -> None:
    """Nothing is read or written through a symlink under `base` (the file or a directory on the
    way): it could point anywhere, e.g. at another project's .mcp.json."""
    p = base
    for part in path.relative_to(base).parts:
        p = p / part
        if p.is_symlink():
            raise BadInput(f"{p} is a symlink; schedcp agents install does not write through symlinks",
                           "remove it (or point --dir at where it leads) and rerun")


def _replace(path: Path, text: str) -> None:
    """A new file renamed over `path` (O_EXCL|O_NOFOLLOW: never another file's content)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _register_user_server() -> str:
    cmd = ["claude", "mcp", "add", "--scope", "user", SERVER, "--", "schedcp", "serve"]
    exe = shutil.which("claude")
    if exe is None:
        return "Claude Code CLI not found: run `" + " ".join(cmd) + "` once it is installed"
    r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, cwd=Path.home())
    said = (r.stderr or r.stdout).strip()
    if r.returncode != 0 and "already exists" in said:
        return f"'{SERVER}' already registered with Claude Code (user config)"
    if r.returncode != 0:
        return f"`{' '.join(cmd)}` failed: {said[-300:]}"
    return "registered with `" + " ".join(cmd) + "`"
