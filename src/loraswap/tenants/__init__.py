"""Tenants: API keys that see and use only their own adapters, batches and files, within their
own limits, with their usage counted."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..storage import Storage
from .directory import TenantDirectory, TenantStore
from .limits import TenantLimiter
from .model import ApiKey, Limits, Tenant
from .principal import ANONYMOUS, CURRENT, RESERVED, Principal, current
from .rows import TenantRows
from .usage import UsageLedger

__all__ = ["CURRENT", "ApiKey", "Limits", "Principal", "Tenancy", "Tenant", "current"]


class Tenancy:
    """The directory, limiter and usage ledger of one server (they outlive engine restarts)."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        uri = settings.tenants_uri or str(Path(settings.state_dir) / "tenants.json")
        self.document = TenantStore(uri, settings.fsspec_storage_options)
        self.storage = storage or Storage.from_settings(settings)
        rows = None if settings.tenants_document else TenantRows(self.storage.db)
        self.directory = TenantDirectory(settings, rows or self.document)
        if rows is None:
            self.directory.load()  # the document needs no schema: read at once, as before
        self.limiter = TenantLimiter.from_settings(settings)
        self.usage = UsageLedger(self.storage.db)

    def prepare(self) -> None:
        """Migrate the schema, bring in an older release's state and tenants document, and
        read the tenants (blocking; the start hook runs it in a thread)."""
        self.storage.prepare()
        if isinstance(self.directory.store, TenantRows):
            self.directory.store.import_document(self.document)
            self.directory.load()

    def principal_of(self, owner: str | None) -> Principal:
        """Who a stored job runs as: its tenant as it is now (a deleted tenant's lines can use
        nothing), or the unrestricted principal that created it."""
        if owner is None:
            return ANONYMOUS
        if owner in RESERVED:
            return Principal(owner, None, admin=False)
        tenant = self.directory.state.tenants.get(owner)
        return Principal(owner, tenant or Tenant(name=owner, base_model=False), admin=False)
