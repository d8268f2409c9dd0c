"""The deployment record: written by deploy/ (layer 3), read by learn/ (feedback, callbacks).

It sits below both so that learning can read what happened to a deployment without importing the
code that loads schedulers (and deploy can record an outcome without a cycle).
"""

from __future__ import annotations

from . import store
from .models import Deployment

KIND = "deployment"


def save(d: Deployment) -> None:
    store.put(KIND, d, ref=d.target)


def get_deployment(dep_id: str) -> Deployment:
    return store.require(KIND, dep_id, Deployment, "deployment", "see `schedcp status`")


def list_deployments(limit: int = 50, target: str | None = None) -> list[Deployment]:
    return store.list_records(KIND, Deployment, ref=target, limit=limit)


def active(target: str) -> Deployment | None:
    return next((d for d in list_deployments(50, target) if d.status == "active"), None)
