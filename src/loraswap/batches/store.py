"""Files and batch jobs on disk: SQLite rows plus file bodies under ``state_dir``.

Durable so a restarted server resumes its jobs: each finished line is committed as it
completes. Methods are blocking; async callers run them in a thread (``asyncio.to_thread``).
One connection serves every thread, serialised by a lock, and read-modify-write of a batch
happens inside one locked transaction so a cancel never races a line's count update.
The schema is unchanged from the single-module version, so existing state dirs resume.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..atomic import write_atomic
from .protocol import Batch, BatchRequestCounts, FileObject, new_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT, purpose TEXT, bytes INTEGER, created_at INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT, line INTEGER, ok INTEGER, output TEXT, PRIMARY KEY (batch_id, line)
);
CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL);
"""
# A file or batch without an owners row predates tenants: only unrestricted keys see it.


def _dump(batch: Batch) -> str:
    # Only fields we set: the stored and returned JSON keep today's keys.
    return batch.model_dump_json(exclude_unset=True)


def _load(body: str) -> Batch:
    # Lenient like the SDK's own parsing: rows written by older versions still load.
    return Batch.construct(**json.loads(body))


class BatchStore:
    """SQLite + files store for the Files and Batch APIs; opens nothing until first used."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.files_dir = self.state_dir / "files"
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        with self._lock:
            if self._db is None:
                self.files_dir.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.state_dir / "batches.sqlite", check_same_thread=False)
                db.executescript(SCHEMA)
                self._db = db
            return self._db

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """The connection, locked, in one transaction (committed on success)."""
        with self._lock:
            db = self._open()
            with db:
                yield db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ----- files ---------------------------------------------------------------------------
    def add_file(
        self, filename: str, purpose: str, data: bytes, owner: str | None = None
    ) -> FileObject:
        file_id = new_id("file")
        self._open()  # makes files_dir
        write_atomic(self.files_dir / file_id, data)  # outside the lock: files can be large
        row = (file_id, filename, purpose, len(data), int(time.time()))
        with self._conn() as db:
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", row)
            if owner is not None:
                db.execute("INSERT INTO owners VALUES (?, ?)", (file_id, owner))
        return self._file_object(row)

    def owner(self, object_id: str) -> str | None:
        with self._conn() as db:
            row = db.execute("SELECT owner FROM owners WHERE id = ?", (object_id,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _file_object(row: tuple) -> FileObject:
        fid, filename, purpose, size, created = row
        return FileObject(id=fid, object="file", bytes=size, created_at=created,
                          filename=filename, purpose=purpose, status="processed")  # fmt: skip

    def file(self, file_id: str) -> FileObject | None:
        with self._conn() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else self._file_object(row)

    def files(self, owner: str | None = None) -> list[FileObject]:
        """Every file, or only ``owner``'s."""
        with self._conn() as db:
            rows = db.execute(
                "SELECT files.* FROM files LEFT JOIN owners ON owners.id = files.id "
                "WHERE ? IS NULL OR owners.owner = ? ORDER BY created_at DESC",
                (owner, owner),
            ).fetchall()
        return [self._file_object(r) for r in rows]

    def content(self, file_id: str) -> bytes | None:
        if self.file(file_id) is None:
            return None
        return (self.files_dir / file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        with self._conn() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        (self.files_dir / file_id).unlink(missing_ok=True)
        return gone

    # ----- batches -------------------------------------------------------------------------
    @staticmethod
    def _get(db: sqlite3.Connection, batch_id: str) -> Batch | None:
        row = db.execute("SELECT body FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else _load(row[0])

    def add_batch(self, batch: Batch, owner: str | None = None) -> None:
        with self._conn() as db:
            db.execute("INSERT INTO batches VALUES (?, ?)", (batch.id, _dump(batch)))
            if owner is not None:
                db.execute("INSERT INTO owners VALUES (?, ?)", (batch.id, owner))

    def batch(self, batch_id: str) -> Batch | None:
        with self._conn() as db:
            return self._get(db, batch_id)

    def batches(self, owner: str | None = None) -> list[Batch]:
        """Every batch, or only ``owner``'s, newest first."""
        with self._conn() as db:
            rows = db.execute(
                "SELECT body FROM batches LEFT JOIN owners ON owners.id = batches.id "
                "WHERE ? IS NULL OR owners.owner = ?",
                (owner, owner),
            ).fetchall()
        return sorted((_load(r[0]) for r in rows), key=lambda b: -b.created_at)

    def update(self, batch_id: str, change: Callable[[Batch], None]) -> Batch | None:
        """Apply ``change`` to the stored batch atomically; the batch as saved."""
        with self._conn() as db:
            return self._update(db, batch_id, change)

    def _update(
        self, db: sqlite3.Connection, batch_id: str, change: Callable[[Batch], None]
    ) -> Batch | None:
        batch = self._get(db, batch_id)
        if batch is not None:
            change(batch)
            db.execute("UPDATE batches SET body = ? WHERE id = ?", (_dump(batch), batch_id))
        return batch

    # ----- per-line results ----------------------------------------------------------------
    def done_lines(self, batch_id: str) -> dict[int, bool]:
        """Finished lines of a batch: line index -> succeeded."""
        with self._conn() as db:
            rows = db.execute("SELECT line, ok FROM results WHERE batch_id = ?", (batch_id,))
            return {line: bool(ok) for line, ok in rows}

    def record(self, batch_id: str, line: int, ok: bool, output: str) -> Batch | None:
        """Commit one finished line and the batch's ``request_counts`` in one transaction."""
        with self._conn() as db:
            db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), output),
            )
            rows = db.execute(
                "SELECT ok, COUNT(*) FROM results WHERE batch_id = ? GROUP BY ok", (batch_id,)
            )
            by_ok = dict(rows.fetchall())

            def count(batch: Batch) -> None:
                total = batch.request_counts.total if batch.request_counts else 0
                batch.request_counts = BatchRequestCounts(
                    total=total, completed=by_ok.get(1, 0), failed=by_ok.get(0, 0)
                )

            return self._update(db, batch_id, count)

    def write_results(self, batch_id: str) -> tuple[FileObject | None, FileObject | None]:
        """The output file (successful lines) and error file (failed lines), in line order."""
        with self._conn() as db:
            rows = db.execute(
                "SELECT ok, output FROM results WHERE batch_id = ? ORDER BY line", (batch_id,)
            ).fetchall()
        made: list[FileObject | None] = []
        owner = self.owner(batch_id)  # the job's files belong to whoever owns the job
        for wanted, kind in ((1, "output"), (0, "error")):
            lines = [output for ok, output in rows if ok == wanted]
            data = ("\n".join(lines) + "\n").encode()
            name = f"{batch_id}_{kind}.jsonl"
            made.append(self.add_file(name, "batch_output", data, owner) if lines else None)
        return made[0], made[1]
