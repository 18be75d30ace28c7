"""The audit log of adapter registry changes: who changed what and when.

Rows in the shared database, appended after each change commits, written in a thread so the
registry's event loop never waits on the database. The oldest entries beyond ``keep`` are
dropped, so the table stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select

from .storage import Database, schema
from .tenants import current

AUDIT = schema.audit
logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, db: Database, keep: int = 100_000) -> None:
        self.db = db
        self.keep = keep
        self._writes: set[asyncio.Future[None]] = set()

    def record(self, action: str, adapter: str, detail: dict[str, Any]) -> None:
        """One change, by the caller of the current request (read now, written in a thread)."""
        principal = current()
        row = {"at": time.time(), "actor": principal.name, "key_id": principal.key_id,
               "action": action, "adapter": adapter,
               "detail": json.dumps(detail, default=str)}  # fmt: skip
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(row)
            return
        write = loop.run_in_executor(None, self._write, row)
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _written(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            logger.error("audit entry not written", exc_info=write.exception())

    def _write(self, row: dict[str, Any]) -> None:
        with self.db.begin() as conn:
            new_id = conn.execute(AUDIT.insert().values(**row)).inserted_primary_key[0]
            if new_id and new_id % 1000 == 0:
                conn.execute(delete(AUDIT).where(AUDIT.c.id <= new_id - self.keep))

    async def flush(self) -> None:
        """Wait for the entries being written (before reading them, and at shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def entries(
        self,
        visible: Callable[[str], bool],
        adapter: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, only entries about adapters ``visible`` to the caller."""
        query = select(AUDIT)
        if before is not None:
            query = query.where(AUDIT.c.id < before)
        if adapter is not None:
            query = query.where(AUDIT.c.adapter == adapter)
        query = query.order_by(AUDIT.c.id.desc())
        out: list[dict[str, Any]] = []
        with self.db.begin() as conn:
            for row in conn.execute(query.execution_options(yield_per=200)):
                if not visible(row.adapter):
                    continue
                out.append({
                    "id": row.id, "at": row.at, "actor": row.actor, "key_id": row.key_id,
                    "action": row.action, "adapter": row.adapter, "detail": json.loads(row.detail),
                })  # fmt: skip
                if len(out) >= limit:
                    break
        return out
