"""``/admin/tenants`` (global admin keys only); ``/admin/usage`` (tenant admins see their own)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator

from ..errors import ApiError
from . import Tenancy
from .model import Limits, Tenant, check_sources
from .principal import current

router = APIRouter(tags=["Tenants"])


class TenantChange(BaseModel):
    adapters: list[str] | None = None
    base_model: bool | None = None
    limits: Limits | None = None
    sources: list[str] | None = Field(
        None, description="where its admins may register from; `null` (given): the default"
    )

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str] | None) -> list[str] | None:
        return check_sources(value)


class KeyRequest(BaseModel):
    role: Literal["user", "admin"] = "user"
    label: str = Field("", max_length=100)


def tenancy_of(request: Request) -> Tenancy:
    return request.app.state.tenancy


def shown(tenant: Tenant) -> dict[str, Any]:
    """A tenant without its key hashes."""
    data = tenant.model_dump(exclude={"keys"})
    data["keys"] = [k.model_dump(exclude={"sha256"}) for k in tenant.keys]
    return data


@router.get("/admin/tenants")
async def list_tenants(request: Request) -> dict:
    tenants = tenancy_of(request).directory.state.tenants
    return {
        "object": "list",
        "data": [shown(t) for t in sorted(tenants.values(), key=lambda t: t.name)],
    }


@router.post("/admin/tenants", status_code=201)
async def create_tenant(body: Tenant, request: Request) -> dict:
    """A tenant (``keys`` are ignored: add them with ``POST /admin/tenants/{name}/keys``)."""
    return shown(await tenancy_of(request).directory.create(body))


@router.get("/admin/tenants/{name}")
async def show_tenant(name: str, request: Request) -> dict:
    return shown(tenancy_of(request).directory.tenant(name))


@router.patch("/admin/tenants/{name}")
async def change_tenant(name: str, body: TenantChange, request: Request) -> dict:
    sources = body.sources if "sources" in body.model_fields_set else ...
    tenant = await tenancy_of(request).directory.update(
        name, adapters=body.adapters, base_model=body.base_model, limits=body.limits,
        sources=sources,
    )  # fmt: skip
    return shown(tenant)


@router.delete("/admin/tenants/{name}")
async def delete_tenant(name: str, request: Request) -> dict:
    await tenancy_of(request).directory.delete(name)
    return {"deleted": name}


@router.post("/admin/tenants/{name}/keys", status_code=201)
async def add_key(name: str, body: KeyRequest, request: Request) -> dict:
    """A new key; the plain key is in this response only (the server keeps its hash)."""
    key, plain = await tenancy_of(request).directory.add_key(name, body.role, body.label)
    return {"id": key.id, "role": key.role, "label": key.label, "key": plain}


@router.delete("/admin/tenants/{name}/keys/{key_id}")
async def revoke_key(name: str, key_id: str, request: Request) -> dict:
    await tenancy_of(request).directory.revoke_key(name, key_id)
    return {"revoked": key_id}


@router.get("/admin/usage")
async def usage(request: Request, tenant: str | None = None, since: str | None = None) -> dict:
    """Requests and tokens per tenant, served model (adapter@version or the base model), UTC
    day and source (api, batch); ``since`` is a day (``2026-11-01``)."""
    principal = current()
    if principal.tenant is not None:
        if tenant not in (None, principal.name):
            raise ApiError(404, f"tenant {tenant!r} does not exist", param="tenant")
        tenant = principal.name
    rows = await asyncio.to_thread(tenancy_of(request).usage.report, tenant, since)
    return {"object": "list", "data": rows}
