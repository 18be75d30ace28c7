"""The tenants directory and the key index built from it.

Tenants and their hashed keys are rows in the database (:mod:`.rows`, shared by replicas), or,
with ``tenants_document``, one JSON document (``tenants_uri``, a local path or an fsspec URL).
Changes go through the admin API or the CLI and are written at once; replicas re-read every
``registry_poll_s`` (a revoked key fails on the next request on the replica that revoked it,
and within one poll interval on the others).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable
from types import EllipsisType
from typing import Any

from ..config import Settings
from ..documents import DocumentStore
from ..errors import ApiError
from .model import ApiKey, Limits, Tenant, TenantsState, hash_key, new_key
from .principal import ANONYMOUS, DEFAULT_USER, GLOBAL_ADMIN, Principal
from .rows import TenantRows

logger = logging.getLogger(__name__)


class TenantStore(DocumentStore[TenantsState]):
    """The tenants document; local files are readable by their owner only (key hashes)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, TenantsState, storage_options)

    def save_if(self, state: TenantsState, expected_revision: int) -> bool:
        saved = super().save_if(state, expected_revision)
        if saved and self.local:
            self.path.chmod(0o600)
        return saved

    def newer(self, revision: int) -> TenantsState | None:
        latest = self.load()
        return None if latest.revision == revision else latest

    def commit(
        self, mutate: Callable[[TenantsState], Any], attempts: int = 8
    ) -> tuple[TenantsState, Any]:
        """Apply ``mutate`` to the latest document and write it if nobody wrote meanwhile
        (compare-and-swap on ``revision``), else retry on the newer one."""
        for _ in range(attempts):
            latest = self.load()
            state = latest.model_copy(deep=True)
            result = mutate(state)
            state.revision = latest.revision + 1
            if self.save_if(state, latest.revision):
                return state, result
            time.sleep(random.uniform(0, 0.05))
        raise ApiError(409, "the tenants document kept changing; retry the request")


