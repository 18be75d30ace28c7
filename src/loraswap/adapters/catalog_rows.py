"""The adapter catalog as database rows: one per adapter, stamped with the catalog revision of
its last change, and one row holding that revision and the next LoRA id.

A change is one transaction under the lock of that row: rows another replica changed since this
replica's revision are read first, so ``mutate`` sees the current catalog, then only the
adapters it changed are written. Polling reads the revision, and the rows past ours when it
moved. So a change costs the same with ten adapters or ten thousand; the JSON document this
replaces was read and rewritten whole by every change.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, ItemsView, Iterable, ValuesView
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, select, update

from ..documents import retire
from ..storage import Database, Storage, schema
from .catalog import AdapterRecord, Catalog, CatalogState, CatalogStore

if TYPE_CHECKING:
    from ..config import Settings

META, ROWS = schema.catalog_meta, schema.adapters
MUTATE_TIMEOUT_S = 60.0  # a mutation runs on the event loop while the transaction waits for it
Changes = dict[str, AdapterRecord | None]  # name -> its record, None once deleted


class CopyOnWrite(dict[str, AdapterRecord]):
    """The adapters as a mutation sees them: a record is copied when first read, so the state
    being served stays untouched until the change commits, and only the names read or written
    need comparing afterwards."""

    def __init__(self, records: dict[str, AdapterRecord]) -> None:
        super().__init__(records)
        self.touched: set[str] = set()

    def __getitem__(self, name: str) -> AdapterRecord:
        if name not in self.touched:
            self.touched.add(name)
            if dict.__contains__(self, name):
                dict.__setitem__(self, name, dict.__getitem__(self, name).model_copy(deep=True))
        return dict.__getitem__(self, name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if not dict.__contains__(self, name):
            return default
        return self[name]  # copied, as a read by key is

    def __setitem__(self, name: str, record: AdapterRecord) -> None:
        self.touched.add(name)
        dict.__setitem__(self, name, record)

    def __delitem__(self, name: str) -> None:
        self.touched.add(name)
        dict.__delitem__(self, name)

    def pop(self, name: str, *default: Any) -> Any:  # type: ignore[override]
        self.touched.add(name)
        return dict.pop(self, name, *default)

    def values(self) -> ValuesView[AdapterRecord]:  # type: ignore[override]
        for name in list(self):  # records handed out in bulk may be changed: copy them all
            self[name]
        return dict.values(self)

    def items(self) -> ItemsView[str, AdapterRecord]:  # type: ignore[override]
        self.values()
        return dict.items(self)


def diff(before: dict[str, AdapterRecord], after: dict[str, Any], names: Iterable[str]) -> Changes:
    """What changed among ``names``: their new record, or None where deleted."""
    changes: Changes = {}
    for name in names:
        old, new = dict.get(before, name), dict.get(after, name)
        if new != old:
            changes[name] = new
    return changes


def merged(base: dict[str, AdapterRecord], changes: Changes) -> dict[str, AdapterRecord]:
    adapters = dict(base)
    for name, record in changes.items():
        if record is None:
            adapters.pop(name, None)
        else:
            adapters[name] = record
    return adapters


class CatalogRows:
    """Blocking reads and writes of the catalog rows (callers run them in a thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # Statements built once: building them costs more than running them on SQLite.
        self._create = db.insert(META).values(id=1, revision=0, next_lora_id=1)
        self._create = self._create.on_conflict_do_nothing()
        self._read = select(META.c.revision, META.c.next_lora_id).where(META.c.id == 1)
        self._read_locked = self._read.with_for_update()
        self._bump = (
            update(META)
            .where(META.c.id == 1)
            .values(revision=bindparam("new_revision"), next_lora_id=bindparam("new_next_id"))
        )
        columns = (ROWS.c.name, ROWS.c.record, ROWS.c.deleted, ROWS.c.revision)
        self._rows_since = select(*columns).where(ROWS.c.revision > bindparam("since"))
        upsert = db.insert(ROWS)
        self._upsert = upsert.on_conflict_do_update(
            index_elements=[ROWS.c.name],
            set_={c: upsert.excluded[c] for c in ("record", "revision", "deleted")},
        )

    def _stored(self, conn: Connection, lock: bool = False) -> tuple[int, int]:
        """The catalog's (revision, next_lora_id), with the row locked until the transaction
        ends when ``lock``. On SQLite its INSERT (a no-op once the row exists) comes first: it
        takes the write lock up front, so a writer in another process waits instead of failing
        with "database is locked" when it writes after reading."""
        if lock and self.db.sqlite:
            conn.execute(self._create)
        row = conn.execute(self._read_locked if lock else self._read).first()
        if row is None and lock:  # a new database
            conn.execute(self._create)
            row = conn.execute(self._read_locked).first()
        return (row.revision, row.next_lora_id) if row else (0, 1)

    def _since(self, conn: Connection, revision: int) -> tuple[Changes, int]:
        """Rows changed after ``revision`` (tombstones as None), and the newest revision seen."""
        rows = conn.execute(self._rows_since, {"since": revision}).all()
        changes: Changes = {
            r.name: None if r.deleted else AdapterRecord.model_validate_json(r.record) for r in rows
        }
        return changes, max((r.revision for r in rows), default=revision)

    def load(self) -> CatalogState:
        return self.changes(CatalogState()) or CatalogState()

    def changes(self, current: CatalogState) -> CatalogState | None:
        """The catalog as stored, derived from ``current`` by the rows changed since; None when
        nothing changed. Every revision writes rows, all in one transaction, and revisions
        commit in order (under the lock): the rows past ours are exactly what we miss."""
        with self.db.engine.connect() as conn:
            revision, next_id = self._stored(conn)
            if revision == current.revision:
                return None
            base = current if revision > current.revision else CatalogState()  # reset: reread
            found, newest = self._since(conn, base.revision)
        return CatalogState.model_construct(
            revision=max(revision, newest), next_lora_id=next_id,
            adapters=merged(base.adapters, found),
            changed=set(found) if base is current else None,
        )  # fmt: skip

    def commit(
        self, current: CatalogState, apply: Callable[[CatalogState], Any]
    ) -> tuple[CatalogState, Any, bool]:
        """Apply a mutation to the current catalog and store what it changed, in one
        transaction. Returns the new state, what ``apply`` returned, and whether rows another
        replica wrote were read first (the caller adopts them)."""
        with self.db.begin() as conn:
            revision, next_id = self._stored(conn, lock=True)
            base, found = current, {}
            if revision != current.revision:
                base = current if revision > current.revision else CatalogState()
                found, _ = self._since(conn, base.revision)
            view = merged(base.adapters, found) if found else base.adapters
            tracked = CopyOnWrite(view)
            work = CatalogState.model_construct(
                revision=revision, next_lora_id=next_id, adapters=tracked, changed=None
            )
            result = apply(work)
            after: dict[str, AdapterRecord] = work.adapters
            if after is tracked:  # the names used, and any added or removed behind its back
                names = tracked.touched | (view.keys() ^ dict.keys(after))
            else:  # replaced whole
                names = view.keys() | after.keys()
            changes = diff(view, after, names)
            pulled = set(found) if base is current else None
            if not changes and work.next_lora_id == next_id:
                if revision == current.revision:
                    return current, result, False
                state = CatalogState.model_construct(
                    revision=revision, next_lora_id=next_id, adapters=view, changed=pulled
                )
                return state, result, True
            revision += 1
            self._write(conn, revision, work.next_lora_id, changes, view)
        changed = None if pulled is None else pulled | changes.keys()
        state = CatalogState.model_construct(
            revision=revision, next_lora_id=work.next_lora_id, adapters=dict(after),
            changed=changed,
        )  # fmt: skip
        return state, result, bool(found) or pulled is None

    def _write(
        self, conn: Connection, revision: int, next_id: int, changes: Changes,
        before: dict[str, AdapterRecord],
    ) -> None:  # fmt: skip
        rows = [
            {"name": name, "revision": revision, "deleted": record is None,
             "record": (record or before[name]).model_dump_json()}  # a tombstone keeps the last
            for name, record in changes.items()
        ]  # fmt: skip
        if rows:
            conn.execute(self._upsert, rows)
        conn.execute(self._bump, {"new_revision": revision, "new_next_id": next_id})

    def import_document(self, document: CatalogStore) -> int:
        """Bring the registry document of an older release into an empty catalog, once; a
        local file is then renamed ``*.imported``. A remote one is left in place for replicas
        of the older release still reading it during a rollout. Returns the adapters imported."""
        with self.db.engine.connect() as conn:
            if self._stored(conn)[0]:
                return 0
        if not document.exists():
            return 0
        state = document.load()
        with self.db.begin() as conn:
            if self._stored(conn, lock=True)[0]:
                return 0  # another replica imported it meanwhile
            if state.adapters:
                revision = max(state.revision, 1)
                conn.execute(ROWS.insert(), [
                    {"name": name, "record": record.model_dump_json(), "revision": revision,
                     "deleted": False}
                    for name, record in state.adapters.items()
                ])  # fmt: skip
                conn.execute(self._bump, {"new_revision": revision,
                                          "new_next_id": state.next_lora_id})  # fmt: skip
        retire(document, f"{len(state.adapters)} adapters")
        return len(state.adapters)


class RowCatalog(Catalog):
    """The catalog kept in :class:`CatalogRows`; ``document``, if given, is imported at start."""

    def __init__(
        self,
        rows: CatalogRows,
        base_name: str,
        document: CatalogStore | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(rows, base_name, draw)  # type: ignore[arg-type]
        self.rows = rows
        self.document = document

    async def prepare(self) -> None:
        if self.document is not None:
            await asyncio.to_thread(self.rows.import_document, self.document)

    async def fetch(self) -> CatalogState:
        return await asyncio.to_thread(self.rows.load)

    async def changes(self) -> CatalogState | None:
        return await asyncio.to_thread(self.rows.changes, self.state)

    async def commit(
        self,
        mutate: Callable[[CatalogState], Awaitable[Any]],
        on_newer: Callable[[CatalogState], Awaitable[None]],
    ) -> Any:
        """Apply ``mutate`` to the current catalog and store its changes, in one transaction
        under the catalog's lock: no retries, no lost updates. ``mutate`` runs on this event
        loop while the transaction waits, so it must neither wait nor use the database.
        ``on_newer`` adopts, afterwards, what other replicas had changed. Callers hold their
        lock."""
        loop = asyncio.get_running_loop()

        def apply(state: CatalogState) -> Any:
            return asyncio.run_coroutine_threadsafe(mutate(state), loop).result(MUTATE_TIMEOUT_S)

        state, result, pulled = await asyncio.to_thread(self.rows.commit, self.state, apply)
        self.carry_pins(self.state, state)
        if pulled:
            await on_newer(state)
        self.state = state
        return result


def open_catalog(settings: Settings, base_name: str, db: Database | None = None) -> Catalog:
    """Rows in ``db`` (the configured database when None), importing a document found at
    ``registry_uri``; or that document itself with ``registry_document``."""
    document = CatalogStore(settings.registry_uri, settings.fsspec_storage_options)
    if settings.registry_document:
        return Catalog(document, base_name)
    return RowCatalog(CatalogRows(db or Storage.from_settings(settings).db), base_name, document)
