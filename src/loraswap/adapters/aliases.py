"""Alias changes: where an adapter's name sends its traffic (target, canary, shadow), promoting
the canary or shadow, and rolling the last change back.

A part of :class:`~.registry.AdapterRegistry` (its base class), kept apart because it only
rewrites the alias records: the registry supplies the catalog, the lock every change holds, the
commit that persists a change and serves it, the audit entry and the description returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ApiError
from .catalog import AliasRecord, CatalogState
from .keys import AdapterKey

if TYPE_CHECKING:
    import asyncio

    from .catalog import Catalog


class AliasChanges:
    """``set_alias``, ``promote`` and ``rollback`` of :class:`~.registry.AdapterRegistry`."""

    catalog: Catalog
    _lock: asyncio.Lock

    if TYPE_CHECKING:  # provided by AdapterRegistry

        async def _commit(self, mutate: Any) -> Any: ...

        def _audit(self, action: str, name: str, **detail: Any) -> None: ...

        def describe(self, name: str) -> dict[str, Any]: ...

    async def set_alias(
        self,
        name: str,
        version: str,
        canary_version: str | None = None,
        canary_weight: float = 0,
        shadow_version: str | None = None,
        shadow_rate: float = 0,
    ) -> dict[str, Any]:
        """Point the alias (and its canary and shadow); a new target keeps the old alias as
        what ``rollback`` restores."""
        async with self._lock:
            for v in (version, canary_version, shadow_version):
                if v is not None:
                    self.catalog.version(AdapterKey(name, v))
            for field, value in (("canary_weight", canary_weight), ("shadow_rate", shadow_rate)):
                if not 0 <= value <= 1:
                    raise ApiError(400, f"{field} must be within [0, 1]", param=field)
            alias = AliasRecord(
                version=version,
                canary_version=canary_version,
                canary_weight=canary_weight if canary_version else 0.0,
                shadow_version=shadow_version,
                shadow_rate=shadow_rate if shadow_version else 0.0,
            )
            await self._replace_alias(name, alias, "alias")
        return self.describe(name)

    async def promote(self, name: str, source: str | None = None) -> dict[str, Any]:
        """Make the shadow (or canary) version the alias target, in one change."""
        async with self._lock:
            alias = self.catalog.record(name).alias
            if source is None:
                given = [s for s in ("shadow", "canary") if getattr(alias, f"{s}_version")]
                if len(given) != 1:
                    detail = "both a shadow and a canary are set" if given else "neither is set"
                    raise ApiError(
                        409, f"{name}: say which to promote (`from`: shadow or canary); {detail}",
                        param="from",
                    )  # fmt: skip
                source = given[0]
            target = getattr(alias, f"{source}_version")
            if target is None:
                raise ApiError(409, f"{name} has no {source} version to promote", param="from")
            await self._replace_alias(name, AliasRecord(version=target), "promote", source)
        return self.describe(name)

    async def rollback(self, name: str) -> dict[str, Any]:
        """Undo the last change of the alias target (restoring its canary and shadow as they
        were); with none to undo, send all traffic back to the target (canary and shadow off)."""
        async with self._lock:
            record = self.catalog.record(name)
            if record.previous_alias is not None:
                restored = record.previous_alias
            elif record.alias.canary_version or record.alias.shadow_version:
                restored = AliasRecord(version=record.alias.version)
            else:
                raise ApiError(409, f"{name}: nothing to roll back")

            async def mutate(state: CatalogState) -> None:
                rec = state.adapters[name]
                before = rec.alias
                rec.alias, rec.previous_alias = restored, None
                return before

            before = await self._commit(mutate)
            self._audit("rollback", name, before=before.model_dump(), after=restored.model_dump())
        return self.describe(name)

    async def _replace_alias(
        self, name: str, alias: AliasRecord, action: str, source: str | None = None
    ) -> None:
        async def mutate(state: CatalogState) -> AliasRecord:
            rec = state.adapters[name]
            before = rec.alias
            if before.version != alias.version:
                rec.previous_alias = before
            rec.alias = alias
            return before

        before = await self._commit(mutate)
        detail = {"before": before.model_dump(), "after": alias.model_dump()}
        self._audit(action, name, **({"from": source} if source else {}), **detail)
