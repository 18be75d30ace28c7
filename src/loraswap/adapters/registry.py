"""The adapter registry: the catalog (what is registered, persisted, shared by replicas) and
this replica's residency (what the engine serves), kept in step.

It is what the request pipeline resolves ``model`` with and what the adapter admin API changes.
Alias changes (set, promote, roll back) are in :mod:`.aliases`, a base class of the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..config import Settings
from ..errors import ApiError
from ..source_policy import Caller
from ..storage import Database
from ..tenants.model import Tenant
from ..tenants.principal import current
from . import sizing
from .aliases import AliasChanges
from .catalog import AdapterRecord, AliasRecord, CatalogState, VersionRecord, adoption
from .catalog_rows import open_catalog
from .keys import AdapterKey
from .owners import registrant
from .residency import AdapterEngine, Residency
from .slots import SlotGate
from .sources import materialize
from .validation import AdapterInfo, AdapterInvalid, BaseModelShapes, check_name, validate_adapter

logger = logging.getLogger(__name__)


class AdapterRegistry(AliasChanges):
    """Registers, validates, loads and evicts adapters; resolves the OpenAI ``model`` field."""

    def __init__(
        self,
        settings: Settings,
        shapes: BaseModelShapes,
        engine: AdapterEngine,
        audit: AuditLog | None = None,
        host_bytes: int | None = None,
        db: Database | None = None,
        tenants: Callable[[], Mapping[str, Tenant]] | None = None,
    ) -> None:
        """``tenants`` reads the tenants as stored now (blocking), whose ``sources`` a refetch of
        a tenant's adapter is held to; None: no tenants."""
        self.settings = settings
        self.tenants = tenants or dict
        self.audit = audit
        self.base_name = settings.served_model_name
        self.shapes = shapes
        self.catalog = open_catalog(settings, self.base_name, db)
        self.residency = Residency(
            engine,
            settings.max_cpu_loras or sizing.HOST_COUNT_CAP,
            self.catalog.pinned_keys,
            host_bytes=host_bytes,
            size_of=lambda path: sizing.adapter_bytes(path, str(settings.dtype)),
            busy=lambda: self.slots.in_flight,
        )
        self.slots = SlotGate(
            lambda: max(
                1, (settings.max_loras or sizing.UNSIZED_SLOTS) - len(self.pinned_loaded())
            ),
            settings.adapter_slot_wait_s,
            self.catalog.pinned_keys,
            settings.retry_after_s,
            on_wait=self.residency.prefetch,
        )
        self._lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None

    # ----- the pipeline's interface ----------------------------------------------------------
    def resolve(self, model: str) -> AdapterKey | None:
        """The servable version ``model`` names on this replica; None if not an adapter."""
        key = self.catalog.resolve(model)
        return key if key is not None and self.residency.is_servable(key) else None

    async def ensure_loaded(self, key: AdapterKey) -> None:
        await self.residency.ensure_loaded(key)

    def pinned_loaded(self) -> set[AdapterKey]:
        """Pinned versions in the engine: each holds a slot for good."""
        return {k for k in self.catalog.pinned_keys() if self.residency.is_loaded(k)}

    def record_request(self, key: AdapterKey, ok: bool) -> None:
        self.residency.record(key, ok)

    def shadow_of(self, model: str) -> AdapterKey | None:
        key = self.catalog.shadow_of(model)
        return key if key is not None and self.residency.is_servable(key) else None

    def _audit(self, action: str, name: str, **detail: Any) -> None:
        if self.audit is not None:
            try:
                self.audit.record(action, name, detail)
            except Exception as exc:  # the change itself is committed: log, do not fail it
                logger.error("audit log write failed: %s", exc)

    # ----- persistence and replicas --------------------------------------------------------
    async def restore(self) -> None:
        """Load the persisted catalog and expose every valid version (pinned ones loaded)."""
        await self.catalog.prepare()
        state = await self.catalog.fetch()
        async with self._lock:
            await self._adopt(state)
        if self.settings.registry_poll_s > 0:
            self._sync_task = asyncio.create_task(self._poll())

    async def preload(self, root: Path) -> None:
        """Register the adapters shipped in ``root`` (by directory name) that are not yet known."""
        if not root.is_dir():
            return
        for directory in sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()):
            if directory.name in self.catalog.state.adapters:
                continue
            try:
                await self.register(directory.name, str(directory.resolve()))
                logger.info("registered shipped adapter %s", directory.name)
            except ApiError as exc:
                logger.error("shipped adapter %s not registered: %s", directory.name, exc.message)

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        if self.audit is not None:
            await self.audit.flush()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                async with self._lock:  # a commit in between would make this state stale
                    state = await self.catalog.changes()
                    if state is not None:
                        await self._adopt(state)
                        logger.info("registry changed elsewhere: at revision %d", state.revision)
            except Exception as exc:
                logger.error("registry sync failed: %s", exc)

    async def _adopt(self, state: CatalogState) -> None:
        """Make this replica serve ``state``: expose new versions, drop removed ones (of the
        adapters it says changed, when it says: walking all of them each change is O(n))."""
        records, wanted, before = adoption(self.catalog.state, state)
        served = self.residency.servable
        for key in [k for k in (served if before is None else before) if k not in wanted]:
            await self.residency.forget(key)
        self.catalog.state = state
        tenants: Mapping[str, Tenant] | None = None  # read once, if anything is fetched
        for key, ver in wanted.items():
            if self.residency.is_servable(key):
                continue
            tenants = tenants if tenants is not None else await asyncio.to_thread(self.tenants)
            by = registrant(key.name, ver.registered_by, tenants, self.settings.adapter_sources)
            try:
                path, _ = await self._prepare(key, ver.source, by)
            except AdapterInvalid as exc:
                self.residency.mark_broken(key, str(exc))
                logger.error("adapter %s cannot be served: %s", key, exc)
                continue
            self.residency.expose(key, ver.lora_int_id, path)
        for key in {rec.alias_key for rec in records if rec.pinned}:
            with contextlib.suppress(ApiError):
                await self.residency.pin(key)

    async def _commit(self, mutate: Any) -> Any:
        return await self.catalog.commit(mutate, self._adopt)

    async def _prepare(
        self, key: AdapterKey, source: str, caller: Caller
    ) -> tuple[Path, AdapterInfo]:
        """Fetch (within ``caller``'s source limits) and validate, without touching the engine."""

        def work() -> tuple[Path, AdapterInfo]:
            got = materialize(
                source,
                name=key.name,
                version=key.version,
                roots=self.settings.adapter_roots,
                cache_dir=self.settings.adapter_cache_dir,
                storage_options=self.settings.fsspec_storage_options,
                policy=self.settings.adapter_sources,
                caller=caller,
            )
            return got.path, validate_adapter(got.path, self.shapes, self.settings.max_lora_rank)

        return await asyncio.to_thread(work)

    # ----- mutations -----------------------------------------------------------------------
    async def register(
        self,
        name: str,
        source: str,
        version: str | None = None,
        promote: bool = True,
        load: bool = False,
    ) -> dict[str, Any]:
        """Validate and add a version; point the alias at it when ``promote``."""
        try:
            check_name(name)
            if version is not None:
                check_name(version, "version")
        except AdapterInvalid as exc:
            raise ApiError(400, str(exc), param="lora_name") from None
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model's name", param="lora_name")
        if not isinstance(source, str) or not source.strip():
            raise ApiError(400, "source (lora_path) must be a non-empty string", param="source")

        async with self._lock:
            existing = self.catalog.state.adapters.get(name)
            if existing is not None:
                same = [v for v in existing.versions.values() if v.source == source]
                if version is None and same:
                    version = same[-1].version  # re-registering the same source: no new version
                if version in existing.versions and existing.versions[version].source != source:
                    raise ApiError(409, f"{name}@{version} exists with another source")
            if version is None:
                version = existing.next_version() if existing else "v1"
            key = AdapterKey(name, version)
            created = existing is None or version not in existing.versions
            principal = current()
            if created:
                try:
                    path, info = await self._prepare(key, source, principal.caller())
                except AdapterInvalid as exc:
                    message = f"adapter {str(key)!r} rejected: {exc}"
                    raise ApiError(400, message, param="source") from None

            async def mutate(state: CatalogState) -> None:
                record = state.adapters.get(name)
                if created:
                    ver = VersionRecord(
                        version=version, source=source, lora_int_id=state.next_lora_id,
                        rank=info.rank, alpha=info.alpha, target_modules=info.target_modules,
                        size_bytes=info.size_bytes, registered_at=time.time(),
                        registered_by=principal.name,
                    )  # fmt: skip
                    state.next_lora_id += 1
                    if record is None:
                        record = AdapterRecord(name=name, alias=AliasRecord(version=version))
                        state.adapters[name] = record
                    record.versions[version] = ver
                    self.residency.expose(key, ver.lora_int_id, path)
                if promote and record.alias.version != version:
                    record.alias = AliasRecord(version=version)

            await self._commit(mutate)
        if created or promote:
            self._audit("register", name, version=version, source=source, created=created,
                        promoted=promote)  # fmt: skip
        if load:
            await self.residency.ensure_loaded(key)
        return {"name": name, "version": version, "created": created, **self.describe(name)}

    async def delete(self, name: str, version: str | None = None) -> None:
        async with self._lock:
            record = self.catalog.record(name)
            if version is not None:
                self.catalog.version(AdapterKey(name, version))
                if record.alias.version == version and len(record.versions) > 1:
                    raise ApiError(
                        409,
                        f"{name}@{version} is the alias target; point the alias elsewhere first",
                    )
            keys = [record.key(v) for v in ([version] if version else record.versions)]

            async def mutate(state: CatalogState) -> None:
                rec = state.adapters[name]
                if version is None or len(rec.versions) == 1:
                    del state.adapters[name]
                else:
                    del rec.versions[version]
                    rec.alias = rec.alias.without(version)
                    if rec.previous_alias and version in rec.previous_alias.versions_used():
                        rec.previous_alias = None

            await self._commit(mutate)
            self._audit("delete", name, version=version)
            for key in keys:
                await self.residency.forget(key)

    async def set_pinned(self, name: str, pinned: bool) -> dict[str, Any]:
        async with self._lock:
            record = self.catalog.record(name)
            if pinned and not record.pinned:
                limit = (self.settings.max_loras or sizing.UNSIZED_SLOTS) - 1
                if len(self.catalog.pinned_keys()) >= limit:
                    raise ApiError(409, f"at most {limit} adapters may be pinned (max_loras - 1)")

            async def mutate(state: CatalogState) -> None:
                state.adapters[name].pinned = pinned

            await self._commit(mutate)
            self._audit("pin" if pinned else "unpin", name)
        key = record.alias_key
        if pinned:
            await self.residency.pin(key)
        else:
            await self.residency.evict(key)  # the engine keeps pins until the adapter is removed
        return self.describe(name)

    async def load(self, key: AdapterKey) -> None:
        self.catalog.version(key)
        await self.residency.ensure_loaded(key)

    async def unload(self, key: AdapterKey) -> None:
        """Evict from the engine but keep registered (it loads again on the next request)."""
        if not self.residency.is_servable(key):
            raise ApiError(404, f"{str(key)!r} is not registered", param="model")
        await self.residency.evict(key)

    # ----- observation ---------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        record = self.catalog.record(name)
        versions = [
            {**ver.model_dump(exclude={"registered_by"}), "id": str(record.key(ver.version)),
             **self.residency.facts(record.key(ver.version))}
            for ver in record.versions.values()
        ]  # fmt: skip
        return {
            "name": name,
            "alias": record.alias.model_dump(),
            "previous_alias": record.previous_alias.model_dump() if record.previous_alias else None,
            "pinned": record.pinned,
            "versions": versions,
        }

    def names(self) -> list[str]:
        return sorted(self.catalog.state.adapters)

    def model_ids(self) -> list[tuple[str, AdapterKey]]:
        """(model id, version it serves) for each servable alias and version (``/v1/models``)."""
        return [(i, k) for i, k in self.catalog.model_ids() if self.residency.is_servable(k)]
