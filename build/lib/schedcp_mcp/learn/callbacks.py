"""Proactive monitoring: conditions an agent registers, a watcher that evaluates them, and
webhook delivery (JSON POST with retries and exponential backoff, every attempt recorded).

Conditions:
- `psi_cpu_above`: CPU PSI `some avg10` (percent) is above `threshold`;
- `reward_below`: a deployment's latest feedback reward is below `threshold`;
- `profile_changed`: the machine's current behaviour (features from a short CPU-stats sample) has
  similarity below `threshold` to the stored profile `profile_id`.
A condition fires on the rising edge (false -> true) and at most once per `cooldown_s`.

Only http(s) URLs. Loopback hosts are allowed by default; any other host only when the operator
lists it in $SCHEDCP_CALLBACK_ALLOW_HOSTS (comma-separated), so a tool call cannot make the server
probe a network. A delivery resolves the host once, checks that address and connects to it (no
second lookup to rebind), and never follows a redirect.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, Field

from .. import store
from ..errors import BadInput, NotFound
from ..observe.cpu import get_cpu_stats, read_psi
from ..observe.profile import get_profile, scale_rate
from ..records import get_deployment
from .feedback import Feedback, deployment_feedback
from .history import similarity_to_features

KIND, DELIVERY = "callback", "delivery"


class Condition(BaseModel):
    kind: Literal["psi_cpu_above", "reward_below", "profile_changed"]
    threshold: float = Field(description="PSI percent, reward, or similarity (0..1)")
    deployment_id: str | None = Field(None, description="for reward_below")
    profile_id: str | None = Field(None, description="for profile_changed")
    cooldown_s: float = Field(60.0, ge=0, description="min seconds between two firings")


class Callback(BaseModel):
    id: str
    created_at: float
    url: str
    condition: Condition
    active: bool = True
    last_value: float | None = None
    last_state: bool = False
    last_fired_at: float | None = None
    fired: int = 0


class CallbackEvent(BaseModel):
    """What a callback URL receives (JSON POST)."""

    callback_id: str
    condition: Condition
    value: float | None
    at: float
    message: str
    feedback: Feedback | None = Field(None, description="reward_below: the deployment's feedback, with "
                                      "its rollback reason and the scheduler's exit")


class Delivery(BaseModel):
    id: str
    created_at: float
    callback_id: str
    attempt: int
    ok: bool
    status: int | None = None
    error: str | None = None
    event: CallbackEvent


def allowed_hosts() -> set[str]:
    return {h.strip().lower() for h in os.environ.get("SCHEDCP_CALLBACK_ALLOW_HOSTS", "").split(",")
            if h.strip()}


def check_url(url: str) -> tuple[SplitResult, str]:
    """Refuse non-http(s) URLs, bad ports and non-loopback hosts the operator did not allow.
    Returns the URL's parts and the one address checked — the address a delivery connects to,
    so a name that resolves differently later (DNS rebinding) cannot move it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadInput(f"callback URL scheme {parts.scheme!r} is not allowed", "use http:// or https://")
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise BadInput(f"callback URL {url!r} has a bad port: {e}", "a port is 1 .. 65535") from None
    if port < 1:
        raise BadInput(f"callback URL {url!r} has port 0", "a port is 1 .. 65535")
    host = (parts.hostname or "").lower()
    if not host:
        raise BadInput("callback URL has no host", "e.g. http://127.0.0.1:9000/hook")
    try:
        addrs = [ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]
    except (socket.gaierror, UnicodeError) as e:
        raise BadInput(f"cannot resolve callback host {host!r}: {e}", "use a loopback address") from None
    if host in allowed_hosts() and addrs:
        return parts, addrs[0]
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise BadInput(f"callback host {host!r} is not loopback",
                       "only loopback is allowed by default; the operator can allow a host with "
                       "SCHEDCP_CALLBACK_ALLOW_HOSTS")
    return parts, addrs[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address; the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, address: str, **kw):
        super().__init__(host, port, **kw)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, **kw):
        super().__init__(host, port, context=ssl.create_default_context(), **kw)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def register(url: str, condition: Condition) -> Callback:
    from ..access import check_cap

    check_url(url)
    check_cap("callbacks", len(list_callbacks()) + 1, "mcp", "active callbacks")
    if condition.kind == "reward_below" and not condition.deployment_id:
        raise BadInput("reward_below needs deployment_id", "give the deployment to watch")
    if condition.kind == "profile_changed":
        if not condition.profile_id:
            raise BadInput("profile_changed needs profile_id", "give the profile to compare with")
        get_profile(condition.profile_id)
    cb = Callback(id=store.new_id("cb"), created_at=time.time(), url=url, condition=condition)
    store.put(KIND, cb)
    store.audit("agent", "callback_registered", {"id": cb.id, "url": url,
                                                 "condition": condition.model_dump()})
    return cb


