"""Shared fixtures: every test gets its own $SCHEDCP_HOME (a real SQLite file in a temp dir); the
sandbox image is shared (it is big and slow to build) through $SCHEDCP_SANDBOX_DIR."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from contextlib import contextmanager
from pathlib import Path

import pytest

REAL_SANDBOX = Path(os.environ.get("SCHEDCP_SANDBOX_DIR")
                    or Path(os.environ.get("SCHEDCP_HOME") or Path.home() / ".local/share/schedcp")
                    / "sandbox")

# module-scoped fixtures run before the per-test ones below: they must see the real image too
os.environ["SCHEDCP_SANDBOX_DIR"] = str(REAL_SANDBOX)
# the saved VM states the verify path restores (sandbox/vmstate.py) go to a directory of this test
# session, not beside the shared image: the first cold verify of the session boots and saves one
if not os.environ.get("SCHEDCP_VMSTATE_DIR"):
    import atexit
    import tempfile

    _VMSTATE = tempfile.mkdtemp(prefix="schedcp-test-vmstate-")
    os.environ["SCHEDCP_VMSTATE_DIR"] = _VMSTATE
    atexit.register(shutil.rmtree, _VMSTATE, True)

# tests run jobs as the CLI and the server do: every job kind and carried record registered
import schedcp_mcp.worker  # noqa: E402,F401


def pytest_configure(config):
    """A killed test run (SIGTERM: a CI timeout, `kill`) stops like Ctrl-C, so fixtures tear down and
    the VMs they started are closed instead of left running."""
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt("SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items):
    """One marker, `image`: the test needs the built sandbox image (its toolchain jail, or its kernel
    booted in a VM). A test gets it by hand (`@pytest.mark.image`) or by using a fixture that needs the
    image (`manifest`, `vm`: marked here). `-m "not image"` is the fast set; it runs as on a machine
    without the image (see schedcp_home), so an unmarked test that needs it fails instead of passing
    here and failing in CI."""
    for item in items:
        if {"manifest", "vm"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.image)


@contextmanager
def env_set(name: str, value):
    """Set $name to `value` for a module-scoped fixture (monkeypatch is per test); restore it exactly
    afterwards."""
    old = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def home_env(path: Path):
    """Point SCHEDCP_HOME at `path` for a module-scoped fixture; restore it exactly afterwards."""
    return env_set("SCHEDCP_HOME", path)


@pytest.fixture(autouse=True)
def schedcp_home(tmp_path, monkeypatch, request) -> Path:
    """A home of the test's own. The shared image only for `image` tests: the others get an empty
    sandbox dir, and building an image there fails the test (it would download 1.2 GB)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SCHEDCP_HOME", str(home))
    if request.node.get_closest_marker("image"):
        monkeypatch.setenv("SCHEDCP_SANDBOX_DIR", str(REAL_SANDBOX))
    else:
        from schedcp_mcp.sandbox import image

        monkeypatch.setenv("SCHEDCP_SANDBOX_DIR", str(tmp_path / "no-sandbox-image"))
        monkeypatch.setattr(image, "_resolve", _needs_the_image)  # a build's first step
        # a command this test starts cannot download one either: no Debian mirror answers
        monkeypatch.setenv("SCHEDCP_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    return home


def _needs_the_image(*a, **k):
    pytest.fail("this test needs the sandbox image: mark it `@pytest.mark.image` (or use the `manifest` "
                "fixture); unmarked tests run as on a machine without it")


@pytest.fixture(scope="session")
def manifest():
    """The built sandbox image; tests that need it skip with a hint when it is not built."""
    from schedcp_mcp.sandbox import image

    m = image.load_manifest()
    if m is None:
        pytest.skip("sandbox image not built: run `schedcp sandbox build`")
    return m


@pytest.fixture(scope="module")
def vm(manifest):
    """One small sandbox VM shared by the VM tests of a module (a boot is seconds under TCG)."""
    from schedcp_mcp.sandbox.vm import VM

    with VM() as v:
        yield v
        if not v.alive:  # it died during a test: show why (the kernel's console)
            print("sandbox VM console tail:\n" + v.console()[-6000:])


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def contributed_dir() -> Path:
    """Where this test's contributed policies land: its own home's policies/ (a run never writes the
    shipped repository)."""
    from schedcp_mcp import config

    return config.contributed_policies_dir()


class CallbackReceiver:
    """A callback URL: a real HTTP server on loopback that fails the first `fail_first` requests with 500."""

    def __init__(self, fail_first: int = 0):
        self.events, self.hits, self.fail_first = [], 0, fail_first
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.hits += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.hits <= outer.fail_first:
                    self.send_response(500)
                else:
                    outer.events.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
