"""`schedcp serve --http`: streamable HTTP with a bearer token, refused on non-loopback without one."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from loopback import free_port, wait_for_port

pytestmark = pytest.mark.anyio


def test_non_loopback_without_token_refuses_to_start():
    r = subprocess.run([sys.executable, "-m", "schedcp_mcp", "serve", "--http", "0.0.0.0:8799"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "non-loopback" in r.stderr and "--token-file" in r.stderr


@pytest.fixture
def http_server(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-tests\n")
    token_file.chmod(0o600)  # a token file others can read is refused
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "serve", "--http", f"127.0.0.1:{port}",
                          "--token-file", str(token_file)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=os.environ.copy())
    wait_for_port(port, 60, p)
    yield f"http://127.0.0.1:{port}/mcp"
    p.terminate()
    p.wait(10)


async def test_http_with_token_lists_tools(http_server):
    headers = {"Authorization": "Bearer s3cret-token-for-tests"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as client, \
            streamable_http_client(http_server, http_client=client) as (r, w), \
            ClientSession(r, w) as s:
        await s.initialize()
        names = {t.name for t in (await s.list_tools()).tools}
    assert {"get_cpu_stats", "submit_scheduler", "deploy"} <= names


async def test_http_without_token_is_rejected(http_server):
    async with httpx2.AsyncClient(timeout=10) as client:
        resp = await client.post(http_server, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert resp.status_code == 401
