"""The adapter catalog: records of adapters, versions, aliases and pins; their persistence; and
how an OpenAI ``model`` value resolves to one version.

Persisted as rows in the database by default (:mod:`.catalog_rows`). This module keeps the older
form, one JSON document at ``registry_uri`` (``registry_document``): there changes go through
:meth:`Catalog.commit`, a compare-and-swap on the document's ``revision``, retried on the newer
document, so a change made by another replica at the same moment is never overwritten.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pydantic import BaseModel, Field

from ..documents import DocumentStore
from ..errors import ApiError
from .keys import AdapterKey, split_model


class VersionRecord(BaseModel):
    version: str
    source: str
    lora_int_id: int
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    registered_at: float
    # Who registered it (the audit's actor: a tenant's name, `admin`, `anonymous`); a refetch is
    # held to that caller's source limits as they are then (adapters/owners.py). None: a
    # version stored before this field.
    registered_by: str | None = None


class AliasRecord(BaseModel):
    """Where an adapter's name routes: its version, a canary share of the traffic served by
    another version, and a shadow version that also answers a sample of the requests (its
    answers are stored for comparison, never returned)."""

    version: str
    canary_version: str | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)
    shadow_version: str | None = None
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0)

    def versions_used(self) -> set[str]:
        return {v for v in (self.version, self.canary_version, self.shadow_version) if v}

    def without(self, version: str) -> AliasRecord:
        """This alias with a deleted version dropped from its canary and shadow."""
        update: dict[str, Any] = {}
        if self.canary_version == version:
            update |= {"canary_version": None, "canary_weight": 0.0}
        if self.shadow_version == version:
            update |= {"shadow_version": None, "shadow_rate": 0.0}
        return self.model_copy(update=update)


class AdapterRecord(BaseModel):
    name: str
    versions: dict[str, VersionRecord] = Field(default_factory=dict)
    alias: AliasRecord
    previous_alias: AliasRecord | None = None  # what ``rollback`` restores
    pinned: bool = False

    def key(self, version: str) -> AdapterKey:
        return AdapterKey(self.name, version)

    @property
    def alias_key(self) -> AdapterKey:
        return AdapterKey(self.name, self.alias.version)

    def next_version(self) -> str:
        """``v<N+1>``, skipping names already taken."""
        count = len(self.versions)
        return next(f"v{i}" for i in range(count + 1, count + 1000) if f"v{i}" not in self.versions)


class CatalogState(BaseModel):
    revision: int = 0
    next_lora_id: int = 1
    adapters: dict[str, AdapterRecord] = Field(default_factory=dict)
    # Not stored: the names that differ from the state this one was derived from, so a replica
    # adopts only those; None when unknown (a whole document read): compare everything.
    changed: set[str] | None = Field(None, exclude=True)

    def versions(self) -> Iterator[tuple[AdapterRecord, VersionRecord]]:
        for record in self.adapters.values():
            for ver in record.versions.values():
                yield record, ver

    def pinned_keys(self) -> set[AdapterKey]:
        return {r.alias_key for r in self.adapters.values() if r.pinned}


def adoption(
    old: CatalogState, new: CatalogState
) -> tuple[list[AdapterRecord], dict[AdapterKey, VersionRecord], list[AdapterKey] | None]:
    """What serving ``new`` instead of ``old`` involves: the adapters to look at, the versions
    they have, and the versions ``old`` had of them (None when ``new`` does not say what
    changed: then everything is looked at, and anything served but not wanted goes)."""
    if new.changed is None:
        records = list(new.adapters.values())
        return records, {rec.key(v.version): v for rec, v in new.versions()}, None
    records = [new.adapters[n] for n in new.changed if n in new.adapters]
    wanted = {rec.key(v): ver for rec in records for v, ver in rec.versions.items()}
    before = [old.adapters[n] for n in new.changed if n in old.adapters]
    return records, wanted, [rec.key(v) for rec in before for v in rec.versions]


class CatalogStore(DocumentStore[CatalogState]):
    """The adapter registry's document (versions, aliases, pins, lora ids)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, CatalogState, storage_options)


