"""Who may speak on a fleet's broker, and how each message proves where it came from.

Two locks, both required (`check_broker`, `load_key`):
- **the broker** needs a password (`redis://:PASSWORD@host:port/0`, `rediss://…` for TLS, or
  `redis+socket://:PASSWORD@/path/to/socket` with the socket in a directory only its owner enters):
  another local user cannot even connect. Give redis-server its `requirepass` in a config file
  (0600), never on its command line: any local user reads command lines from /proc.
- **every message and every result** is authenticated with HMAC-SHA256 under the fleet key, a file
  (`$SCHEDCP_FLEET_KEY_FILE`, default `$SCHEDCP_HOME/fleet.key`, 0600, ours, >= 32 bytes) that the
  coordinator and each worker hold. It is the fleet's only serializer (`SERIALIZER`): task bodies,
  results, progress and control messages alike. The tag is checked over the raw bytes before
  anything is parsed; a body without a valid tag is refused, whoever put it on the broker.

A key holder is a fleet member: it can send jobs to workers and answer the coordinator. The
coordinator still re-derives what it can from what a worker sends back (jobs/carry.py `accept`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kombu.serialization import register
from kombu.utils import json as kjson  # Celery's own JSON (dates in result metadata)

from .. import config
from ..errors import InfrastructureError

SERIALIZER = "schedcp-hmac"
CONTENT_TYPE = "application/x-schedcp-hmac"
KEY_ENV = "SCHEDCP_FLEET_KEY_FILE"
_DOMAIN = b"schedcp-fleet-v1\n"  # a tag made for another use of the same key never matches


class FleetAuthError(InfrastructureError):
    """A fleet message or result without a valid tag, or a fleet without its locks."""


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or config.home() / "fleet.key")


def load_key(path: Path | None = None) -> bytes:
    """The fleet key; refused when others could read or replace it."""
    path = path or key_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise FleetAuthError(f"cannot read the fleet key {path}: {e.strerror}",
                             "the coordinator makes it (`schedcp worker --engine celery`); copy it to "
                             f"each worker (mode 600) and point {KEY_ENV} at it") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise FleetAuthError(f"the fleet key {path} must be a regular file of this user, mode 600 "
                                 f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                                 f"chmod 600 {path}")
        key = f.read().strip()
    if len(key) < 32:
        raise FleetAuthError(f"the fleet key {path} is too short ({len(key)} bytes; 32 or more)",
                             "make a new one: `schedcp worker --engine celery` writes one when none exists")
    return key


def ensure_key() -> Path:
    """The coordinator's key file, made (0600) the first time."""
    path = key_path()
    if not path.exists() and not path.is_symlink():
        config.write_private(path, secrets.token_hex(32).encode() + b"\n")
    load_key(path)
    return path


def check_broker(url: str) -> str:
    """Refuse a broker URL any local user could talk to: it must carry a password (and a unix
    socket must sit in a directory only its owner enters)."""
    u = urlsplit(url)
    if u.scheme not in ("redis", "rediss", "redis+socket", "unix"):
        raise FleetAuthError(f"unsupported broker {u.scheme}://…", "use redis://:PASSWORD@127.0.0.1:6379/0")
    if not u.password:
        raise FleetAuthError(
            "the fleet broker has no password: any local user could read and write its queues",
            "start redis-server with `requirepass` in a 0600 config file and set "
            "SCHEDCP_BROKER=redis://:PASSWORD@127.0.0.1:6379/0 (see docs/security.md)")
    if u.scheme in ("redis+socket", "unix"):
        parent = Path(u.path).parent
        try:
            st = os.stat(parent)
        except OSError as e:
            raise FleetAuthError(f"cannot stat the broker socket's directory {parent}: {e.strerror}") from None
        if st.st_mode & 0o007:
            raise FleetAuthError(f"the broker socket's directory {parent} is open to other users "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o})", f"chmod 700 {parent}")
    return url


def tag(body: bytes, key: bytes | None = None) -> str:
    return hmac.new(key or load_key(), _DOMAIN + body, hashlib.sha256).hexdigest()


def seal(obj: Any) -> str:
    """`<hex tag>\\n<canonical JSON>`."""
    body = kjson.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return tag(body) + "\n" + body.decode()


def open_sealed(data: bytes | str) -> Any:
    """The JSON inside a sealed message, only after its tag checked out (constant time)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    mac, sep, body = raw.partition(b"\n")
    if not sep or not hmac.compare_digest(mac, tag(body).encode()):
        raise FleetAuthError("a fleet message failed authentication (no valid HMAC under the fleet "
                             "key): refused unread")
    return kjson.loads(body)


register(SERIALIZER, seal, open_sealed, content_type=CONTENT_TYPE, content_encoding="utf-8")
