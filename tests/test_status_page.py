"""The status page of `schedcp serve --http`, in a real server process, read by a real headless
Debian chromium (a screenshot and the DOM) and by an HTTP client (the JSON state). The store holds
real jobs (run by the server's own worker pool), a real deployment record with monitor readings
and a rollback, and validation outcomes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from schedcp_mcp import records
from schedcp_mcp.jobs import queue
from schedcp_mcp.learn import history
from schedcp_mcp.models import Deployment, MetricResult, MonitorPolicy, Reading, ScxState
from loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def deployment(dep_id: str, status: str, **kw) -> Deployment:
    now = time.time()
    return Deployment(id=dep_id, created_at=now - 60, report_id="rep-x", artifact_sha256="0" * 64,
                      policy="vtime_fair", params={}, ops_name="vtime_fair", target="sandbox", actor="test",
                      token_jti="j", status=status, previous=ScxState(state="disabled"), baseline=1.0,
                      monitor=MonitorPolicy(metric_cmd="echo 1"), **kw)


@pytest.fixture
def server(schedcp_home, tmp_path):
    # the store's history, then a server with a one-slot pool
    done = queue.submit("noop", {"echo": "x"})
    bad = queue.submit("flaky", {"final": True})
    records.save(deployment("dep-active01", "active", readings=[
        Reading(at=time.time(), state="enabled", ops="vtime_fair", metric=1.02, ratio=1.02)]))
    records.save(deployment("dep-rolled01", "rolled_back", ended_at=time.time(),
                            end_reason="metric degraded 1.4x for 3 samples"))
    for i, r in enumerate([0.2, -0.3, 0.05]):
        m = [MetricResult(metric="wall_time_s", direction="lower", baseline=1.0, candidate=1.0, ratio=1.0)]
        history.record(history.new_outcome(source="sandbox", policy=f"p{i}", report_id=f"rep-{i}",
                                           metrics=m, reward=r))
    port = free_port()
    env = {**os.environ, "SCHEDCP_HOME": str(schedcp_home), "PYTHONPATH": str(ROOT),
           "SCHEDCP_SERVER_WORKERS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "serve", "--http", f"127.0.0.1:{port}"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    token_file = schedcp_home / "http-token"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/status/state", timeout=1)
        except urllib.error.HTTPError:
            break  # up (401 without the token)
        except OSError:
            time.sleep(0.2)
    assert p.poll() is None, p.stderr.read().decode()
    token = token_file.read_text().strip()
    assert queue.wait(done.id, 60).done and queue.wait(bad.id, 60).done
    running = queue.submit("sleep", {"seconds": 120})
    deadline = time.monotonic() + 60
    while queue.get(running.id).progress == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield base, token, {"done": done.id, "bad": bad.id, "running": running.id}
    queue.cancel(running.id)
    p.terminate()
    p.wait(15)


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def test_state_endpoint_needs_the_token_and_reports_everything(server):
    base, token, jobs = server
    with pytest.raises(urllib.error.HTTPError) as e:
        get(base + "/status/state")
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        get(base + "/status/state", "not-the-token")
    _, body = get(base + "/status/state", token)
    s = json.loads(body)
    assert [w["size"] for w in s["workers"] if w["alive"]] == [1]
    assert [j["id"] for j in s["running"]] == [jobs["running"]] and s["running"][0]["progress"] > 0
    assert {jobs["done"], jobs["bad"]} <= {j["id"] for j in s["recent"]}
    assert s["queue_depth"] == {"urgent": 0, "high": 0, "normal": 0, "low": 0}
    # (the server found no staging VM behind the "active" deployment and recorded that it stopped:
    # the monitor process it resumed does that, a moment after the server started)
    deadline = time.monotonic() + 30
    while {d["id"]: d for d in s["deployments"]}["dep-active01"]["status"] == "active" \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        s = json.loads(get(base + "/status/state", token)[1])
    dep = {d["id"]: d for d in s["deployments"]}["dep-active01"]
    assert dep["status"] == "stopped" and dep["last_reading"]["ratio"] == 1.02
    assert [d["id"] for d in s["rollbacks"]] == ["dep-rolled01"]
    assert [v["reward"] for v in s["validations"]] == [0.2, -0.3, 0.05]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (setup.sh installs it)")
def test_dashboard_renders_in_headless_chromium(server, tmp_path):
    base, token, jobs = server
    login = f"{base}/status/login?token={token}"

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=90)

    dom = chromium("--dump-dom", login)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<h1>schedcp status</h1>" in html
    assert html.count('<tr class="worker">') == 1
    assert html.count('<tr class="running">') == 1 and jobs["running"] in html
    assert jobs["done"] in html and jobs["bad"] in html and "input is wrong" in html
    assert "dep-active01" in html and "enabled metric 1.02 (1.02x)" in html
    assert html.count('<tr class="rollback">') == 1 and "metric degraded 1.4x" in html
    assert html.count('class="validation"') == 3

    shot = Path(os.environ.get("SCHEDCP_STATUS_SHOT") or tmp_path / "status.png")
    r = chromium(f"--screenshot={shot}", "--window-size=1100,1400", login)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from matplotlib import image

    px = (image.imread(str(shot))[..., :3] * 255).round().astype(int)
    assert px.shape[:2] == (1400, 1100)

    def count(rgb) -> int:
        return int(((abs(px - rgb)).sum(axis=-1) <= 30).sum())

    # the rows and the chart were drawn: table headers (grey), the running job's progress bar (blue),
    # the chart's better (green) and worse (red) bars
    assert count((0xEE, 0xEE, 0xEE)) > 2000
    assert count((0x15, 0x65, 0xC0)) > 5
    assert count((0x2E, 0x7D, 0x32)) > 300 and count((0xC6, 0x28, 0x28)) > 300
