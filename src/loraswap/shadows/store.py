"""Stored shadow comparisons: both answers of a shadowed request, their tokens and timings.

SQLite in the state directory (``shadows.sqlite``), bounded by age and by count. Summaries are
per (adapter, primary version, shadow version) pair, scoped to what the caller may see.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from ..sqlite_file import SqliteFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL, tenant TEXT, adapter TEXT, primary_version TEXT, shadow_version TEXT,
    route TEXT, prompt TEXT,
    primary_text TEXT, shadow_text TEXT, primary_tokens INTEGER, shadow_tokens INTEGER,
    primary_latency_s REAL, shadow_latency_s REAL, primary_ttft_s REAL, shadow_ttft_s REAL,
    identical INTEGER, shadow_error TEXT
);
CREATE INDEX IF NOT EXISTS comparisons_pair
    ON comparisons (adapter, primary_version, shadow_version, id);
"""
SAMPLES = 5  # differing pairs shown per summary
SAMPLE_FIELDS = (
    "id", "created", "route", "prompt", "primary_text", "shadow_text", "primary_tokens",
    "shadow_tokens", "primary_latency_s", "shadow_latency_s", "shadow_error",
)  # fmt: skip


@dataclass
class Comparison:
    tenant: str
    adapter: str
    primary_version: str
    shadow_version: str
    route: str
    prompt: str
    primary_text: str
    shadow_text: str | None
    primary_tokens: int
    shadow_tokens: int | None
    primary_latency_s: float | None
    shadow_latency_s: float | None
    primary_ttft_s: float | None
    shadow_ttft_s: float | None
    shadow_error: str | None = None

    @property
    def identical(self) -> bool:
        return self.shadow_error is None and self.primary_text == self.shadow_text


class ComparisonStore(SqliteFile):
    def __init__(self, state_dir: Path, retention_days: float, max_records: int) -> None:
        super().__init__(Path(state_dir) / "shadows.sqlite", SCHEMA)
        self.retention_s = retention_days * 86400
        self.max_records = max_records

    def add(self, c: Comparison) -> int:
        row = asdict(c) | {"created": time.time(), "identical": int(c.identical)}
        columns = ", ".join(row)
        with self._lock:
            db = self._conn()
            cur = db.execute(
                f"INSERT INTO comparisons ({columns}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            rowid = cur.lastrowid or 0
            if rowid % 100 == 0:
                self._prune(db, rowid)
        return rowid

    def _prune(self, db: sqlite3.Connection, last_id: int) -> None:
        db.execute("DELETE FROM comparisons WHERE created < ?", (time.time() - self.retention_s,))
        db.execute("DELETE FROM comparisons WHERE id <= ?", (last_id - self.max_records,))

    def prune(self) -> None:
        with self._lock:
            db = self._conn()
            last = db.execute("SELECT COALESCE(MAX(id), 0) FROM comparisons").fetchone()[0]
            self._prune(db, last)

    def summaries(
        self, visible: Callable[[str], bool], adapter: str | None = None
    ) -> list[dict[str, Any]]:
        """One summary per (adapter, primary, shadow): agreement, lengths, latencies, and the
        latest differing pairs."""
        query = "SELECT * FROM comparisons"
        args: list[Any] = []
        if adapter is not None:
            query += " WHERE adapter = ?"
            args.append(adapter)
        pairs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        with self._lock:
            db = self._conn()
            db.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in db.execute(query + " ORDER BY id", args)]
            finally:
                db.row_factory = None
        for row in rows:
            if visible(row["adapter"]):
                key = (row["adapter"], row["primary_version"], row["shadow_version"])
                pairs.setdefault(key, []).append(row)
        return [summary(key, group) for key, group in sorted(pairs.items())]


def summary(key: tuple[str, str, str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    answered = [r for r in rows if r["shadow_error"] is None]

    def mid(field: str, among: list[dict[str, Any]]) -> float | None:
        values = [r[field] for r in among if r[field] is not None]
        return round(median(values), 4) if values else None

    def mean(field: str) -> float | None:
        values = [r[field] for r in answered if r[field] is not None]
        return round(sum(values) / len(values), 2) if values else None

    identical = sum(r["identical"] for r in rows)
    differing = [r for r in reversed(rows) if not r["identical"]][:SAMPLES]
    return {
        "adapter": key[0],
        "primary_version": key[1],
        "shadow_version": key[2],
        "count": len(rows),
        "shadow_errors": len(rows) - len(answered),
        "identical": identical,
        "identical_share": round(identical / len(rows), 4),
        "mean_primary_tokens": mean("primary_tokens"),
        "mean_shadow_tokens": mean("shadow_tokens"),
        "primary_latency_p50_s": mid("primary_latency_s", answered),
        "shadow_latency_p50_s": mid("shadow_latency_s", answered),
        "first": rows[0]["created"],
        "last": rows[-1]["created"],
        "samples": [{k: r[k] for k in SAMPLE_FIELDS} for r in differing],
    }