class Catalog:
    """The current catalog state of this replica, its lookups and its persisted changes."""

    attempts = 8  # compare-and-swap tries per commit before giving up with 409

    def __init__(
        self, store: CatalogStore, base_name: str, draw: Callable[[], float] = random.random
    ) -> None:
        self.store = store
        self.base_name = base_name
        self.draw = draw  # the canary draw, replaceable in tests
        self.state = CatalogState()
        self._pins: tuple[CatalogState | None, set[AdapterKey]] = (None, set())

    # ----- lookups -------------------------------------------------------------------------
    def record(self, name: str) -> AdapterRecord:
        record = self.state.adapters.get(name)
        if record is None:
            raise ApiError(404, f"adapter {name!r} is not registered", param="model")
        return record

    def version(self, key: AdapterKey) -> VersionRecord:
        record = self.record(key.name)
        if key.version not in record.versions:
            raise ApiError(
                404, f"adapter {key.name!r} has no version {key.version!r}", param="model"
            )
        return record.versions[key.version]

    def resolve(self, model: str) -> AdapterKey | None:
        """``name@version`` or an alias (with its canary draw) → a registered version's key;
        None for the base model and for names that are not adapters."""
        if model == self.base_name:
            return None
        name, version = split_model(model)
        record = self.state.adapters.get(name)
        if record is None:
            return None
        if version is not None:
            return record.key(version) if version in record.versions else None
        alias = record.alias
        if alias.canary_version and self.draw() < alias.canary_weight:
            return record.key(alias.canary_version)
        return record.alias_key

    def shadow_of(self, model: str) -> AdapterKey | None:
        """The shadow version that should also answer this request (drawn at the alias's
        shadow rate); only requests naming the alias itself are shadowed."""
        name, version = split_model(model)
        record = self.state.adapters.get(name)
        if record is None or version is not None:
            return None
        alias = record.alias
        if alias.shadow_version and self.draw() < alias.shadow_rate:
            return record.key(alias.shadow_version)
        return None

    def pinned_keys(self) -> set[AdapterKey]:
        """Asked per request and per version described: computed once per state (a state is
        replaced by the next, never changed, once it is the current one). Do not modify."""
        if self._pins[0] is not self.state:
            self._pins = (self.state, self.state.pinned_keys())
        return self._pins[1]

    def carry_pins(self, old: CatalogState, new: CatalogState) -> None:
        """Derive ``new``'s pins from ``old``'s over the names that changed (not all again)."""
        if self._pins[0] is old and new.changed is not None:
            pins = {k for k in self._pins[1] if k.name not in new.changed}
            records = (new.adapters.get(name) for name in new.changed)
            self._pins = (new, pins | {r.alias_key for r in records if r and r.pinned})

    def model_ids(self) -> list[tuple[str, AdapterKey]]:
        """(OpenAI model id, version it serves) for every alias and every version."""
        ids = []
        for record in self.state.adapters.values():
            ids.append((record.name, record.alias_key))
            ids += [(str(record.key(v)), record.key(v)) for v in record.versions]
        return ids

    # ----- persistence ---------------------------------------------------------------------
    async def prepare(self) -> None:
        """Before the first fetch (the row catalogue imports an old document here)."""

    async def fetch(self) -> CatalogState:
        return await asyncio.to_thread(self.store.load)

    async def changes(self) -> CatalogState | None:
        """The newer state if another replica changed the catalog since ours; else None."""
        state = await self.fetch()
        return None if state.revision == self.state.revision else state

    async def commit(
        self,
        mutate: Callable[[CatalogState], Awaitable[Any]],
        on_newer: Callable[[CatalogState], Awaitable[None]],
    ) -> Any:
        """Re-read the shared document (``on_newer`` adopts a newer one), apply ``mutate`` to a
        copy and save it with the next revision only if no one wrote in between; otherwise
        start over on the newer document, so ``mutate`` must be safe to run again. After
        ``attempts`` conflicts in a row: ApiError 409. Callers hold their lock."""
        for attempt in range(self.attempts):
            latest = await self.fetch()
            expected = latest.revision
            state = latest  # a fresh parse: ours to change, unless adopted as the current state
            if latest.revision != self.state.revision:
                await on_newer(latest)
                state = latest.model_copy(deep=True)
            result = await mutate(state)
            state.revision = expected + 1
            if await asyncio.to_thread(self.store.save_if, state, expected):
                self.state = state
                return result
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # de-synchronise rivals
        raise ApiError(
            409,
            f"the adapter registry kept changing on other replicas ({self.attempts} attempts); "
            "retry the request",
        )
