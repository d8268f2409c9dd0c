"""One typed request and one typed result per operation, the same at every hop.

verify, validate, campaign and tune are jobs: their requests and results are here. deploy's request
is `deploy.deployments.DeployRequest` (its monitor and scope are that layer's models) and its result
a `models.Deployment` (or a DryRun); optimize's are `optimize.OptimizeRequest` / `OptimizeReport`.

A request is what the MCP tool and the CLI build, what the job queue stores (a job's inputs are its
request as JSON) and what the worker receives (`JobContext.request`, parsed by the kind's model); a
result is what the job stores and what every reader parses (the server, the CLI's --json, a campaign
node reading its dependency, `optimize`'s client). Rows written before these models (the same keys,
some missing) load as they are: a missing field takes its default, an unknown one is ignored.

Budgets have one name per meaning, in code, CLI and MCP:
- `budget_s`: seconds this one operation may take (a validation's sandbox run, a tune's wall clock,
  an optimize run; CLI `--budget` where it is seconds, `tune --seconds`);
- `budget_rounds`: paired baseline/candidate rounds (tune; CLI `tune --budget-rounds`);
- `validation_budget_s`: each validation's `budget_s`, in a campaign (MCP validate_campaign's
  `budget_s` is this one, as documented there);
- `budget_runs`, `budget_sandbox_s`: what a campaign's children may spend together, runs started and
  sandbox seconds (`jobs.models.Budget`: runs, sandbox_s).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from .jobs.models import Budget, LaneName
from .models import Goal

Target = Literal["sandbox", "host"]


def _str_params(v: Any) -> dict[str, str]:
    return {k: str(x) for k, x in (v or {}).items()}


#: parameters by name, as the loader takes them (text; a number given is written as text)
Params = Annotated[dict[str, str], BeforeValidator(_str_params)]


# --- verify (layer 1) ------------------------------------------------------------------------------

class VerifyRequest(BaseModel):
    """Layer 1 for one source or policy, or several `policies` in one VM."""
    source: str | None = Field(None, description="BPF C source")
    policy: str | None = Field(None, description="or: a repository policy name")
    params: Params = Field({}, description="const volatile parameters by name")
    target: Target = "sandbox"
    profile_id: str | None = None
    include_dirs: list[str] = Field([], description="trusted include directories (operator only)")
    policies: list[str] | None = Field(None, description="or: several policies, one VM")
    use_cache: bool = True
    actor: str = "api"


class VerifyProgramRequest(BaseModel):
    """Layer 1 for a stored scheduler program with its arguments: does it attach in the sandbox."""
    program_sha: str
    args: list[str] = []
    name: str = "program"
    profile_id: str | None = None
    goals: list[Goal] | None = None


class VerifyResult(BaseModel):
    """What a verify job stores: the report it made and layer 1's verdict."""
    report_id: str
    verdict: str = Field(description="accepted or rejected")
    status: str


class VerifyManyResult(BaseModel):
    """What a verify job of several policies stores: one result each."""
    reports: list[VerifyResult]


# --- validate (layer 2) ----------------------------------------------------------------------------

class CandidateRef(BaseModel):
    """Who a campaign's validate node validates (its verify node makes the report): part of the
    node's content key, so two candidates' validations are never taken for one another."""
    policy: str | None = None
    params: dict[str, str] = {}
    report_id: str | None = None
    source_sha256: str | None = None
    program_sha: str | None = Field(None, description="a scheduler program (verify_program makes the report)")
    args: list[str] | None = None


class ValidateRequest(BaseModel):
    """Layer 2 for a report, or a source or policy (layer 1 first); in a campaign, the report its
    verify dependency made (`candidate` says whose)."""
    report_id: str | None = None
    source: str | None = None
    policy: str | None = None
    params: Params = {}
    goals: list[Goal] | None = None
    workloads: list[str] | None = None
    profile_id: str | None = None
    rounds: int = 3
    budget_s: float | None = Field(None, description="seconds for the sandbox run (None: runner.BUDGET_S)")
    use_cache: bool = True
    candidate: CandidateRef | None = None


class ValidateResult(BaseModel):
    """What a validate job stores (the report holds the rest; the CLI and MCP answer with it)."""
    report_id: str
    passed: bool
    status: str


# --- campaign ------------------------------------------------------------------------------------------

class CampaignCandidate(BaseModel):
    policy: str | None = Field(None, description="a repository policy name")
    source: str | None = Field(None, description="or: BPF C source")
    report_id: str | None = Field(None, description="or: a report that passed layer 1 (submit_scheduler, "
                                  "generate_scheduler)")
    params: dict[str, str] | None = None
    name: str | None = Field(None, description="how the campaign's result names it")
    lane: LaneName = Field("normal", description="priority: a tight budget starts higher lanes first")


class CampaignRequest(BaseModel):
    """Several candidates validated as one DAG campaign (verify -> validate each)."""
    candidates: list[CampaignCandidate]
    goals: list[Goal] | None = None
    workloads: list[str] | None = None
    profile_id: str | None = None
    rounds: int = 3
    validation_budget_s: float | None = Field(None, description="each validation's budget_s")
    budget: Budget | None = Field(None, description="what the children may spend together")
    use_cache: bool = True


# --- tune ------------------------------------------------------------------------------------------------

class TuneRequest(BaseModel):
    """Successive halving over a policy's knobs in one sandbox VM (its result: synth.tune.TuneResult)."""
    name: str
    workloads: list[str] | None = None
    goals: list[Goal] | None = None
    budget_rounds: int = 12
    budget_s: float | None = None
    configs: int = 4
    space: dict[str, list[Any]] | None = None
    seed: int = 0
    actor: str = "api"
