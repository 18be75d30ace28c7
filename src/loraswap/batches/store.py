"""Files and batch jobs in the shared storage: rows in the database, bytes in file storage.

Durable so any replica can resume a job: each finished line is committed as it completes, at
most once per line (``ON CONFLICT DO NOTHING``), so a job taken over from a dead replica
answers each ``custom_id`` exactly once. A job is run by the replica holding its lease
(``lease_owner`` until ``lease_expires``), taken with a conditional UPDATE that only one
replica can win. Methods are blocking; async callers run them in a thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from ..storage import Storage, schema
from .protocol import ACTIVE, Batch, BatchRequestCounts, FileObject, new_id

FILES, BATCHES, RESULTS = schema.files, schema.batches, schema.batch_results


def _dump(batch: Batch) -> str:
    # Only fields we set: the stored and returned JSON keep today's keys.
    return batch.model_dump_json(exclude_unset=True)


def _load(body: str) -> Batch:
    # Lenient like the SDK's own parsing: rows written by older versions still load.
    return Batch.construct(**json.loads(body))


def _file_object(row: Any) -> FileObject:
    return FileObject(id=row.id, object="file", bytes=row.bytes, created_at=row.created_at,
                      filename=row.filename, purpose=row.purpose, status="processed")  # fmt: skip


class BatchStore:
    """The Files and Batch APIs' rows and bytes; opens nothing until first used."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.db = storage.db

    def close(self) -> None:
        """The storage outlives the store (the server closes it last)."""

    # ----- files ---------------------------------------------------------------------------
    def add_file(
        self, filename: str, purpose: str, data: bytes, owner: str | None = None
    ) -> FileObject:
        file_id = new_id("file")
        self.storage.files.put(file_id, data)  # the bytes first: the row makes it visible
        row = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": len(data),
               "created_at": int(time.time()), "owner": owner}  # fmt: skip
        with self.db.begin() as conn:
            conn.execute(FILES.insert().values(**row))
        return _file_object(SimpleNamespace(**row))

    def owner(self, object_id: str) -> str | None:
        """Who owns a file or a batch (told apart by their id prefixes)."""
        table = BATCHES if object_id.startswith("batch_") else FILES
        with self.db.begin() as conn:
            return conn.execute(select(table.c.owner).where(table.c.id == object_id)).scalar()

    def file(self, file_id: str) -> FileObject | None:
        with self.db.begin() as conn:
            row = conn.execute(select(FILES).where(FILES.c.id == file_id)).first()
        return None if row is None else _file_object(row)

    def files(self, owner: str | None = None) -> list[FileObject]:
        """Every file, or only ``owner``'s, newest first."""
        query = select(FILES).order_by(FILES.c.created_at.desc(), FILES.c.id)
        if owner is not None:
            query = query.where(FILES.c.owner == owner)
        with self.db.begin() as conn:
            return [_file_object(r) for r in conn.execute(query)]

    def content(self, file_id: str) -> bytes | None:
        if self.file(file_id) is None:
            return None
        return self.storage.files.get(file_id)

    def delete_file(self, file_id: str) -> bool:
        with self.db.begin() as conn:
            gone = conn.execute(delete(FILES).where(FILES.c.id == file_id)).rowcount > 0
        if gone:
            self.storage.files.delete(file_id)
        return gone

    # ----- batches -------------------------------------------------------------------------
    def _get(self, conn: Connection, batch_id: str, lock: bool = False) -> Batch | None:
        query = select(BATCHES.c.body).where(BATCHES.c.id == batch_id)
        body = conn.execute(query.with_for_update() if lock else query).scalar()
        return None if body is None else _load(body)

    def add_batch(self, batch: Batch, owner: str | None = None, lease: Any = None) -> None:
        """Store a new job; ``lease`` (replica, seconds) takes it for its creator at once."""
        row = {"id": batch.id, "body": _dump(batch), "status": batch.status,
               "created_at": batch.created_at, "owner": owner}  # fmt: skip
        if lease is not None:
            row |= {"lease_owner": lease[0], "lease_expires": time.time() + lease[1]}
        with self.db.begin() as conn:
            conn.execute(BATCHES.insert().values(**row))

    def batch(self, batch_id: str) -> Batch | None:
        with self.db.begin() as conn:
            return self._get(conn, batch_id)

    def batches(self, owner: str | None = None) -> list[Batch]:
        """Every batch, or only ``owner``'s, newest first."""
        query = select(BATCHES.c.body).order_by(BATCHES.c.created_at.desc(), BATCHES.c.id)
        if owner is not None:
            query = query.where(BATCHES.c.owner == owner)
        with self.db.begin() as conn:
            return [_load(body) for body in conn.execute(query).scalars()]

    def update(self, batch_id: str, change: Callable[[Batch], None]) -> Batch | None:
        """Apply ``change`` to the stored batch atomically (row locked); the batch as saved."""
        with self.db.begin() as conn:
            return self._update(conn, batch_id, change)

    def _update(
        self, conn: Connection, batch_id: str, change: Callable[[Batch], None]
    ) -> Batch | None:
        batch = self._get(conn, batch_id, lock=True)
        if batch is not None:
            change(batch)
            conn.execute(
                update(BATCHES).where(BATCHES.c.id == batch_id)
                .values(body=_dump(batch), status=batch.status)
            )  # fmt: skip
        return batch

    # ----- leases --------------------------------------------------------------------------
    def claimable(self, limit: int = 10) -> list[str]:
        """Unfinished jobs nobody holds (never held, released, or their holder stopped
        renewing), oldest first."""
        now = time.time()
        query = (
            select(BATCHES.c.id)
            .where(BATCHES.c.status.in_(ACTIVE))
            .where(or_(BATCHES.c.lease_owner.is_(None), BATCHES.c.lease_expires < now))
            .order_by(BATCHES.c.created_at, BATCHES.c.id)
            .limit(limit)
        )
        with self.db.begin() as conn:
            return list(conn.execute(query).scalars())

    def claim(self, batch_id: str, replica: str, lease_s: float) -> bool:
        """Take the job if nobody else holds it; true for exactly one of racing replicas (the
        UPDATE re-checks its condition under the row lock)."""
        now = time.time()
        free = or_(BATCHES.c.lease_owner.is_(None), BATCHES.c.lease_owner == replica,
                   BATCHES.c.lease_expires < now)  # fmt: skip
        with self.db.begin() as conn:
            taken = conn.execute(
                update(BATCHES)
                .where(and_(BATCHES.c.id == batch_id, BATCHES.c.status.in_(ACTIVE), free))
                .values(lease_owner=replica, lease_expires=now + lease_s)
            )
            return taken.rowcount == 1

    def renew(self, batch_id: str, replica: str, lease_s: float) -> str | None:
        """Extend the lease; the job's status, or None when the lease was lost."""
        with self.db.begin() as conn:
            renewed = conn.execute(
                update(BATCHES)
                .where(and_(BATCHES.c.id == batch_id, BATCHES.c.lease_owner == replica))
                .values(lease_expires=time.time() + lease_s)
            )
            if renewed.rowcount != 1:
                return None
            return conn.execute(select(BATCHES.c.status).where(BATCHES.c.id == batch_id)).scalar()

    def release(self, batch_id: str, replica: str) -> None:
        """Hand the job back so any replica takes it at its next poll."""
        with self.db.begin() as conn:
            conn.execute(
                update(BATCHES)
                .where(and_(BATCHES.c.id == batch_id, BATCHES.c.lease_owner == replica))
                .values(lease_owner=None, lease_expires=None)
            )

    # ----- per-line results ----------------------------------------------------------------
    def done_lines(self, batch_id: str) -> dict[int, bool]:
        """Finished lines of a batch: line index -> succeeded."""
        query = select(RESULTS.c.line, RESULTS.c.ok).where(RESULTS.c.batch_id == batch_id)
        with self.db.begin() as conn:
            return {line: bool(ok) for line, ok in conn.execute(query)}

    def record(self, batch_id: str, line: int, ok: bool, output: str) -> Batch | None:
        """Commit one finished line (the first answer of a line wins) and the batch's
        ``request_counts``, in one transaction. The job's row is locked first, so the count
        runs after every other line's commit (under READ COMMITTED a count taken before the
        lock would miss a concurrent line)."""
        with self.db.begin() as conn:
            self._get(conn, batch_id, lock=True)
            conn.execute(
                self.db.insert(RESULTS).on_conflict_do_nothing(),
                {"batch_id": batch_id, "line": line, "ok": ok, "output": output},
            )
            by_ok = dict(
                conn.execute(
                    select(RESULTS.c.ok, func.count())
                    .where(RESULTS.c.batch_id == batch_id)
                    .group_by(RESULTS.c.ok)
                ).all()
            )

            def count(batch: Batch) -> None:
                total = batch.request_counts.total if batch.request_counts else 0
                batch.request_counts = BatchRequestCounts(
                    total=total, completed=by_ok.get(True, 0), failed=by_ok.get(False, 0)
                )

            return self._update(conn, batch_id, count)

    def write_results(self, batch_id: str) -> tuple[FileObject | None, FileObject | None]:
        """The output file (successful lines) and error file (failed lines), in line order."""
        query = (
            select(RESULTS.c.ok, RESULTS.c.output)
            .where(RESULTS.c.batch_id == batch_id)
            .order_by(RESULTS.c.line)
        )
        with self.db.begin() as conn:
            rows = conn.execute(query).all()
        made: list[FileObject | None] = []
        owner = self.owner(batch_id)  # the job's files belong to whoever owns the job
        for wanted, kind in ((True, "output"), (False, "error")):
            lines = [output for ok, output in rows if bool(ok) == wanted]
            data = ("\n".join(lines) + "\n").encode()
            name = f"{batch_id}_{kind}.jsonl"
            made.append(self.add_file(name, "batch_output", data, owner) if lines else None)
        return made[0], made[1]
