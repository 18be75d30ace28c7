"""One SQLite file in the state directory, opened on first use (WAL, autocommit), shared by
threads under a lock: the store behind the audit log and the shadow comparisons."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class SqliteFile:
    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self.schema = schema
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        """The connection (callers hold ``_lock``)."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(self.schema)
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
