"""The one place that talks to SQLite.

One database file under $SCHEDCP_HOME, WAL mode, schema versioned by `MIGRATIONS` (append only:
never edit a shipped migration, add a new one). Records are pydantic models stored as JSON next to
the few columns that are queried, so a model can grow without a migration.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from pydantic import BaseModel

from . import config
from .errors import NotFound

MIGRATIONS: list[str] = [
    # 1: the base schema
    """
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,            -- profile, report, deployment, outcome, ...
        created_at REAL NOT NULL,
        ref TEXT,                      -- main foreign key (e.g. the profile a report served)
        data TEXT NOT NULL             -- the model as JSON
    );
    CREATE INDEX records_kind_time ON records(kind, created_at DESC);
    CREATE INDEX records_ref ON records(ref);
    CREATE TABLE cache (
        key TEXT PRIMARY KEY,          -- content hash of everything that decides the result
        kind TEXT NOT NULL,
        created_at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        artifact_sha256 TEXT,
        detail TEXT NOT NULL
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: the supervisor's jobs (schedcp_mcp/jobs): queue, DAG edges, attempts, worker pools
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        lane INTEGER NOT NULL,         -- 0 urgent, 1 high, 2 normal, 3 low
        state TEXT NOT NULL,           -- pending running succeeded failed cancelled dead
        created_at REAL NOT NULL,
        not_before REAL NOT NULL,      -- retry backoff: not claimable before this time
        deadline REAL,                 -- complete-by (absolute time)
        timeout_s REAL NOT NULL,       -- one attempt's limit
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        started_at REAL,
        heartbeat_at REAL,
        finished_at REAL,
        worker TEXT,                   -- the pool (engine:host:pid) running the current attempt
        parent TEXT,
        join_all INTEGER NOT NULL DEFAULT 0,  -- runs when its deps end, however they end
        dedupe_key TEXT,
        cached_from TEXT,
        budget TEXT,                   -- JSON Budget of a campaign
        elapsed_s REAL NOT NULL DEFAULT 0,
        progress REAL NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        actor TEXT NOT NULL DEFAULT 'api',
        inputs TEXT NOT NULL,
        result TEXT,
        error TEXT
    );
    CREATE INDEX jobs_ready ON jobs(state, lane, created_at);
    CREATE INDEX jobs_parent ON jobs(parent);
    CREATE INDEX jobs_key ON jobs(dedupe_key, state);
    CREATE INDEX jobs_worker ON jobs(worker, state);
    CREATE TABLE job_deps (
        job TEXT NOT NULL,
        dep TEXT NOT NULL,
        PRIMARY KEY (job, dep)
    );
    CREATE INDEX job_deps_dep ON job_deps(dep);
    CREATE TABLE job_attempts (
        job TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        outcome TEXT,                  -- succeeded, failed, transient, timeout, worker_lost, cancelled
        error TEXT,
        PRIMARY KEY (job, attempt)
    );
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,           -- engine:host:pid:nonce
        engine TEXT NOT NULL,          -- local, celery
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start REAL NOT NULL,       -- the process's start time (a reused pid is not it)
        size INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    );
    """,
    # 2: what a worker pool can run (a CLI command's pool runs only its own job's tree), whether it
    # is draining (stopped claiming, finishing what it holds), and why it ended
    """
    ALTER TABLE workers ADD COLUMN scope TEXT;          -- NULL: any job; else this job and its children
    ALTER TABLE workers ADD COLUMN kinds TEXT;          -- JSON list of kinds it runs; NULL: all
    ALTER TABLE workers ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE workers ADD COLUMN end_reason TEXT;     -- stopped, process gone
    ALTER TABLE jobs ADD COLUMN waiter TEXT;            -- host:pid:start of the command waiting for it
    """,
]

M = TypeVar("M", bound=BaseModel)
_local = threading.local()
#: one writer transaction at a time per process: threads queue here instead of in SQLite's busy
#: handler, whose growing sleeps (up to 100 ms) made the supervisor's tail latency
_write_lock = threading.RLock()


def new_id(prefix: str) -> str:
    """Short, sortable-enough ids a person can type: `prof-1a2b3c4d5e`."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connect(path: Path | None = None) -> sqlite3.Connection:
    """A connection to the database at `path` (default: $SCHEDCP_HOME/schedcp.db), migrated."""
    path = path or config.db_path()
    _private_db(path)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    _wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(conn)
    return conn


