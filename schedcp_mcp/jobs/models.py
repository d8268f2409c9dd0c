"""What a job is, as it crosses module boundaries (the row in SQLite is `store.MIGRATIONS[1]`)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, computed_field

State = Literal["pending", "running", "succeeded", "failed", "cancelled", "dead"]
LaneName = Literal["urgent", "high", "normal", "low"]
LANES: tuple[LaneName, ...] = ("urgent", "high", "normal", "low")
TERMINAL: tuple[State, ...] = ("succeeded", "failed", "cancelled", "dead")
M = TypeVar("M", bound=BaseModel)


class Budget(BaseModel):
    """What a campaign's children may spend together; a child that would exceed it is not started."""
    runs: int | None = Field(None, ge=0, description="child attempts started")
    sandbox_s: float | None = Field(None, ge=0, description="seconds children have run")


class ChildSummary(BaseModel):
    """One child of a campaign, in the campaign's result."""
    id: str
    name: str
    kind: str
    lane: str
    state: str
    attempts: int
    cached: bool
    report_id: str | None = None
    passed: bool | None = None
    result_json: str | None = None
    error: str | None = None


class ResultBrief(BaseModel):
    """The fields by which a job's result states its conclusion, whatever its kind: each kind's result
    model has those that apply (a verify: report_id, verdict, status, or `reports` of several; a
    validation: report_id, passed, status; a campaign: its children)."""
    report_id: str | None = None
    verdict: str | None = None
    passed: bool | None = None
    status: str | None = None
    reports: list["ResultBrief"] | None = None
    children: list[ChildSummary] | None = None


class NodeName(BaseModel):
    node: str | None = Field(None, description="its name in a campaign (kinds.NODE), beside the request")


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

    @property
    def brief(self) -> ResultBrief:
        """The result's conclusion fields (all None before it succeeded, or for a kind whose result
        uses those names for something else: a listing never fails on one job's result)."""
        try:
            return ResultBrief.model_validate(self.result or {})
        except ValidationError:
            return ResultBrief()

    @property
    def node(self) -> str:
        """Its name in a campaign (its id when it is none's)."""
        return NodeName.model_validate(self.inputs).node or self.id

    def result_as(self, model: type[M]) -> M:
        """The result, parsed by the kind's result model."""
        return model.model_validate(self.result or {})

    @computed_field(description="what the work concluded, beside the job's state (a verify: "
                    "accepted/rejected; a validation or campaign: passed/failed; an error: error)")
    @property
    def outcome(self) -> str | None:
        return job_outcome(self)[0]

    @computed_field(description="why, in words (the report's status, the failing gate, the error)")
    @property
    def outcome_reason(self) -> str | None:
        return job_outcome(self)[1]

    @computed_field(description="a validation's (or campaign's) verdict; None when the job has none")
    @property
    def passed(self) -> bool | None:
        o = job_outcome(self)[0]
        return {"passed": True, "accepted": True, "failed": False, "rejected": False}.get(o) \
            if self.kind in ("validate", "campaign", "verify") else None

    @classmethod
    def from_row(cls, row: sqlite3.Row, deps: list[str] | None = None) -> "Job":
        d = dict(row)
        d["lane"] = LANES[d["lane"]]
        d["join_all"] = bool(d["join_all"])
        d["inputs"] = json.loads(d["inputs"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["budget"] = Budget.model_validate_json(d["budget"]) if d["budget"] else None
        return cls(**d, deps=deps or [])


def job_outcome(j: "Job") -> tuple[str | None, str | None]:
    """A job's conclusion beside its state, as CI shows a run's conclusion beside its status: a
    job can succeed (it ran to the end) and its candidate still be rejected or fail its gates."""
    first = (j.error or "").split("\n")[0] or None
    if j.state in ("failed", "dead"):
        return "error", first
    if j.state == "cancelled":
        return "cancelled", first
    if j.state != "succeeded":
        return None, None
    r = j.brief
    if r.reports is not None:  # verify of several policies
        bad = [x for x in r.reports if x.verdict != "accepted"]
        return ("rejected", f"{len(bad)} of {len(r.reports)} rejected: "
                + "; ".join(f"{x.report_id}: {x.status}" for x in bad)) if bad else \
            ("accepted", f"all {len(r.reports)} accepted")
    if r.verdict is not None:
        return ("accepted" if r.verdict == "accepted" else "rejected"), r.status
    if r.passed is not None:
        return ("passed" if r.passed else "failed"), r.status
    if r.children is not None:  # a campaign
        kids = r.children
        ok = [c for c in kids if c.state == "succeeded" and c.passed is not False]
        bad = [c for c in kids if c not in ok]
        why = "; ".join(f"{c.name}: " + (c.error or ("failed" if c.passed is False else c.state)).split("\n")[0]
                        for c in bad)
        return ("passed" if not bad else "failed"), f"{len(ok)} of {len(kids)} passed" + (f" ({why})" if why else "")
    return "done", None


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
    passed: bool | None = Field(None, description="a validate/verify/campaign job's verdict")
    outcome: str | None = Field(None, description="accepted/rejected, passed/failed, error, cancelled")
    outcome_reason: str | None = None
    inputs_json: str
    result_json: str | None

    @classmethod
    def of(cls, j: Job) -> "JobView":
        mine = {"report_id", "passed", "outcome", "outcome_reason"}
        return cls(**{k: getattr(j, k) for k in cls.model_fields if hasattr(j, k) and k not in mine},
                   report_id=j.brief.report_id, passed=j.passed, outcome=j.outcome,
                   outcome_reason=j.outcome_reason,
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