def list_callbacks(include_removed: bool = False) -> list[Callback]:
    return [c for c in store.list_records(KIND, Callback, limit=1000) if c.active or include_removed]


def get_callback(cb_id: str) -> Callback:
    cb = store.get(KIND, cb_id, Callback)
    if cb is None:
        raise NotFound(f"no callback {cb_id!r}", "list them with list_callbacks")
    return cb


def remove(cb_id: str) -> Callback:
    cb = get_callback(cb_id)
    cb.active = False
    store.put(KIND, cb)
    store.audit("agent", "callback_removed", {"id": cb_id})
    return cb


def deliveries(cb_id: str | None = None) -> list[Delivery]:
    return store.list_records(DELIVERY, Delivery, ref=cb_id, limit=500)


# --- evaluation ---------------------------------------------------------------------------------

def measure(cond: Condition) -> tuple[float | None, bool, Feedback | None]:
    """(value, condition holds, the deployment's feedback for reward_below)."""
    if cond.kind == "psi_cpu_above":
        psi = read_psi("cpu")
        v = psi.some_avg10 if psi.available else None
        return v, v is not None and v > cond.threshold, None
    if cond.kind == "reward_below":
        try:
            fb = deployment_feedback(get_deployment(cond.deployment_id))
        except Exception:  # no readings yet: nothing to say
            return None, False, None
        return fb.reward, fb.reward < cond.threshold, fb
    prof = get_profile(cond.profile_id)
    s = get_cpu_stats(1.0, top_n=1)
    features = {  # the profile's features, measured system-wide
        "cpu_utilization": s.total_busy_percent / 100.0,
        "wakeup_intensity": scale_rate("wakeup_intensity", s.ctx_switches_per_s),
        "fork_intensity": scale_rate("fork_intensity", s.forks_per_s),
    }
    v = similarity_to_features(prof, features)
    return v, v < cond.threshold, None


def post(url: str, event: CallbackEvent, timeout: float = 5.0) -> int:
    """POST `event` to `url` (checked again now) and return the HTTP status. Redirects are never
    followed: a 3xx is just a status, not a way to send the server somewhere else."""
    parts, address = check_url(url)
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), address,
               timeout=timeout)  # (port 0 was refused by check_url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("POST", path, body=event.model_dump_json().encode(),
                     headers={"Content-Type": "application/json", "User-Agent": "schedcp-callback/1"})
        resp = conn.getresponse()
        resp.read(65536)
        return resp.status
    finally:
        conn.close()


def deliver(cb: Callback, event: CallbackEvent, retries: int = 4, backoff_s: float = 0.5) -> bool:
    """POST with exponential backoff; every attempt is recorded. True when one succeeded."""
    for attempt in range(1, retries + 1):
        status, error = None, None
        try:
            status = post(cb.url, event)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as e:  # timeout, refused, TLS, BadInput
            error = str(e) or type(e).__name__
        ok = status is not None and 200 <= status < 300
        store.put(DELIVERY, Delivery(id=store.new_id("dlv"), created_at=time.time(),
                                     callback_id=cb.id, attempt=attempt, ok=ok, status=status,
                                     error=error, event=event), ref=cb.id)
        if ok:
            return True
        time.sleep(backoff_s * 2 ** (attempt - 1))
    return False


def evaluate_once(now: float | None = None) -> list[str]:
    """Evaluate every active callback; deliver the ones that fired. Returns fired callback ids."""
    now = now or time.time()
    fired = []
    for cb in list_callbacks():
        value, holds, fb = measure(cb.condition)
        rising = holds and not cb.last_state
        cool = cb.last_fired_at is None or now - cb.last_fired_at >= cb.condition.cooldown_s
        cb.last_value, cb.last_state = value, holds
        if rising and cool:
            cb.last_fired_at, cb.fired = now, cb.fired + 1
            store.put(KIND, cb)
            message = f"{cb.condition.kind}: value {value} crossed threshold {cb.condition.threshold}"
            if fb is not None:
                message += f"; {fb.summary}"
            event = CallbackEvent(callback_id=cb.id, condition=cb.condition, value=value, at=now,
                                  message=message, feedback=fb)
            deliver(cb, event)
            fired.append(cb.id)
        else:
            store.put(KIND, cb)
    return fired


class Watcher:
    """Background thread evaluating callbacks every `interval_s` (started by the server)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watcher":
        self._thread = threading.Thread(target=self._run, name="schedcp-callbacks", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                evaluate_once()
            except Exception:  # one bad condition must not stop the watcher
                logging.getLogger("schedcp.callbacks").exception("callback evaluation failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
