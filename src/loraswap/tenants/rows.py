"""The tenants directory as database rows: one per tenant (its key hashes inside) and one
holding the directory's revision.

A change is one transaction under the lock of the revision row: the tenants are read, the
change applied, and only the tenants it changed are written or deleted. Replicas poll the
revision and re-read the rows when it moved. The document this replaces (``tenants_uri``) was
rewritten whole by every change and retried on conflicts; it is imported once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, delete, select, update

from ..documents import retire
from ..storage import Database, schema
from .model import Tenant, TenantsState

META, ROWS = schema.tenant_meta, schema.tenants


class TenantRows:
    """Blocking reads and writes of the tenant rows (callers run them in a thread)."""

    uri = "the database's tenant rows"

    def __init__(self, db: Database) -> None:
        self.db = db
        self._create = db.insert(META).values(id=1, revision=0).on_conflict_do_nothing()

    def _revision(self, conn: Connection, lock: bool = False) -> int:
        """The stored revision; with ``lock``, the row is locked until the transaction ends
        (on SQLite the INSERT, a no-op once the row exists, takes the write lock first)."""
        if lock:
            conn.execute(self._create)
        query = select(META.c.revision).where(META.c.id == 1)
        row = conn.execute(query.with_for_update() if lock else query).first()
        return row.revision if row else 0

    def _read(self, conn: Connection, revision: int) -> TenantsState:
        rows = conn.execute(select(ROWS.c.name, ROWS.c.record)).all()
        tenants = {r.name: Tenant.model_validate_json(r.record) for r in rows}
        return TenantsState(revision=revision, tenants=tenants)

    def load(self) -> TenantsState:
        with self.db.begin() as conn:
            return self._read(conn, self._revision(conn))

    def newer(self, revision: int) -> TenantsState | None:
        """The directory when its revision is not ``revision`` (a poll's one cheap read)."""
        with self.db.begin() as conn:
            stored = self._revision(conn)
            return None if stored == revision else self._read(conn, stored)

    def commit(self, mutate: Callable[[TenantsState], Any]) -> tuple[TenantsState, Any]:
        """Apply ``mutate`` to the stored directory and write the tenants it changed, in one
        transaction (an exception from ``mutate`` rolls it back)."""
        with self.db.begin() as conn:
            revision = self._revision(conn, lock=True)
            state = self._read(conn, revision)
            before = {name: t.model_dump_json() for name, t in state.tenants.items()}
            result = mutate(state)
            after = {name: t.model_dump_json() for name, t in state.tenants.items()}
            changed = [{"name": n, "record": r} for n, r in after.items() if before.get(n) != r]
            gone = [name for name in before if name not in after]
            if changed or gone:
                self._write(conn, changed, gone)
                revision += 1
                conn.execute(update(META).where(META.c.id == 1).values(revision=revision))
        state.revision = revision
        return state, result

    def _write(self, conn: Connection, changed: list[dict], gone: list[str]) -> None:
        if gone:
            conn.execute(delete(ROWS).where(ROWS.c.name.in_(gone)))
        if changed:
            upsert = self.db.insert(ROWS)
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=[ROWS.c.name], set_={"record": upsert.excluded.record}
                ),
                changed,
            )

    def import_document(self, document: Any) -> int:
        """Bring a tenants document (an older release's, or one kept before the database) into
        empty rows, once; a local file is then renamed ``*.imported``. Returns the tenants
        imported."""
        with self.db.begin() as conn:
            if self._revision(conn):
                return 0
        if not document.exists():
            return 0
        state: TenantsState = document.load()

        def adopt(stored: TenantsState) -> None:
            if stored.revision == 0:
                stored.tenants = state.tenants

        self.commit(adopt)
        retire(document, f"{len(state.tenants)} tenants")
        return len(state.tenants)
