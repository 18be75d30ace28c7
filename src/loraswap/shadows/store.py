"""Stored shadow comparisons: both answers of a shadowed request, their tokens and timings.

Rows in the shared database, bounded by age and by count. Summaries are per (adapter, primary
version, shadow version) pair, scoped to what the caller may see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any

from sqlalchemy import Connection, delete, func, select

from ..storage import Database, schema

COMPARISONS = schema.comparisons
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


class ComparisonStore:
    def __init__(self, db: Database, retention_days: float, max_records: int) -> None:
        self.db = db
        self.retention_s = retention_days * 86400
        self.max_records = max_records

    def add(self, c: Comparison) -> int:
        row = asdict(c) | {"created": time.time(), "identical": c.identical}
        with self.db.begin() as conn:
            rowid = conn.execute(COMPARISONS.insert().values(**row)).inserted_primary_key[0] or 0
            if rowid % 100 == 0:
                self._prune(conn, rowid)
        return rowid

    def _prune(self, conn: Connection, last_id: int) -> None:
        conn.execute(delete(COMPARISONS).where(
            COMPARISONS.c.created < time.time() - self.retention_s))  # fmt: skip
        conn.execute(delete(COMPARISONS).where(COMPARISONS.c.id <= last_id - self.max_records))

    def prune(self) -> None:
        with self.db.begin() as conn:
            last = conn.execute(select(func.coalesce(func.max(COMPARISONS.c.id), 0))).scalar()
            self._prune(conn, last)

    def summaries(
        self, visible: Callable[[str], bool], adapter: str | None = None
    ) -> list[dict[str, Any]]:
        """One summary per (adapter, primary, shadow): agreement, lengths, latencies, and the
        latest differing pairs."""
        query = select(COMPARISONS).order_by(COMPARISONS.c.id)
        if adapter is not None:
            query = query.where(COMPARISONS.c.adapter == adapter)
        with self.db.begin() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        pairs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
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
