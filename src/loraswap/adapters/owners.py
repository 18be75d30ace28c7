"""Whose source limits a registered adapter version is held to when it is fetched again (a
restart, another replica adopting it), so that narrowing a tenant's ``sources`` (or the policy)
also stops fetches of what was registered before.

A version records who registered it (``registered_by``: the audit's actor, a tenant's name or a
reserved principal's). A tenant's registration is held to that tenant's ``sources`` as stored
now, within ``allow`` (a tenant since deleted: ``tenant_default``, as for a tenant without its
own). A global admin's (or a server without keys', or a preloaded adapter's) is held to ``allow``
+ ``admin_extra`` whoever owns the name: a global admin may register for a tenant from
``admin_extra``, and that keeps working. A version stored before ``registered_by`` existed is
held to the tenants owning its name (any one of them: each could register it from there now),
or, owned by none, to a global admin's limits.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..source_policy import Caller, SourcePolicy
from ..tenants.model import Tenant
from ..tenants.principal import ANONYMOUS, DEFAULT_USER, GLOBAL_ADMIN


def registrant(
    name: str, registered_by: str | None, tenants: Mapping[str, Tenant], policy: SourcePolicy
) -> Caller:
    """The caller whose limits adapter ``name``'s version registered by ``registered_by`` is
    held to, with ``tenants`` as stored now."""
    if registered_by in (GLOBAL_ADMIN.name, ANONYMOUS.name):
        return Caller()
    if registered_by == DEFAULT_USER.name:
        return Caller(admin=False)
    if registered_by is not None:
        tenant = tenants.get(registered_by)
        sources = None if tenant is None or tenant.sources is None else tuple(tenant.sources)
        return Caller(tenant=registered_by, sources=sources)
    owners = sorted((t for t in tenants.values() if t.owns(name)), key=lambda t: t.name)
    if not owners:
        return Caller()
    entries = [e for t in owners for e in (t.sources if t.sources is not None else
                                           policy.tenant_default)]  # fmt: skip
    return Caller(tenant=", ".join(t.name for t in owners), sources=tuple(dict.fromkeys(entries)))
