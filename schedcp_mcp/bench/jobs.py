"""`schedcp bench jobs`: the supervisor's own throughput and latency with trivial jobs.

For each pool size, in a throwaway home: a `schedcp worker --size N` process runs the pool (as a
server or a worker would) and this process submits `noop` jobs. Two phases:
- capacity: a burst of jobs, submitted as fast as possible; jobs/s from the first submit to the last
  finish (a burst queues, so its latencies measure the queue, not the supervisor);
- latency: jobs submitted at the target rate (200/s); submit→start p50/p99 (claim polling, lane
  ordering, the SQLite transactions, the wake-up of another process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from pydantic import BaseModel

from .. import config, store

TARGET_JOBS_S = 200.0
TARGET_P99_MS = 50.0


class JobsBench(BaseModel):
    workers: int
    jobs: int
    jobs_per_s: float
    paced_rate: float
    p50_submit_to_start_ms: float
    p99_submit_to_start_ms: float
    max_submit_to_start_ms: float
    meets_targets: bool


@contextmanager
def _home() -> Iterator[str]:
    old = os.environ.get("SCHEDCP_HOME")
    # the sandbox image stays the one of the real home (a throwaway home must not build its own)
    os.environ.setdefault("SCHEDCP_SANDBOX_DIR", str(config.sandbox_dir()))
    with tempfile.TemporaryDirectory(prefix="schedcp-bench-jobs-") as d:
        os.environ["SCHEDCP_HOME"] = d
        try:
            yield d
        finally:
            if old is None:
                os.environ.pop("SCHEDCP_HOME", None)
            else:
                os.environ["SCHEDCP_HOME"] = old


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_pool(workers: int, jobs: int = 2000) -> JobsBench:
    from ..jobs import queue

    with _home() as home:
        store.db()  # migrate before the worker starts
        env = {**os.environ, "SCHEDCP_HOME": home, "PYTHONPATH": str(config.PROJECT_ROOT)}
        w = subprocess.Popen([sys.executable, "-m", "schedcp_mcp", "worker", "--size", str(workers), "--json"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            json.loads(w.stdout.readline())
            ids = [queue.submit("noop", {"echo": i}).id for i in range(jobs)]
            _drain(ids)
            burst = store.db().execute("SELECT MIN(created_at) t0, MAX(finished_at) t1, COUNT(*) n "
                                       "FROM jobs").fetchone()
            t_paced = time.time()
            t0 = time.monotonic()
            paced = []
            for i in range(jobs // 2):
                time.sleep(max(0.0, t0 + i / TARGET_JOBS_S - time.monotonic()))
                paced.append(queue.submit("noop", {"echo": -i}).id)
            _drain(paced)
            rows = store.db().execute("SELECT created_at, started_at FROM jobs WHERE created_at>=?",
                                      (t_paced,)).fetchall()
        finally:
            w.terminate()
            w.wait(10)
    lat = [(r["started_at"] - r["created_at"]) * 1000 for r in rows]
    rate = burst["n"] / (burst["t1"] - burst["t0"])
    p99 = _percentile(lat, 0.99)
    return JobsBench(workers=workers, jobs=burst["n"], jobs_per_s=round(rate, 1), paced_rate=TARGET_JOBS_S,
                     p50_submit_to_start_ms=round(statistics.median(lat), 2),
                     p99_submit_to_start_ms=round(p99, 2), max_submit_to_start_ms=round(max(lat), 2),
                     meets_targets=rate >= TARGET_JOBS_S and p99 <= TARGET_P99_MS)


def _drain(ids: list[str]) -> None:
    from ..jobs import queue

    for i in reversed(ids):
        while not queue.get(i).done:
            time.sleep(0.01)


def bench_jobs(sizes: tuple[int, ...] = (2, 8), jobs: int = 2000) -> list[JobsBench]:
    return [bench_pool(n, jobs) for n in sizes]


# --- what a second VM does to A/B noise (chooses the default pool size) ------------------------------

class NoiseBench(BaseModel):
    setting: str
    runs: int
    median_s: float
    spread: float  # (max - min) / median of the A/A runs
    cv: float  # stdev / mean


def _aa(vm, runs: int, cmd: str) -> list[float]:
    from ..workloads import parse_hackbench

    out = []
    for _ in range(runs):
        r = vm.run(cmd, timeout_s=120)
        out.append(parse_hackbench(r.stdout + r.stderr)["messaging_time_s"])
    return out


def bench_vm_noise(runs: int = 8, cmd: str = "hackbench -g 2 -l 60") -> list[NoiseBench]:
    """A/A noise of a hackbench inside one sandbox VM (the default scheduler against itself), alone
    and with a second VM beside it running the same kind of load — what a pool of 2 would do on this
    machine. One candidate's A/B always stays in one VM; this measures the neighbour's effect."""
    from ..sandbox.vm import VM

    def stats(name: str, xs: list[float]) -> NoiseBench:
        med = statistics.median(xs)
        return NoiseBench(setting=name, runs=len(xs), median_s=round(med, 4),
                          spread=round((max(xs) - min(xs)) / med, 4),
                          cv=round(statistics.stdev(xs) / statistics.mean(xs), 4))

    out = []
    with VM(full=True) as a:
        a.run("true", timeout_s=30)
        out.append(stats("one VM", _aa(a, runs, cmd)))
        with VM(full=True) as b:
            b.run(f"(setsid sh -c 'while true; do {cmd}; done' </dev/null >/dev/null 2>&1 &)", timeout_s=30)
            time.sleep(1)
            out.append(stats("two VMs (the other busy)", _aa(a, runs, cmd)))
    return out


# --- a validation campaign with pool 1 vs 2 ------------------------------------------------------

class CampaignBench(BaseModel):
    pool: int
    candidates: int
    wall_s: float
    validations_ok: int
    aa_noise: float | None  # median over the validations of (max-min)/median of their baseline runs
    baseline_s: float | None  # median hackbench time under the default scheduler (VM speed)


def bench_campaign(submit, sizes: tuple[int, ...] = (1, 2)) -> list[CampaignBench]:
    """Wall time of the same validation campaign run by a pool of each size, in a fresh home each
    (nothing from a cache), and the A/A noise the validations measured. `submit()` queues the
    campaign (the caller builds it: campaigns of candidates live above this layer)."""
    from ..reports import get_report
    from ..jobs.pool import Pool
    from ..jobs import queue

    out = []
    for n in sizes:
        with _home():
            store.db()
            t0 = time.monotonic()
            with Pool(n):
                camp = queue.wait(submit().id)
            wall = time.monotonic() - t0
            noise, base, ok = [], [], 0
            for c in (camp.result or {}).get("children", []):
                if c["kind"] == "validate" and c["state"] == "succeeded" and c["report_id"]:
                    ok += 1
                    l2 = get_report(c["report_id"]).layer2
                    for w in (l2.workloads if l2 else []):
                        if w.baseline_stats:  # the default scheduler against itself, same boot
                            noise.append(w.baseline_stats.rel_spread)
                            base.append(w.baseline_stats.median)
            out.append(CampaignBench(pool=n, candidates=len((camp.result or {}).get("children", [])) // 2,
                                     wall_s=round(wall, 1), validations_ok=ok,
                                     aa_noise=round(statistics.median(noise), 4) if noise else None,
                                     baseline_s=round(statistics.median(base), 3) if base else None))
    return out
