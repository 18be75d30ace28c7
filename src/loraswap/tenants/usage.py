"""Usage per tenant and served model (``adapter@version`` or the base model), for billing.

Counted where the engine finishes a request (exact token counts), kept in memory and added to
the shared database every few seconds and at shutdown (an upsert that adds, so replicas sum),
so totals survive restarts and read the same from every replica. The batch budget check reads
a total refreshed at each flush, never the database on the event loop.
Prometheus gets the same counts with bounded labels: at most ``MAX_MODELS_PER_TENANT`` model
values per tenant, the rest as ``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter
from sqlalchemy import func, select

from ..storage import Database, schema

MAX_MODELS_PER_TENANT = 50
REQUESTS = Counter(
    "loraswap_tenant_requests", "Engine requests per tenant and model", ["tenant", "model"]
)
TOKENS = Counter(
    "loraswap_tenant_tokens", "Tokens per tenant, model and kind", ["tenant", "model", "kind"]
)
USAGE = schema.usage
logger = logging.getLogger(__name__)
Key = tuple[str, str, str, str]  # tenant, model, UTC day, source (api | batch)


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


class UsageLedger:
    def __init__(self, db: Database, flush_s: float = 5.0) -> None:
        self.db = db
        self.flush_s = flush_s
        self.batch_stored: dict[str, int] | None = None  # today's stored batch tokens per tenant
        self.batch_day = ""
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
            try:
                await asyncio.to_thread(self.flush)
            except Exception as exc:  # kept in memory, written at the next flush
                logger.warning("usage not written yet (%s); retrying in %s s", exc, self.flush_s)

    def flush(self) -> None:
        """Add what was counted since the last flush to the database; refresh the batch
        totals of today (other replicas' flushes included)."""
        with self._lock:
            pending, self.pending = self.pending, defaultdict(lambda: [0, 0, 0])
        if pending:
            rows = [dict(zip(("tenant", "model", "day", "source", "requests", "prompt_tokens",
                              "completion_tokens"), (*key, *counts), strict=True))
                    for key, counts in pending.items()]  # fmt: skip
            insert = self.db.insert(USAGE)
            added = insert.on_conflict_do_update(
                index_elements=["tenant", "model", "day", "source"],
                set_={c: USAGE.c[c] + insert.excluded[c]
                      for c in ("requests", "prompt_tokens", "completion_tokens")},
            )  # fmt: skip
            try:
                with self.db.begin() as conn:
                    conn.execute(added, rows)
            except Exception:
                with self._lock:  # kept for the next flush: usage is never dropped
                    for key, counts in pending.items():
                        row = self.pending[key]
                        for i in range(3):
                            row[i] += counts[i]
                raise
        self._refresh_batch_totals()

    def _refresh_batch_totals(self) -> None:
        today = utc_day()
        query = (
            select(USAGE.c.tenant, func.sum(USAGE.c.prompt_tokens + USAGE.c.completion_tokens))
            .where(USAGE.c.day == today, USAGE.c.source == "batch")
            .group_by(USAGE.c.tenant)
        )
        with self.db.begin() as conn:
            totals = {tenant: int(total or 0) for tenant, total in conn.execute(query)}
        with self._lock:
            self.batch_stored, self.batch_day = totals, today

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
        query = select(USAGE).order_by(
            USAGE.c.day.desc(), USAGE.c.tenant, USAGE.c.model, USAGE.c.source
        )
        if tenant is not None:
            query = query.where(USAGE.c.tenant == tenant)
        if since is not None:
            query = query.where(USAGE.c.day >= since)
        with self.db.begin() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def batch_tokens_today(self, tenant: str) -> int:
        """Stored (as of the last flush) plus pending batch tokens of ``tenant`` today; reads the
        database only the first time in a day when no flush has run yet."""
        today = utc_day()
        with self._lock:
            pending = sum(
                c[1] + c[2] for k, c in self.pending.items()
                if k[0] == tenant and k[2] == today and k[3] == "batch"
            )  # fmt: skip
            stored = self.batch_stored if self.batch_day == today else None
        if stored is None:
            self._refresh_batch_totals()
            stored = self.batch_stored or {}
        return pending + stored.get(tenant, 0)
