"""What a job is, as it crosses module boundaries (the row in SQLite is `store.MIGRATIONS[1]`)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Literal

from pydantic import BaseModel, Field

State = Literal["pending", "running", "succeeded", "failed", "cancelled", "dead"]
LaneName = Literal["urgent", "high", "normal", "low"]
LANES: tuple[LaneName, ...] = ("urgent", "high", "normal", "low")
TERMINAL: tuple[State, ...] = ("succeeded", "failed", "cancelled", "dead")


class Budget(BaseModel):
    """What a campaign's children may spend together; a child that would exceed it is not started."""
    runs: int | None = Field(None, ge=0, description="child attempts started")
    sandbox_s: float | None = Field(None, ge=0, description="seconds children have run")


class Job(BaseModel):
    id: str
    kind: str
    lane: LaneName = "normal"
    state: State = "pending"
    created_at: float
    not_before: float
    deadline: float | None = Field(None, description="complete-by, epoch seconds")
    timeout_s: float
    attempts: int = 0
    max_attempts: int
    started_at: float | None = None
    heartbeat_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    parent: str | None = None
    join_all: bool = False
    deps: list[str] = []
    dedupe_key: str | None = None
    cached_from: str | None = Field(None, description="the job whose result answered this one")
    budget: Budget | None = None
    elapsed_s: float = 0.0
    progress: float = 0.0
    message: str = ""
    actor: str = "api"
    inputs: dict[str, Any] = {}
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row, deps: list[str] | None = None) -> "Job":
        d = dict(row)
        d["lane"] = LANES[d["lane"]]
        d["join_all"] = bool(d["join_all"])
        d["inputs"] = json.loads(d["inputs"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["budget"] = Budget.model_validate_json(d["budget"]) if d["budget"] else None
        return cls(**d, deps=deps or [])


class Attempt(BaseModel):
    attempt: int
    worker: str
    started_at: float
    ended_at: float | None = None
    outcome: str | None = None
    error: str | None = None


class JobDetail(BaseModel):
    job: Job
    children: list[Job] = []
    attempts: list[Attempt] = []


class JobView(BaseModel):
    """A job as an agent or the status page reads it: every field typed, the kind-dependent inputs
    and result as JSON text."""
    id: str
    kind: str
    lane: LaneName
    state: State
    attempts: int
    max_attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    deadline: float | None
    worker: str | None
    parent: str | None
    deps: list[str]
    cached_from: str | None
    budget: Budget | None
    elapsed_s: float
    progress: float
    message: str
    error: str | None
    report_id: str | None = Field(None, description="the validation report the job made, if any")
    passed: bool | None = Field(None, description="a validate job's verdict")
    inputs_json: str
    result_json: str | None

    @classmethod
    def of(cls, j: Job) -> "JobView":
        r = j.result or {}
        return cls(**{k: getattr(j, k) for k in cls.model_fields if hasattr(j, k)},
                   report_id=r.get("report_id"), passed=r.get("passed"),
                   inputs_json=json.dumps(j.inputs), result_json=json.dumps(j.result) if j.result else None)


class JobDetailView(BaseModel):
    job: JobView
    children: list[JobView] = []
    attempts: list[Attempt] = []

    @classmethod
    def of(cls, d: JobDetail) -> "JobDetailView":
        return cls(job=JobView.of(d.job), children=[JobView.of(c) for c in d.children], attempts=d.attempts)


class WorkerInfo(BaseModel):
    id: str
    engine: str
    host: str
    pid: int
    size: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None = None
    scope: str | None = Field(None, description="runs only this job and its children (a CLI command's "
                                                "own pool); None: any job")
    draining: bool = Field(False, description="stopped claiming; finishing the jobs it holds")
    end_reason: str | None = Field(None, description="stopped, or process gone (it died)")
    alive: bool = True
    running: list[str] = []
