"""What a hostile MCP client or another local user must not be able to do (issue #12).

Each test is an attack that worked before; the server is spawned for real where the attack went
through it."""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from schedcp_mcp import access, config
from schedcp_mcp.errors import BadInput, SchedcpError
from schedcp_mcp.observe import profile
from loopback import free_port, wait_for_port


@pytest.fixture(autouse=True)
def no_operator_allowances(monkeypatch):
    """Each test starts from the default (nothing allowed) and its set_policy calls are undone."""
    for env in (access.ALLOW_ANY_ENV, access.ALLOW_PREFIXES_ENV, access.ALLOW_EXACT_ENV):
        monkeypatch.setenv(env, "")


# --- commands from MCP clients ---------------------------------------------------------------------

def test_an_mcp_client_cannot_run_a_command_by_default(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(access.CommandRefused, match="off for MCP clients"):
        profile.profile_workload(["sh", "-c", f"touch {marker}"], duration_s=1, use_runqlat=False,
                                 actor="mcp")
    assert not marker.exists()


def test_an_mcp_client_can_profile_a_pid_and_the_sandbox_workloads(monkeypatch):
    from schedcp_mcp.workloads import host_commands

    access.set_policy(False, [], host_commands())  # what `schedcp serve` does
    with subprocess.Popen(["sleep", "5"]) as sleeper:
        p = profile.profile_workload(pid=sleeper.pid, duration_s=0.5, use_runqlat=False, actor="mcp")
        sleeper.kill()
    assert p.pid == sleeper.pid
    access.check_command(["stress-ng", "--cpu", "4", "--cpu-method", "int64", "-t", "1",
                          "--metrics-brief"], "mcp")  # a sandbox workload, argument for argument
    with pytest.raises(access.CommandRefused):  # the same program with other arguments is not
        access.check_command(["stress-ng", "--cpu", "4", "--exec", "1"], "mcp")


def test_the_operator_widens_commands_with_prefixes_or_allows_all(monkeypatch):
    access.check_command(["sh", "-c", "anything"], "cli")  # a human at the CLI may run anything
    access.set_policy(False, ["hackbench -g"])
    access.check_command(["hackbench", "-g", "8"], "mcp")
    for argv in (["hackbench", "-l", "8"], ["/tmp/hackbench", "-g", "8"], ["sh", "-c", "hackbench -g 1"]):
        with pytest.raises(access.CommandRefused):
            access.check_command(argv, "mcp")
    with pytest.raises(access.CommandRefused):  # a host deploy's metric command is a command too
        access.check_command("cat /etc/shadow", "mcp", "metric command")
    access.set_policy(True, [])
    access.check_command(["sh", "-c", "anything"], "mcp")


def _marker_procs(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in (p.info["cmdline"] or []):
            out.append(p)
    return out


@pytest.mark.parametrize("detach", ["setsid", "nohup"])
def test_a_profiled_workloads_whole_process_tree_ends_with_the_profile(detach):
    marker = f"0.{random.randrange(10**8, 10**9)}"  # `sleep 300 0.xxx` sleeps 300.xxx s: our mark
    spawn = {"setsid": f"setsid sleep 300 {marker} &",
             "nohup": f"(nohup sleep 300 {marker} >/dev/null 2>&1 &);"}[detach]
    try:
        profile.profile_workload(["sh", "-c", f"{spawn} sleep 60"], duration_s=1, use_runqlat=False)
        deadline = time.monotonic() + 5
        while _marker_procs(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _marker_procs(marker), "a process the workload started outlived the profile"
    finally:
        for p in _marker_procs(marker):
            p.kill()


def test_a_failed_profile_returns_no_workload_output_and_leaves_no_temp_dir():
    before = set(Path(tempfile.gettempdir()).glob("schedcp-prof-*"))
    with pytest.raises(BadInput) as e:
        profile.profile_workload(["sh", "-c", "echo SE''CRET-ERR >&2; echo SE''CRET-OUT; exit 3"],
                                 duration_s=5, use_runqlat=False)
    assert "exited with 3" in str(e.value)
    assert "SECRET" not in str(e.value)
    assert set(Path(tempfile.gettempdir()).glob("schedcp-prof-*")) == before
    assert not list(config.runtime_dir().iterdir())


@pytest.mark.parametrize("pid", [-1, 0])
def test_a_negative_pid_is_an_input_error(pid):
    with pytest.raises(BadInput, match="not a process id"):
        profile.profile_workload(pid=pid, duration_s=1)


# --- HTTP ------------------------------------------------------------------------------------------

def _serve_http(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "serve", "--http", f"127.0.0.1:{port}",
                          *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_port(port, 60, p)
    return p, port


def _post(port: int, headers: dict[str, str] | None = None) -> int:
    import httpx2

    r = httpx2.post(f"http://127.0.0.1:{port}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                    headers={"Accept": "application/json, text/event-stream", **(headers or {})},
                    timeout=10)
    return r.status_code


def test_loopback_http_needs_the_generated_token(schedcp_home):
    p, port = _serve_http()
    try:
        assert _post(port) == 401
        token_file = schedcp_home / "http-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert _post(port, {"Authorization": "Bearer " + token[:-1] + "x"}) == 401
        assert _post(port, {"Authorization": "Bearer " + token}) != 401  # past auth, into MCP
    finally:
        p.terminate()
        p.wait(10)


def test_a_token_file_others_can_read_is_refused(tmp_path):
    f = tmp_path / "token"
    f.write_text("a-long-enough-token-for-the-test\n")
    f.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "schedcp_mcp", "serve", "--http", "127.0.0.1:1",
                        "--token-file", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "readable" in r.stderr and "chmod 600" in r.stderr


def test_bearer_comparison_is_constant_time_compare_digest(monkeypatch):
    calls = []
    real = access.hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert access.bearer_ok(b"Bearer abc", "abc") and not access.bearer_ok(b"Bearer abd", "abc")
    assert len(calls) == 2


# --- files under $SCHEDCP_HOME -----------------------------------------------------------------------

def test_home_is_private_and_the_database_with_its_wal_is_0600(schedcp_home):
    from schedcp_mcp import store

    schedcp_home.chmod(0o755)  # an existing home from an older version
    store.audit("test", "probe", {})
    assert stat.S_IMODE(config.home().stat().st_mode) == 0o700
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{config.db_path()}{suffix}")
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_a_home_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    monkeypatch.setenv("SCHEDCP_HOME", str(other))
    with pytest.raises(SchedcpError, match="not a directory owned by this user"):
        config.home()


# --- callbacks -------------------------------------------------------------------------------------

class _Hook:
    """A real loopback HTTP server answering every POST with `status` (and a Location)."""

    def __init__(self, status: int = 200, location: str = ""):
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.hits: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.hits.append(self.headers.get("Host", ""))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _event():
    from schedcp_mcp.learn import callbacks

    return callbacks.CallbackEvent(callback_id="cb-test", value=1.0, at=0.0, message="test",
                                   condition=callbacks.Condition(kind="psi_cpu_above", threshold=0))


def test_a_callback_never_follows_a_redirect():
    from schedcp_mcp.learn import callbacks

    elsewhere = _Hook()
    redirector = _Hook(status=307, location=elsewhere.url)
    try:
        assert callbacks.post(redirector.url, _event()) == 307
        assert len(redirector.hits) == 1 and elsewhere.hits == []
    finally:
        redirector.close()
        elsewhere.close()


def test_a_callback_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding cannot be staged for real here, so the resolver is a fake (named so): the
    first answer is loopback, any later one a remote address. One lookup, loopback used, Host kept."""
    from schedcp_mcp.learn import callbacks

    hook = _Hook()
    answers = iter(["127.0.0.1"] + ["192.0.2.1"] * 10)
    real = socket.getaddrinfo

    def fake(host, port, *a, **kw):
        if host != "hooks.example":
            return real(host, port, *a, **kw)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    try:
        assert callbacks.post(f"http://hooks.example:{hook.port}/x", _event(), timeout=3) == 200
        assert hook.hits == [f"hooks.example:{hook.port}"]
    finally:
        hook.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x", "http://127.0.0.1:abc/x",
                                 "http://127.0.0.1:0/x"])
def test_a_callback_url_with_a_bad_port_is_an_input_error(url):
    from schedcp_mcp.learn import callbacks

    with pytest.raises(BadInput, match="port"):
        callbacks.register(url, callbacks.Condition(kind="psi_cpu_above", threshold=1))


# --- names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["good_name\n", "../../etc/passwd", "a/b", "x\0y", "Upper", "a",
                                  "na me", "name\r\n"])
def test_a_policy_name_that_could_become_a_path_is_refused_everywhere(name):
    from schedcp_mcp.learn import contribute, history
    from schedcp_mcp.models import MetricResult

    with pytest.raises(BadInput, match="not allowed"):
        contribute.contribute_policy("rep-none", name, "d")
    with pytest.raises(BadInput, match="not allowed"):
        history.new_outcome(source="external", policy=name, params={}, profile_id=None, note="",
                            metrics=[MetricResult(metric="m", direction="lower", baseline=1,
                                                  candidate=1, ratio=1)])


def test_no_name_regex_in_the_package_ends_with_a_dollar():
    """`^…$` accepts a trailing newline; names are matched with fullmatch or `\\Z`."""
    import re as _re

    root = Path(__file__).resolve().parent.parent / "schedcp_mcp"
    offenders = []
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if _re.search(r"NAME\w*\s*=\s*re\.compile\(r?\"\^.*\$\"\)", line):
                offenders.append(f"{f.name}:{i}")
    assert offenders == []


# --- tokens ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", ["-100", "0", "99999999999"])
def test_schedcp_token_refuses_a_negative_or_unbounded_ttl(ttl):
    r = subprocess.run([sys.executable, "-m", "schedcp_mcp", "token", "rep-any", "--ttl", ttl],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout
    assert "out of range" in r.stderr + r.stdout and "." not in r.stdout.strip()[:0]


# --- runtime directories -----------------------------------------------------------------------------

def test_a_planted_socket_directory_is_refused_and_the_sweep_spares_other_users(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to make directories owned by another user")
    from schedcp_mcp.sandbox import vm

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"schedcp-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    with pytest.raises(SchedcpError, match="not a directory owned by this user"):
        vm._sock_path(tmp_path / ("x" * 120))
    theirs = tmp_path / "schedcp-vm-theirs"
    ours = tmp_path / "schedcp-vm-ours"
    for d in (theirs, ours):
        d.mkdir()
        os.utime(d, (0, 0))
    os.chown(theirs, 65534, 65534)
    vm._sweep_stale_tmpdirs()
    assert theirs.exists() and not ours.exists()
