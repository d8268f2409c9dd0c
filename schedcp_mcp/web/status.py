"""The status page of `schedcp serve --http`: one typed state (also served as JSON) and its HTML.

Workers and their state, queue depth per lane, running and recent jobs with progress, deployments
with the monitor's latest reading, recent rollbacks, and a chart of recent validations (each one's
reward against the default scheduler). Plain server-side HTML that refreshes itself: no script, so
what a browser shows is what `--dump-dom` reads.
"""

from __future__ import annotations

import datetime as dt
import time
from html import escape

from pydantic import BaseModel, Field

from .. import records
from ..learn import history
from ..models import Reading
from ..jobs import queue
from ..jobs.models import LANES, JobView, WorkerInfo

REFRESH_S = 5


class DeploymentRow(BaseModel):
    id: str
    target: str
    policy: str | None
    status: str
    since: float
    ended_at: float | None = None
    end_reason: str | None = None
    last_reading: Reading | None = None


class ValidationPoint(BaseModel):
    report_id: str | None
    policy: str
    at: float
    reward: float = Field(description="mean log-improvement over the default scheduler, in [-1, 1]")
    goals_met: bool


class StatusState(BaseModel):
    generated_at: float
    workers: list[WorkerInfo]
    queue_depth: dict[str, int]
    running: list[JobView]
    recent: list[JobView]
    deployments: list[DeploymentRow]
    rollbacks: list[DeploymentRow]
    validations: list[ValidationPoint]


def state(recent: int = 20) -> StatusState:
    deps = [DeploymentRow(id=d.id, target=d.target, policy=d.policy, status=d.status, since=d.created_at,
                          ended_at=d.ended_at, end_reason=d.end_reason,
                          last_reading=d.readings[-1] if d.readings else None)
            for d in records.list_deployments(50)]
    outs = [o for o in history.all_outcomes(200) if o.source == "sandbox"][:30]
    return StatusState(
        generated_at=time.time(), workers=queue.list_workers(), queue_depth=queue.queue_depth(),
        running=[JobView.of(j) for j in queue.list_jobs(state="running", limit=100)],
        recent=[JobView.of(j) for j in queue.list_jobs(top_level=True, limit=recent) if j.done],
        deployments=[d for d in deps if d.status == "active"] + [d for d in deps if d.status != "active"][:10],
        rollbacks=[d for d in deps if d.status in ("rolled_back", "failed")][:10],
        validations=[ValidationPoint(report_id=o.report_id, policy=o.policy, at=o.created_at, reward=o.reward,
                                     goals_met=o.goals_met) for o in reversed(outs)])


# --- HTML ----------------------------------------------------------------------------------------