def _wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch to WAL, waiting for the lock it needs: on a new database the switch takes the exclusive
    lock, and SQLite does not wait for it (no busy handler) — a process started beside another one's
    migration failed at once with "database is locked" (the eight-process test, under load)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _private_db(path: Path) -> None:
    """The database holds every report, profile and the audit log: 0600 from its creation (SQLite
    gives its -wal and -shm files the database's mode); an older, wider file is tightened.
    An existing file is never opened here: closing any descriptor of a database file drops every
    POSIX lock this process holds on it, so another connection of ours would lose its WAL read
    lock, and another process closing its last connection would then delete the -wal and -shm
    files under us ("disk I/O error")."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; return the schema version. Two processes opening a new database at
    once both saw version 0 and the second failed with "table records already exists": the version
    is read again under the write lock, and a migration another process applied meanwhile is
    skipped."""
    while conn.execute("PRAGMA user_version").fetchone()[0] < len(MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")  # the write lock: one migrator at a time
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < len(MIGRATIONS):
                for stmt in _statements(MIGRATIONS[version]):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _statements(script: str) -> list[str]:
    """A migration script's statements (executescript would COMMIT the open transaction first)."""
    out, cur = [], ""
    for line in script.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    return out + ([cur.strip()] if cur.strip() else [])


def db() -> sqlite3.Connection:
    """A per-thread connection to the current home's database (reopened if $SCHEDCP_HOME changed)."""
    path = str(config.db_path())
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", None) != path:
        conn = connect(Path(path))
        _local.conn, _local.path = conn, path
    return conn


@contextmanager
def transaction() -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT on this thread's connection (rolled back on an exception): a
    read-then-write that no other thread or process can interleave (the jobs queue's claims)."""
    conn = db()
    with _write_lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


# --- records -------------------------------------------------------------------------------------

#: while a fleet worker runs a job: the records written meanwhile, by id (see `capture`)
_captured: dict[str, dict[str, Any]] | None = None


@contextmanager
def capture() -> Iterator[dict[str, dict[str, Any]]]:
    """Collect every record this process writes meanwhile (the last version of each), to carry them
    to another store (`put_raw` there). Process-wide: a fleet worker process runs one job at a time."""
    global _captured
    _captured = {}
    try:
        yield _captured
    finally:
        _captured = None


def put(kind: str, model: BaseModel, *, ref: str | None = None) -> None:
    """Insert or replace a record. The model must have `id` and `created_at` fields."""
    put_raw(kind, model.id, model.created_at, ref, model.model_dump_json())  # type: ignore[attr-defined]


def put_raw(kind: str, id: str, created_at: float, ref: str | None, data: str) -> None:
    """Insert or replace a record given as its columns (`data`: the model's JSON)."""
    db().execute(
        "INSERT INTO records(id, kind, created_at, ref, data) VALUES (?,?,?,?,?) "
        "ON CONFLICT(id) DO UPDATE SET data=excluded.data, ref=excluded.ref",
        (id, kind, created_at, ref, data),
    )
    if _captured is not None:
        _captured[id] = {"kind": kind, "id": id, "created_at": created_at, "ref": ref, "data": data}


def get_raw(id: str) -> dict[str, Any] | None:
    """A record's columns, whatever its kind."""
    row = db().execute("SELECT kind, id, created_at, ref, data FROM records WHERE id=?", (id,)).fetchone()
    return dict(row) if row else None


def get(kind: str, id: str, cls: type[M]) -> M | None:
    row = db().execute("SELECT data FROM records WHERE kind=? AND id=?", (kind, id)).fetchone()
    return cls.model_validate_json(row["data"]) if row else None


def require(kind: str, id: str, cls: type[M], what: str, first: str) -> M:
    """The record, or NotFound naming the newest ids of that kind (or, when there is none yet,
    `first`: how to make one)."""
    r = get(kind, id, cls)
    if r is None:
        recent = ids(kind, 5)
        raise NotFound(f"no {what} {id!r}", f"newest: {', '.join(recent)}" if recent else first)
    return r


def list_records(kind: str, cls: type[M], *, ref: str | None = None, limit: int = 100) -> list[M]:
    """Newest first."""
    if ref is None:
        rows = db().execute(
            "SELECT data FROM records WHERE kind=? ORDER BY created_at DESC LIMIT ?", (kind, limit)
        )
    else:
        rows = db().execute(
            "SELECT data FROM records WHERE kind=? AND ref=? ORDER BY created_at DESC LIMIT ?",
            (kind, ref, limit),
        )
    return [cls.model_validate_json(r["data"]) for r in rows]


def ids(kind: str, limit: int = 1000) -> list[str]:
    return [r["id"] for r in db().execute(
        "SELECT id FROM records WHERE kind=? ORDER BY created_at DESC LIMIT ?", (kind, limit))]


# --- content-hash cache --------------------------------------------------------------------------

def cache_get(key: str) -> dict[str, Any] | None:
    row = db().execute("SELECT data FROM cache WHERE key=?", (key,)).fetchone()
    return json.loads(row["data"]) if row else None


def cache_put(key: str, kind: str, data: dict[str, Any]) -> None:
    db().execute(
        "INSERT OR REPLACE INTO cache(key, kind, created_at, data) VALUES (?,?,?,?)",
        (key, kind, time.time(), json.dumps(data)),
    )


# --- audit log and small settings ----------------------------------------------------------------

def audit(actor: str, action: str, detail: dict[str, Any], artifact_sha256: str | None = None) -> None:
    db().execute(
        "INSERT INTO audit(at, actor, action, artifact_sha256, detail) VALUES (?,?,?,?,?)",
        (time.time(), actor, action, artifact_sha256, json.dumps(detail)),
    )


def audit_log(limit: int = 200) -> list[dict[str, Any]]:
    rows = db().execute("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
    return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]


def kv_get(key: str) -> str | None:
    row = db().execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    return row["value"] if row else None


def kv_claim(key: str, value: str) -> bool:
    """Set `key` only if it is not set yet; True if this call set it (atomic: single-use markers)."""
    try:
        db().execute("INSERT INTO kv(key, value) VALUES (?,?)", (key, value))
        return True
    except sqlite3.IntegrityError:
        return False
