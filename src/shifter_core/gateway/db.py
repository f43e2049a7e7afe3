"""The gateway's SQLite database (WAL mode): jobs, tag mappings and image use times.

One connection shared by the gateway's threads behind a lock; every write is its own short
transaction (``BEGIN IMMEDIATE`` where a read decides a write), so a SIGKILL at any moment
leaves a consistent database. Registry credentials are never stored here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..image.store import Acl
from .models import ACTIVE_STATES, JobState

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    reference TEXT NOT NULL,
    platform TEXT NOT NULL,
    platform_explicit INTEGER NOT NULL DEFAULT 0,
    requester INTEGER NOT NULL,
    acl TEXT,
    credentialed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    image_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (key, state);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS tags (
    reference TEXT NOT NULL,
    platform TEXT NOT NULL,
    owner TEXT NOT NULL,
    image_id TEXT NOT NULL,
    acl TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (reference, platform, owner)
);
CREATE INDEX IF NOT EXISTS tags_by_image ON tags (image_id);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
"""


def acl_to_json(acl: Acl | None) -> str | None:
    """A canonical JSON form of an ACL (sorted, so equal ACLs give equal keys)."""
    if acl is None:
        return None
    return json.dumps({"users": sorted(set(acl.users)), "groups": sorted(set(acl.groups))})


def acl_from_json(text: str | None) -> Acl | None:
    if text is None:
        return None
    data = json.loads(text)
    return Acl(tuple(data.get("users", ())), tuple(data.get("groups", ())))


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``."""

    id: str
    kind: str
    key: str
    reference: str
    platform: str
    platform_explicit: bool
    requester: int
    acl: Acl | None
    credentialed: bool
    state: JobState
    message: str
    image_id: str | None
    attempts: int
    created: float
    updated: float
    finished: float | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["acl"] = acl_from_json(data["acl"])
        data["platform_explicit"] = bool(data["platform_explicit"])
        data["credentialed"] = bool(data["credentialed"])
        data["state"] = JobState(data["state"])
        return cls(**data)


@dataclass(frozen=True)
class Tag:
    """One row of ``tags``: a reference (for one platform) pointing at an image."""

    reference: str
    platform: str
    owner: str
    image_id: str
    acl: Acl | None
    updated: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Tag:
        data = dict(row)
        data["acl"] = acl_from_json(data["acl"])
        return cls(**data)


class Database:
    """Thread-safe access to the gateway database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an exception), under the lock."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- jobs ----------------------------------------------------------------------------------

    def insert_job(self, conn: sqlite3.Connection, job: Job) -> None:
        conn.execute(
            "INSERT INTO jobs (id, kind, key, reference, platform, platform_explicit, requester,"
            " acl, credentialed, state, message, image_id, attempts, created, updated, finished)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.kind,
                job.key,
                job.reference,
                job.platform,
                int(job.platform_explicit),
                job.requester,
                acl_to_json(job.acl),
                int(job.credentialed),
                job.state,
                job.message,
                job.image_id,
                job.attempts,
                job.created,
                job.updated,
                job.finished,
            ),
        )

    def job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def latest_job(self, conn: sqlite3.Connection, key: str) -> Job | None:
        """The newest job with this key (inside a transaction)."""
        row = conn.execute(
            "SELECT * FROM jobs WHERE key = ? ORDER BY created DESC, rowid DESC LIMIT 1", (key,)
        ).fetchone()
        return Job.from_row(row) if row else None

    def jobs(
        self,
        *,
        states: tuple[JobState, ...] | None = None,
        limit: int = 200,
        oldest_first: bool = False,
    ) -> list[Job]:
        order = "ASC" if oldest_first else "DESC"
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created {order} LIMIT ?",
                (*states, limit),
            )
        else:
            rows = self._query(f"SELECT * FROM jobs ORDER BY created {order} LIMIT ?", (limit,))
        return [Job.from_row(r) for r in rows]

    def prune_jobs(self, older_than: float) -> int:
        """Forget finished jobs that ended before *older_than* (a time stamp)."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        with self._lock:
            cursor = self._conn.execute(
                f"DELETE FROM jobs WHERE state NOT IN ({marks}) AND finished < ?",
                (*ACTIVE_STATES, older_than),
            )
            return int(cursor.rowcount)

    def count_jobs(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def update_job(self, job_id: str, **values: Any) -> None:
        values.setdefault("updated", time.time())
        if "acl" in values:
            values["acl"] = acl_to_json(values["acl"])
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id)
            )

    # -- tags ----------------------------------------------------------------------------------

    def set_tag(self, reference: str, platform: str, image_id: str, acl: Acl | None) -> None:
        owner = acl_to_json(acl) or "public"
        with self._lock:
            self._conn.execute(
                "INSERT INTO tags (reference, platform, owner, image_id, acl, updated)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (reference, platform, owner) DO UPDATE"
                " SET image_id = excluded.image_id, acl = excluded.acl, updated = excluded.updated",
                (reference, platform, owner, image_id, acl_to_json(acl), time.time()),
            )

    def tags(self, reference: str | None = None, platform: str | None = None) -> list[Tag]:
        sql, args = "SELECT * FROM tags", []
        conditions = []
        if reference is not None:
            conditions.append("reference = ?")
            args.append(reference)
        if platform is not None:
            conditions.append("platform = ?")
            args.append(platform)
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY updated DESC"
        return [Tag.from_row(r) for r in self._query(sql, tuple(args))]

    def delete_image(self, image_id: str) -> None:
        """Forget an image: its tags and its use time."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM tags WHERE image_id = ?", (image_id,))
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    # -- use times -----------------------------------------------------------------------------

    def touch_image(self, image_id: str, when: float | None = None) -> None:
        now = time.time() if when is None else when
        with self._lock:
            self._conn.execute(
                "INSERT INTO images (id, created, last_used) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET last_used = excluded.last_used",
                (image_id, now, now),
            )

    def last_used(self) -> dict[str, float]:
        return {r["id"]: r["last_used"] for r in self._query("SELECT id, last_used FROM images")}