class TenantDirectory:
    """Authenticates keys and keeps the tenants document current."""

    def __init__(self, settings: Settings, store: TenantStore | TenantRows | None = None) -> None:
        self.settings = settings
        self.store = store or TenantStore(settings.tenants_uri, settings.fsspec_storage_options)
        self.state = TenantsState()
        self._by_hash: dict[str, tuple[Tenant, ApiKey]] = {}
        self._lock = asyncio.Lock()
        self._checked = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self.admin_keys = settings.admin_api_keys or settings.api_keys
        self.user_keys = settings.api_keys

    # ----- state ---------------------------------------------------------------------------
    def load(self) -> None:
        try:
            self._adopt(self.store.load())
        except Exception as exc:
            logger.error("cannot read tenants from %s: %s", self.store.uri, exc)

    def _adopt(self, state: TenantsState) -> None:
        self.state = state
        self._by_hash = {k.sha256: (t, k) for t in state.tenants.values() for k in t.keys}
        self._checked = time.monotonic()

    def refresh_if_due(self) -> None:
        """Re-read the document in the background once per poll interval (replicas)."""
        poll = self.settings.registry_poll_s
        if poll <= 0 or time.monotonic() - self._checked < poll or self._refreshing is not None:
            return
        self._checked = time.monotonic()

        async def refresh() -> None:
            try:
                latest = await asyncio.to_thread(self.store.newer, self.state.revision)
                if latest is not None:
                    self._adopt(latest)
            except Exception as exc:
                logger.warning("cannot re-read tenants: %s", exc)
            finally:
                self._refreshing = None

        self._refreshing = asyncio.get_running_loop().create_task(refresh())

    def stored(self) -> dict[str, Tenant]:
        """The tenants as stored now (blocking), for a check that must not act on this
        replica's copy of up to one poll ago (an adapter adopted from another replica may be a
        tenant's created there a moment before); this copy if the store cannot be read."""
        try:
            return self.store.load().tenants
        except Exception as exc:
            logger.warning("cannot read tenants, using this replica's copy: %s", exc)
            return self.state.tenants

    @property
    def auth_required(self) -> bool:
        return bool(self.admin_keys or self.user_keys or self.state.tenants)

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal a presented key stands for; None for a missing or unknown key."""
        if not self.auth_required:
            return ANONYMOUS
        if not key:
            return None
        if any(hmac.compare_digest(key.encode(), k.encode()) for k in self.admin_keys):
            return GLOBAL_ADMIN
        if any(hmac.compare_digest(key.encode(), k.encode()) for k in self.user_keys):
            return DEFAULT_USER
        found = self._by_hash.get(hash_key(key))
        if found is None:
            return None
        tenant, api_key = found
        return Principal(tenant.name, tenant, admin=api_key.role == "admin", key_id=api_key.id)

    def tenant(self, name: str) -> Tenant:
        tenant = self.state.tenants.get(name)
        if tenant is None:
            raise ApiError(404, f"tenant {name!r} does not exist", param="tenant")
        return tenant

    # ----- changes -------------------------------------------------------------------------
    async def _commit(self, mutate: Callable[[TenantsState], Any]) -> Any:
        """Apply ``mutate`` to the stored directory and write what it changed (a transaction
        on the rows; compare-and-swap on a document); adopt the result."""
        async with self._lock:
            state, result = await asyncio.to_thread(self.store.commit, mutate)
            self._adopt(state)
            return result

    async def create(self, tenant: Tenant) -> Tenant:
        if not self.admin_keys:  # else the first tenant would lock an open server for good
            raise ApiError(
                400, "tenants need a global admin key: set LORASWAP_ADMIN_API_KEYS and restart",
                param="name",
            )  # fmt: skip

        def mutate(state: TenantsState) -> Tenant:
            if tenant.name in state.tenants:
                raise ApiError(409, f"tenant {tenant.name!r} already exists", param="name")
            state.tenants[tenant.name] = tenant.model_copy(update={"keys": []})
            return state.tenants[tenant.name]

        return await self._commit(mutate)

    async def update(
        self,
        name: str,
        adapters: list[str] | None = None,
        base_model: bool | None = None,
        limits: Limits | None = None,
        sources: list[str] | EllipsisType | None = ...,
    ) -> Tenant:
        """Change what is given; ``sources=None`` resets them to the policy's default."""

        def mutate(state: TenantsState) -> Tenant:
            tenant = state.tenants.get(name)
            if tenant is None:
                raise ApiError(404, f"tenant {name!r} does not exist", param="tenant")
            if adapters is not None:
                tenant.adapters = Tenant(name=name, adapters=adapters).adapters
            if base_model is not None:
                tenant.base_model = base_model
            if limits is not None:
                tenant.limits = limits
            if sources is not ...:
                tenant.sources = Tenant(name=name, sources=sources).sources
            return tenant

        return await self._commit(mutate)

    async def delete(self, name: str) -> None:
        def mutate(state: TenantsState) -> None:
            if state.tenants.pop(name, None) is None:
                raise ApiError(404, f"tenant {name!r} does not exist", param="tenant")

        await self._commit(mutate)

    async def add_key(self, name: str, role: str = "user", label: str = "") -> tuple[ApiKey, str]:
        """A new key for ``name``: the plain key is returned once and never stored."""
        plain = new_key()
        key = ApiKey(id="key-" + secrets.token_hex(6), sha256=hash_key(plain), role=role,
                     label=label)  # fmt: skip

        def mutate(state: TenantsState) -> ApiKey:
            tenant = state.tenants.get(name)
            if tenant is None:
                raise ApiError(404, f"tenant {name!r} does not exist", param="tenant")
            tenant.keys.append(key)
            return key

        return await self._commit(mutate), plain

    async def revoke_key(self, name: str, key_id: str) -> None:
        def mutate(state: TenantsState) -> None:
            tenant = state.tenants.get(name)
            if tenant is None:
                raise ApiError(404, f"tenant {name!r} does not exist", param="tenant")
            kept = [k for k in tenant.keys if k.id != key_id]
            if len(kept) == len(tenant.keys):
                raise ApiError(404, f"tenant {name!r} has no key {key_id!r}", param="key_id")
            tenant.keys = kept

        await self._commit(mutate)
