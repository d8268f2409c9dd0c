"""Errors a person (or an agent) can act on: what failed, why, what to do next."""

from __future__ import annotations


class SchedcpError(Exception):
    """An expected failure with a clear message and a hint. Never shown as a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotFound(SchedcpError):
    pass


class BadInput(SchedcpError):
    pass


class InfrastructureError(SchedcpError):
    """The machine cannot do it (missing sandbox, qemu, permissions) — not the candidate's fault."""


class TransientError(InfrastructureError):
    """The machine failed this time — a VM that did not boot, a guest that crashed, a timeout — and
    may not next time: the supervisor retries the job (with backoff) before giving up on it."""
