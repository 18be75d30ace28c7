"""The audit log of adapter registry changes: who changed what and when.

One SQLite file in the state directory (``audit.sqlite``), appended after each change commits;
each replica records the changes made through it. The oldest entries beyond ``keep`` are
dropped, so the file stays bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .sqlite_file import SqliteFile
from .tenants import current

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL, actor TEXT, key_id TEXT, action TEXT, adapter TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_adapter ON audit (adapter, id);
"""


class AuditLog(SqliteFile):
    def __init__(self, state_dir: Path, keep: int = 100_000) -> None:
        super().__init__(Path(state_dir) / "audit.sqlite", SCHEMA)
        self.keep = keep

    def record(self, action: str, adapter: str, detail: dict[str, Any]) -> None:
        """One change, by the caller of the current request."""
        principal = current()
        row = (time.time(), principal.name, principal.key_id, action, adapter,
               json.dumps(detail, default=str))  # fmt: skip
        with self._lock:
            db = self._conn()
            cur = db.execute(
                "INSERT INTO audit (at, actor, key_id, action, adapter, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            if cur.lastrowid and cur.lastrowid % 1000 == 0:
                db.execute("DELETE FROM audit WHERE id <= ?", (cur.lastrowid - self.keep,))

    def entries(
        self,
        visible: Callable[[str], bool],
        adapter: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, only entries about adapters ``visible`` to the caller."""
        query = "SELECT id, at, actor, key_id, action, adapter, detail FROM audit WHERE id < ?"
        args: list[Any] = [before if before is not None else 2**62]
        if adapter is not None:
            query += " AND adapter = ?"
            args.append(adapter)
        query += " ORDER BY id DESC"
        out: list[dict[str, Any]] = []
        with self._lock:
            for row in self._conn().execute(query, args):
                if not visible(row[5]):
                    continue
                out.append({
                    "id": row[0], "at": row[1], "actor": row[2], "key_id": row[3],
                    "action": row[4], "adapter": row[5], "detail": json.loads(row[6]),
                })  # fmt: skip
                if len(out) >= limit:
                    break
        return out
