"""The sha256 first stored for each immutable URL, kept when its object is purged or evicted.

Archives are immutable (``override`` refresh rules): a release tarball never changes under its
URL. When an origin re-tags a release anyway, builds that pin checksums break, and a cache that
simply stores the new body hides where it came from. So the first digest of every immutable URL
is recorded in a small SQLite file under the store (shared by the workers; WAL, so readers do not
wait), and a later fill of the URL whose body differs is reported: the first record stays, the new
digest and a count of changes are added to it.

Calls are blocking: run them in the store's thread pool.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT = 10.0  # seconds a worker waits for another's write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS first_seen (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    changes INTEGER NOT NULL DEFAULT 0,
    last_sha256 TEXT,
    last_changed_at REAL
)
"""


@dataclass(frozen=True)
class Record:
    url: str
    sha256: str  # the first body's
    size: int
    stored_at: float
    changes: int = 0
    last_sha256: str | None = None  # the latest different body's
    last_changed_at: float | None = None


class Provenance:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            self._db = db
        return self._db

    def observe(self, key: str, url: str, sha256: str, size: int) -> Record | None:
        """Record ``sha256`` as ``key``'s first body, or, when a different one was recorded before,
        note the change and return that earlier record."""
        now = time.time()
        with self._lock:
            db = self._connection()
            with _transaction(db):
                inserted = db.execute(
                    "INSERT OR IGNORE INTO first_seen (key, url, sha256, size, stored_at) VALUES (?, ?, ?, ?, ?)",
                    (key, url, sha256, size, now),
                ).rowcount
                if inserted:
                    return None
                earlier = self._get(db, key)
                if earlier is None or earlier.sha256 == sha256:
                    return None
                db.execute(
                    "UPDATE first_seen SET changes = changes + 1, last_sha256 = ?, last_changed_at = ? WHERE key = ?",
                    (sha256, now, key),
                )
                return earlier

    def get(self, key: str) -> Record | None:
        with self._lock:
            return self._get(self._connection(), key)

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Record | None:
        row = db.execute(
            "SELECT url, sha256, size, stored_at, changes, last_sha256, last_changed_at FROM first_seen WHERE key = ?",
            (key,),
        ).fetchone()
        return Record(*row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an error): one writer across workers."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
