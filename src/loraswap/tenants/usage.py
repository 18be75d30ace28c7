"""Usage per tenant and served model (``adapter@version`` or the base model), for billing.

Counted where the engine finishes a request (exact token counts), kept in memory and written
to SQLite in the state directory every few seconds and at shutdown, so totals survive restarts.
Prometheus gets the same counts with bounded labels: at most ``MAX_MODELS_PER_TENANT`` model
values per tenant, the rest as ``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client import Counter

MAX_MODELS_PER_TENANT = 50
REQUESTS = Counter(
    "loraswap_tenant_requests", "Engine requests per tenant and model", ["tenant", "model"]
)
TOKENS = Counter(
    "loraswap_tenant_tokens", "Tokens per tenant, model and kind", ["tenant", "model", "kind"]
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT, model TEXT, day TEXT, source TEXT,
    requests INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,
    PRIMARY KEY (tenant, model, day, source)
);
"""
Key = tuple[str, str, str, str]  # tenant, model, UTC day, source (api | batch)


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


class UsageLedger:
    def __init__(self, state_dir: Path, flush_s: float = 5.0) -> None:
        self.path = Path(state_dir) / "usage.sqlite"
        self.flush_s = flush_s
        self.pending: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.labels: dict[str, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._flusher: asyncio.Task[None] | None = None

    def record(
        self, tenant: str, model: str, prompt: int, completion: int, source: str = "api"
    ) -> None:
        with self._lock:
            row = self.pending[(tenant, model, utc_day(), source)]
            row[0] += 1
            row[1] += prompt
            row[2] += completion
        seen = self.labels[tenant]
        if model not in seen and len(seen) >= MAX_MODELS_PER_TENANT:
            model = "other"
        seen.add(model)
        REQUESTS.labels(tenant, model).inc()
        TOKENS.labels(tenant, model, "prompt").inc(prompt)
        TOKENS.labels(tenant, model, "completion").inc(completion)
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is not None or self.flush_s <= 0:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: flushed by close()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await asyncio.to_thread(self.flush)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA)
        return db

    def flush(self) -> None:
        with self._lock:
            pending, self.pending = self.pending, defaultdict(lambda: [0, 0, 0])
        if not pending:
            return
        db = self._connect()
        try:
            with db:
                db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "requests = requests + excluded.requests, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens",
                    [(*key, *counts) for key, counts in pending.items()],
                )
        finally:
            db.close()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await asyncio.to_thread(self.flush)

    def report(self, tenant: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        """Totals per (tenant, model, day, source), stored and pending, newest day first."""
        self.flush()
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT tenant, model, day, source, requests, prompt_tokens, completion_tokens "
                "FROM usage WHERE (? IS NULL OR tenant = ?) AND (? IS NULL OR day >= ?) "
                "ORDER BY day DESC, tenant, model, source",
                (tenant, tenant, since, since),
            ).fetchall()
        finally:
            db.close()
        names = ("tenant", "model", "day", "source", "requests", "prompt_tokens",
                 "completion_tokens")  # fmt: skip
        return [dict(zip(names, row, strict=True)) for row in rows]

    def batch_tokens_today(self, tenant: str) -> int:
        today = utc_day()
        with self._lock:
            pending = sum(
                c[1] + c[2] for k, c in self.pending.items()
                if k[0] == tenant and k[2] == today and k[3] == "batch"
            )  # fmt: skip
        if not self.path.exists():
            return pending
        db = self._connect()
        try:
            (stored,) = db.execute(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage "
                "WHERE tenant = ? AND day = ? AND source = 'batch'",
                (tenant, today),
            ).fetchone()
        finally:
            db.close()
        return pending + stored
