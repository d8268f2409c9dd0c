"""DAG campaigns: a graph of jobs under one campaign job.

A campaign is a job of kind `campaign` whose children are the graph's nodes: each node is a job
(`parent` = the campaign) that may depend on other nodes (`after`). Independent nodes run in
parallel, as many as the pools have slots; a node gets the results of the nodes it depends on
(`JobContext.dep_results`); a node whose dependency did not succeed is cancelled. The campaign job
itself is a join node: it runs once every child has ended, however it ended, and its result sums
them up. Cancelling the campaign cancels the whole subtree, running VMs included.

A campaign may have a budget (runs, sandbox seconds) that its children draw from: a child that the
budget cannot pay for is not started (lanes decide who comes first, so the lower-priority ones are
the ones left out), and the campaign's result lists them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput
from . import queue
from .kinds import JobContext, register
from .models import Budget, ChildSummary, Job, LaneName

__all__ = ["CampaignResult", "ChildSummary", "Node", "submit_campaign"]

_HOLD = 10 ** 12  # not_before of a campaign while its children are being added


class Node(BaseModel):
    name: str = Field(description="unique within the campaign")
    kind: str
    inputs: dict[str, Any] = Field({}, description="the kind's request (its model's JSON)")
    lane: LaneName = "normal"
    after: list[str] = Field(default_factory=list, description="names of the nodes it needs first")
    join: bool = Field(False, description="runs once those have ended, however they ended (a report)")


class CampaignJob(BaseModel):
    """What a campaign job itself is asked: its label and its nodes' names (the nodes are its children)."""
    label: str = ""
    nodes: list[str] = []


class CampaignResult(BaseModel):
    children: list[ChildSummary]
    counts: dict[str, int]
    budget: Budget | None = None
    used: dict[str, float] = {}
    not_started_for_budget: list[str] = Field(default_factory=list,
                                              description="children the budget could not pay for")


def submit_campaign(label: str, nodes: list[Node], *, budget: Budget | None = None,
                    lane: LaneName = "normal", use_cache: bool = True, actor: str = "api",
                    complete_by_s: float | None = None) -> Job:
    """Queue a campaign: its nodes, their edges, and the join job over them. `complete_by_s`: the
    whole campaign's deadline from now, which every node shares."""
    names = [n.name for n in nodes]
    if not nodes or len(set(names)) != len(names):
        raise BadInput("a campaign needs nodes with unique names", f"got {names}")
    for n in nodes:
        unknown = set(n.after) - set(names[:names.index(n.name)])
        if unknown:
            raise BadInput(f"node {n.name} depends on {sorted(unknown)}, which are not earlier nodes",
                           "list a node after the nodes it needs (the graph must be acyclic)")
    camp = queue.submit("campaign", CampaignJob(label=label, nodes=names), lane=lane, budget=budget,
                        join_all=True, actor=actor, not_before=_HOLD, complete_by_s=complete_by_s)
    try:
        ids: dict[str, str] = {}
        for n in nodes:
            ids[n.name] = queue.submit(n.kind, n.inputs, node=n.name, lane=n.lane, parent=camp.id,
                                       deps=[ids[a] for a in n.after], join_all=n.join,
                                       use_cache=use_cache, actor=actor,
                                       deadline=camp.deadline).id
        queue.add_deps(camp.id, list(ids.values()))
    finally:
        queue.release(camp.id)  # (a child that failed to queue leaves a campaign that says so)
    return queue.get(camp.id)


@register("campaign", timeout_s=300, max_attempts=3, local=True, request=CampaignJob)
def _campaign(ctx: JobContext) -> "CampaignResult":
    """The join: what each child did, and what the budget left out."""
    kids = queue.list_jobs(parent=ctx.job.id, limit=10_000)
    kids.sort(key=lambda j: j.created_at)
    summary = [ChildSummary(id=j.id, name=j.node, kind=j.kind, lane=j.lane,
                            state=j.state, attempts=j.attempts, cached=j.cached_from is not None,
                            report_id=j.brief.report_id, passed=j.brief.passed,
                            result_json=json.dumps(j.result) if j.result else None, error=j.error)
               for j in kids]
    counts: dict[str, int] = {}
    for j in kids:
        counts[j.state] = counts.get(j.state, 0) + 1
    return CampaignResult(children=summary, counts=counts, budget=ctx.job.budget,
                          used=queue.budget_usage(store.db(), ctx.job.id, time.time()),
                          not_started_for_budget=[j.node for j in kids
                                                  if (j.error or "").startswith("budget exhausted")])