def _t(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def _table(cls: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty {cls}">{escape(empty)}</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _bar(frac: float) -> str:
    pct = max(0, min(100, round(frac * 100)))
    return f'<span class="bar"><span style="width:{pct}%"></span></span> {pct}%'


def _chart(points: list[ValidationPoint]) -> str:
    """Reward per recent validation: up (green) better than the default scheduler, down (red) worse."""
    if not points:
        return '<p class="empty validations">no validations yet</p>'
    w, h, gap = 24, 160, 6
    mid = h / 2
    bars = []
    for i, p in enumerate(points):
        r = max(-1.0, min(1.0, p.reward))
        bh = max(2.0, abs(r) * (mid - 10))
        y = mid - bh if r >= 0 else mid
        colour = "#2e7d32" if r >= 0 else "#c62828"
        bars.append(f'<rect class="validation" x="{i * (w + gap) + 40}" y="{y:.1f}" width="{w}" height="{bh:.1f}" '
                    f'fill="{colour}"><title>{escape(p.policy)} {escape(p.report_id or "")}: reward '
                    f'{p.reward:+.3f}</title></rect>')
    width = len(points) * (w + gap) + 50
    return (f'<svg class="chart" width="{width}" height="{h}" role="img" aria-label="recent validations">'
            f'<line x1="36" y1="{mid}" x2="{width}" y2="{mid}" stroke="#888"/>'
            f'<text x="0" y="14" font-size="11">+1</text><text x="4" y="{mid + 4}" font-size="11">0</text>'
            f'<text x="0" y="{h - 4}" font-size="11">−1</text>{"".join(bars)}</svg>')


def _outcome(j: JobView) -> str:
    """The job's conclusion beside its state (accepted/rejected, passed/failed, error), coloured."""
    if not j.outcome:
        return "-"
    good = j.outcome in ("accepted", "passed", "done")
    return f'<span class="outcome outcome-{escape(j.outcome)} {"good" if good else "bad"}">{escape(j.outcome)}</span>'


def _why(j: JobView) -> str:
    """Why, whole (never cut): the report's status or the error, and the report id."""
    why = j.outcome_reason or (j.error or "").split("\n")[0]
    return " — ".join(x for x in (f"report {j.report_id}" if j.report_id else "", why) if x)


def render_html(s: StatusState) -> str:
    workers = _table("worker", ["worker", "engine", "slots", "running", "alive", "heartbeat"], [
        [escape(w.id), escape(w.engine), str(w.size), escape(", ".join(w.running) or "idle"),
         "yes" if w.alive else "no", _t(w.heartbeat_at)] for w in s.workers], "no worker pool is running")
    depth = "".join(f'<span class="lane lane-{n}">{n}: <b>{s.queue_depth.get(n, 0)}</b></span>' for n in LANES)
    running = _table("running", ["job", "kind", "lane", "attempt", "progress", "message", "worker"], [
        [escape(j.id), escape(j.kind), j.lane, f"{j.attempts}/{j.max_attempts}", _bar(j.progress),
         escape(j.message), escape(j.worker or "")] for j in s.running], "nothing running")
    recent = _table("recent", ["job", "kind", "state", "outcome", "attempts", "finished", "why"], [
        [escape(j.id), escape(j.kind), f'<span class="state-{j.state}">{j.state}</span>', _outcome(j),
         str(j.attempts), _t(j.finished_at), escape(_why(j))] for j in s.recent], "no finished jobs")
    deps = _table("deployment", ["deployment", "target", "policy", "status", "since", "latest reading"], [
        [escape(d.id), escape(d.target), escape(d.policy or "(source)"), escape(d.status), _t(d.since),
         escape(f"{r.state} metric {r.metric} ({r.ratio}x) at {_t(r.at)}") if (r := d.last_reading) else "-"]
        for d in s.deployments], "no deployments")
    rbs = _table("rollback", ["deployment", "policy", "ended", "why"], [
        [escape(d.id), escape(d.policy or "(source)"), _t(d.ended_at), escape(d.end_reason or d.status)]
        for d in s.rollbacks], "no rollbacks")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>schedcp status</title>
<style>
body {{ font: 14px/1.4 sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 1.4em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #eee; }} .empty {{ color: #777; }}
.lane {{ margin-right: 1.2em; }} .bar {{ display: inline-block; width: 80px; height: 10px; background: #ddd; }}
.bar span {{ display: block; height: 10px; background: #1565c0; }}
.state-failed, .state-dead {{ color: #c62828; }}
.outcome.good {{ color: #2e7d32; font-weight: bold; }} .outcome.bad {{ color: #c62828; font-weight: bold; }}
.state-cancelled {{ color: #ef6c00; }}
</style></head><body>
<h1>schedcp status</h1><p>at {_t(s.generated_at)}; refreshes every {REFRESH_S} s; JSON: <code>/status/state</code></p>
<h2>Workers</h2>{workers}
<h2>Queue depth</h2><p class="queue">{depth}</p>
<h2>Running jobs</h2>{running}
<h2>Recent jobs</h2>{recent}
<h2>Deployments</h2>{deps}
<h2>Recent rollbacks</h2>{rbs}
<h2>Recent validations (reward vs the default scheduler)</h2>{_chart(s.validations)}
</body></html>"""
