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

from . import schema

if TYPE_CHECKING:
    from . import Storage

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


def _batches(storage: Storage, path: Path) -> dict[Any, list[dict[str, Any]]]:
    owners = {r["id"]: r["owner"] for r in _rows(path, "SELECT id, owner FROM owners")}
    files = [dict(r) | {"owner": owners.get(r["id"])} for r in _rows(path, "SELECT * FROM files")]
    batches = []
    for row in _rows(path, "SELECT id, body FROM batches"):
        body = json.loads(row["body"])
        batches.append({"id": row["id"], "body": row["body"], "status": body.get("status", ""),
                        "created_at": int(body.get("created_at") or 0),
                        "owner": owners.get(row["id"])})  # fmt: skip
    results = [
        {"batch_id": r["batch_id"], "line": r["line"], "ok": bool(r["ok"]), "output": r["output"]}
        for r in _rows(path, "SELECT * FROM results")
    ]
    old_dir = path.parent / "files"
    if storage.files.local and storage.files.root.resolve() == old_dir.resolve():
        return {schema.files: files, schema.batches: batches, schema.batch_results: results}
    for f in files:  # the bytes go first: a row is visible only with its bytes in place
        source = old_dir / f["id"]
        if source.exists():
            storage.files.put(f["id"], source.read_bytes())
    return {schema.files: files, schema.batches: batches, schema.batch_results: results}


def _tables(storage: Storage, path: Path) -> dict[Any, list[dict[str, Any]]]:
    name = path.name
    if name == "batches.sqlite":
        return _batches(storage, path)
    if name == "audit.sqlite":
        return {schema.audit: [dict(r) for r in _rows(path, "SELECT * FROM audit")]}
    if name == "usage.sqlite":
        return {schema.usage: [dict(r) for r in _rows(path, "SELECT * FROM usage")]}
    rows = [dict(r) | {"identical": bool(r["identical"])}
            for r in _rows(path, "SELECT * FROM comparisons")]  # fmt: skip
    return {schema.comparisons: rows}


def import_state_dir(storage: Storage) -> list[str]:
    """Import every old SQLite file in the state directory; the names imported."""
    done = []
    for name in OLD_FILES:
        path = storage.state_dir / name
        if not path.exists():
            continue
        tables = _tables(storage, path)
        db = storage.db
        with db.begin() as conn:
            for table, rows in tables.items():
                if rows:
                    conn.execute(db.insert(table).on_conflict_do_nothing(), rows)
            if not db.sqlite:
                for table in (schema.audit, schema.comparisons):  # ids were kept: move sequences
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
