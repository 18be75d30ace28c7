"""Who is making the current request, and what that lets them use.

The access middleware authenticates each request and sets :data:`CURRENT` for its duration;
everything downstream (the pipeline, ``/v1/models``, batches, adapter management) asks it.
Tasks started while serving a request inherit it; batch jobs set their owner's per line.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ..source_policy import Caller
from .model import Tenant


@dataclass(frozen=True)
class Principal:
    name: str  # the tenant's name, or "admin" / "default" / "anonymous"
    tenant: Tenant | None  # None: not restricted to a tenant's adapters
    admin: bool
    key_id: str | None = None

    @property
    def global_admin(self) -> bool:
        return self.admin and self.tenant is None

    def may_use_adapter(self, name: str) -> bool:
        return self.tenant is None or self.tenant.owns(name)

    def may_use_base(self) -> bool:
        return self.tenant is None or self.tenant.base_model

    def caller(self) -> Caller:
        """This key as the adapter source policy sees it: whose limits its sources are held to."""
        tenant = self.tenant
        if tenant is None:
            return Caller(admin=self.admin)
        sources = None if tenant.sources is None else tuple(tenant.sources)
        return Caller(admin=self.admin, tenant=tenant.name, sources=sources)


ANONYMOUS = Principal("anonymous", None, admin=True)  # a server without keys: today's open demo
GLOBAL_ADMIN = Principal("admin", None, admin=True)
DEFAULT_USER = Principal("default", None, admin=False)  # LORASWAP_API_KEYS: one open tenant

RESERVED = frozenset({ANONYMOUS.name, GLOBAL_ADMIN.name, DEFAULT_USER.name})

CURRENT: ContextVar[Principal] = ContextVar("loraswap_principal", default=ANONYMOUS)


def current() -> Principal:
    return CURRENT.get()
