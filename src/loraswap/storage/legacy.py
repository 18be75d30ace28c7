"""Brings a state directory written by loraswap 0.1.0 (four SQLite files) into the database.

Runs once at start: each old file's rows are copied in one transaction (keys kept, so a copy
interrupted before the rename is not doubled), then the file is renamed ``*.imported``. File
bytes move to the configured file storage when it is not the old ``files/`` directory.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text

from .schema import audit, batch_results, batches, comparisons, files, usage

if TYPE_CHECKING:
    from .database import Database
    from .files import FileBytes

logger = logging.getLogger(__name__)
OLD_FILES = ("batches.sqlite", "audit.sqlite", "usage.sqlite", "shadows.sqlite")


def _rows(path: Path, query: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(query).fetchall()
    except sqlite3.OperationalError:  # the table was never created in that file
        return []
    finally:
        db.close()


def _batches(file_bytes: FileBytes, path: Path) -> dict[Any, list[dict[str, Any]]]:
    owners = {r["id"]: r["owner"] for r in _rows(path, "SELECT id, owner FROM owners")}
    file_rows = [dict(r) | {"owner": owners.get(r["id"])}
                 for r in _rows(path, "SELECT * FROM files")]  # fmt: skip
    batch_rows = []
    for row in _rows(path, "SELECT id, body FROM batches"):
        body = json.loads(row["body"])
        batch_rows.append({"id": row["id"], "body": row["body"],
                           "status": body.get("status", ""),
                           "created_at": int(body.get("created_at") or 0),
                           "owner": owners.get(row["id"])})  # fmt: skip
    result_rows = [
        {"batch_id": r["batch_id"], "line": r["line"], "ok": bool(r["ok"]), "output": r["output"]}
        for r in _rows(path, "SELECT * FROM results")
    ]
    old_dir = path.parent / "files"
    tables = {files: file_rows, batches: batch_rows, batch_results: result_rows}
    if file_bytes.local and file_bytes.root.resolve() == old_dir.resolve():
        return tables
    for f in file_rows:  # the bytes go first: a row is visible only with its bytes in place
        source = old_dir / f["id"]
        if source.exists():
            file_bytes.put(f["id"], source.read_bytes())
    return tables


def _tables(file_bytes: FileBytes, path: Path) -> dict[Any, list[dict[str, Any]]]:
    name = path.name
    if name == "batches.sqlite":
        return _batches(file_bytes, path)
    if name == "audit.sqlite":
        return {audit: [dict(r) for r in _rows(path, "SELECT * FROM audit")]}
    if name == "usage.sqlite":
        return {usage: [dict(r) for r in _rows(path, "SELECT * FROM usage")]}
    rows = [dict(r) | {"identical": bool(r["identical"])}
            for r in _rows(path, "SELECT * FROM comparisons")]  # fmt: skip
    return {comparisons: rows}


def import_state_dir(db: Database, file_bytes: FileBytes, state_dir: Path) -> list[str]:
    """Import every old SQLite file in ``state_dir``; the names imported. Given a storage's
    parts rather than the :class:`~loraswap.storage.Storage`: that package imports this one."""
    done = []
    for name in OLD_FILES:
        path = state_dir / name
        if not path.exists():
            continue
        tables = _tables(file_bytes, path)
        with db.begin() as conn:
            for table, rows in tables.items():
                if rows:
                    conn.execute(db.insert(table).on_conflict_do_nothing(), rows)
            if not db.sqlite:
                for table in (audit, comparisons):  # ids were kept: move sequences
                    top = conn.execute(select(func.max(table.c.id))).scalar()
                    if top:
                        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', "
                                          f"'id'), {int(top)})"))  # fmt: skip
        for suffix in ("", "-wal", "-shm"):
            old = path.with_name(path.name + suffix)
            if old.exists():
                old.rename(old.with_name(old.name + ".imported"))
        counts = ", ".join(f"{len(rows)} {table.name}" for table, rows in tables.items())
        logger.info("imported %s from a state directory of loraswap 0.1.0 (%s)", name, counts)
        done.append(name)
    return done
