"""Deployment tokens: the only key to loading a scheduler into a real kernel.

A token is `base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`. The payload binds the
artifact's sha256, the report id, the target and an expiry; a random `jti` makes it single use
(spent jtis are stored). The secret is created on first use in $SCHEDCP_HOME/token.key, mode 0600.
Tokens are issued only for reports that passed layers 1 and 2. Every issue and refusal is audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .. import config, store
from ..errors import BadInput, SchedcpError
from ..models import IssuedToken
from ..reports import ValidationReport, artifact_hash, get_report
from ..validate import gates
from ..workloads import GUARDS

DEFAULT_TTL_S = 3600
MAX_TTL_S = 7 * 24 * 3600  # a token is a short-lived key, not a standing permission
TARGETS = ("sandbox", "host")


class TokenRefused(SchedcpError):
    """The token does not allow this deploy. Nothing was loaded."""


class TokenPayload(BaseModel):
    v: int = 1
    jti: str
    report_id: str
    artifact_sha256: str
    target: str
    exp: float
    iat: float
    scope: str = "system"  # "system": system-wide or scoped; "scoped": only a scoped (partial-mode) deploy


def _secret_path() -> Path:
    return config.home() / "token.key"


def secret() -> bytes:
    path = _secret_path()
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    os.chmod(path, 0o600)
    return path.read_bytes()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _sign(payload: bytes) -> str:
    return _b64(hmac.new(secret(), payload, hashlib.sha256).digest())


def guards_only(r: ValidationReport) -> list[str]:
    """The guard workloads a report harmed when that is all it failed on (validate.gates.
    harmed_only_guards): it gets a scoped token only. Empty for a pass or any other failure."""
    if r.passed or not r.passed_layer1 or r.layer2 is None or r.invalidated:
        return []
    return gates.harmed_only_guards(r.layer2.correctness, r.layer2.performance)


def missing_guards(r: ValidationReport) -> list[str]:
    """The guard workloads (workloads.GUARDS: wakeup, pipe, cpu) a report's layer 2 did not measure. A
    validation on the target alone says nothing of the rest of the machine: scx_sdt passed `--workload
    hackbench` (1.61x) while the wakeup probe waited ~175x longer under it in `bench peers`."""
    measured = {w.name for w in (r.layer2.workloads if r.layer2 else [])}
    return [g for g in GUARDS if g not in measured]


def issue(report_id: str, target: str = "sandbox", ttl_s: float = DEFAULT_TTL_S,
          actor: str = "server", scope: str = "system") -> IssuedToken:
    """`scope`: "system" allows a system-wide deploy (and a scoped one); "scoped" only a scoped one
    (the scheduler loaded in partial mode, only the scope's tasks on it)."""
    if scope not in ("system", "scoped"):
        raise BadInput(f"token scope {scope!r}: give system or scoped")
    if target not in TARGETS:
        raise TokenRefused(f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise BadInput(f"token lifetime {ttl_s:g} s is out of range",
                       f"give 1 .. {MAX_TTL_S} seconds (7 days); the default is {DEFAULT_TTL_S}")
    r = get_report(report_id)
    guards = guards_only(r)
    if not r.passed and not (guards and scope == "scoped"):
        store.audit(actor, "token_refused", {"report_id": report_id, "why": r.status, "scope": scope},
                    r.artifact_sha256)
        if guards:
            raise TokenRefused(f"report {report_id} harmed the guard set ({', '.join(guards)}): it may run only "
                               "scoped, never system-wide",
                               f"a scoped token: `schedcp token {report_id} --scoped` (MCP: issue_token(scope="
                               "\"scoped\")), then `schedcp deploy --token T --scope pid:N | -- CMD`")
        raise TokenRefused(f"report {report_id} did not pass layers 1 and 2 ({r.status})",
                           "only a validated artifact can be deployed: `schedcp validate` / validate_scheduler")
    unguarded = missing_guards(r) if target == "host" and scope == "system" else []
    if unguarded:
        store.audit(actor, "token_refused", {"report_id": report_id, "why": "guard set not measured",
                                             "missing": unguarded, "scope": scope}, r.artifact_sha256)
        raise TokenRefused(f"report {report_id} was validated without the guard workload(s) {', '.join(unguarded)}: "
                           "a scheduler runs every task of the host, so a system-wide host deploy needs them shown "
                           "unharmed",
                           "validate again with them (the default workload set includes them, or add `--workload "
                           "wakeup --workload pipe --workload cpu`), or take a scoped host token: `schedcp token "
                           f"{report_id} --target host --scoped`; the sandbox target needs neither")
    now = time.time()
    p = TokenPayload(jti=secrets.token_hex(12), report_id=r.id, artifact_sha256=r.artifact_sha256 or "",
                     target=target, exp=now + ttl_s, iat=now, scope=scope)
    raw = p.model_dump_json().encode()
    token = f"{_b64(raw)}.{_sign(raw)}"
    store.audit(actor, "token_issued", {"report_id": r.id, "target": target, "jti": p.jti,
                                        "expires_at": p.exp, "scope": scope,
                                        **({"guards_harmed": guards} if not r.passed else {})},
                r.artifact_sha256)
    return IssuedToken(token=token, report_id=r.id, artifact_sha256=p.artifact_sha256,
                       target=target, expires_at=p.exp)


def check(token: str, target: str, actor: str = "cli", *, spend: bool = True, scoped: bool = False
          ) -> tuple[TokenPayload, ValidationReport]:
    """Validate a token for `target`; spend it (single use) unless `spend=False` (dry run).
    Raises TokenRefused, audited, with the exact reason."""
    def refuse(why: str, hint: str, sha: str | None = None) -> TokenRefused:
        store.audit(actor, "deploy_refused", {"why": why, "target": target}, sha)
        return TokenRefused(why, hint)

    token = (token or "").strip()
    parts = token.split(".")
    if len(parts) != 2 or not all(parts):
        raise refuse("malformed token (expected two base64url parts joined by '.')",
                     "copy the whole token printed by `schedcp validate` or `schedcp token`")
    try:
        raw = _unb64(parts[0])
        sig_ok = hmac.compare_digest(_sign(raw), parts[1])
    except (ValueError, TypeError):
        raise refuse("malformed token (not base64url)", "copy the whole token") from None
    if not sig_ok:
        raise refuse("token signature is invalid (forged, truncated or from another server)",
                     "ask for a fresh token: `schedcp token REPORT_ID`")
    try:
        p = TokenPayload.model_validate_json(raw)
    except ValidationError:
        raise refuse("token payload is unreadable", "ask for a fresh token") from None
    if time.time() > p.exp:
        raise refuse(f"token expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p.exp))}",
                     f"issue a new one: `schedcp token {p.report_id}`", p.artifact_sha256)
    if p.scope == "scoped" and not scoped:
        raise refuse("this token allows only a scoped deployment (partial mode: only the scope's tasks on the "
                     "scheduler)", "deploy with --scope pid:N | cgroup:PATH | -- CMD", p.artifact_sha256)
    if p.target != target:
        raise refuse(f"token is for target {p.target!r}, not {target!r}",
                     f"issue a token for {target}: `schedcp token {p.report_id} --target {target}`",
                     p.artifact_sha256)
    if store.kv_get(f"token-spent:{p.jti}") is not None:
        raise refuse("token was already used (tokens are single use)",
                     f"issue a new one: `schedcp token {p.report_id}`", p.artifact_sha256)
    try:
        r = get_report(p.report_id)
    except SchedcpError:
        raise refuse(f"report {p.report_id} no longer exists", "validate again") from None
    if r.invalidated:
        raise refuse(f"report {r.id} was invalidated: {r.invalidated_reason}",
                     "validate the scheduler again", p.artifact_sha256)
    if not (r.passed or (p.scope == "scoped" and guards_only(r))) or r.artifact_sha256 != p.artifact_sha256:
        raise refuse("token does not match its report's artifact", "validate again", p.artifact_sha256)
    obj = Path(r.object_path or "")
    if not obj.is_file():
        raise refuse(f"the validated object {obj} is gone", "validate again", p.artifact_sha256)
    actual = artifact_hash(hashlib.sha256(obj.read_bytes()).hexdigest(),
                           {k: v for k, v in r.params.items()}, r.layer1.program_args)
    if actual != p.artifact_sha256:
        raise refuse("the object on disk differs from the validated artifact (sha256 mismatch)",
                     "validate again; do not edit artifacts", p.artifact_sha256)
    if spend and not store.kv_claim(f"token-spent:{p.jti}",
                                    json.dumps({"at": time.time(), "actor": actor})):
        raise refuse("token was already used (tokens are single use)",
                     f"issue a new one: `schedcp token {p.report_id}`", p.artifact_sha256)
    return p, r
