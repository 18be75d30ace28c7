"""Adapter routes: ``/v1/models``, vLLM-compatible load/unload, and ``/admin/adapters``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import metrics, vllm_compat
from ..errors import ApiError
from ..runtime import registry_of, runtime_of
from ..source_policy import SourceRefused
from ..tenants import current
from .keys import AdapterKey, split_model
from .protocol import (
    AliasRequest,
    LoadAdapterRequest,
    PromoteRequest,
    RegisterAdapterRequest,
    UnloadAdapterRequest,
)

router = APIRouter()


def owned(name: str) -> str:
    """``name`` if the caller may manage it; a tenant admin gets the same 404 for another
    tenant's adapter as for one that does not exist."""
    if not current().may_use_adapter(name):
        raise ApiError(404, f"adapter {name!r} is not registered", param="model")
    return name


def may_register(name: str) -> str:
    principal = current()
    if not principal.may_use_adapter(name):
        patterns = ", ".join(principal.tenant.adapters) or "none"
        raise ApiError(
            403, f"tenant {principal.name!r} may register only adapters named: {patterns}",
            param="name",
        )  # fmt: skip
    return name


def allowed_source(request: Request, source: str, param: str = "source") -> str:
    """``source`` if this key may register from it: the source policy for every key, and its
    tenant's own ``sources`` for a tenant's; else the 400 that names the policy."""
    settings = runtime_of(request).settings
    try:
        settings.adapter_sources.check_as(source, settings.adapter_roots, current().caller())
    except SourceRefused as exc:
        raise ApiError(400, str(exc), param=param) from None
    return source


def check_pin_quota(registry, name: str) -> None:
    tenant = current().tenant
    if tenant is None:
        return
    pinned = [
        r for r in registry.catalog.state.adapters.values() if r.pinned and tenant.owns(r.name)
    ]
    if name not in {r.name for r in pinned} and len(pinned) >= tenant.limits.max_pins:
        raise ApiError(409, f"tenant {tenant.name!r} may pin {tenant.limits.max_pins} adapters")


def paged(ids: list[str], limit: int, after: str | None) -> tuple[slice, dict]:
    """The page of ``ids`` after ``after`` (OpenAI's cursor style) and its list fields."""
    start = 0
    if after is not None:
        try:
            start = ids.index(after) + 1
        except ValueError:
            raise ApiError(400, f"after: no entry {after!r} in this list", param="after") from None
    window = slice(start, start + limit)
    shown = ids[window]
    more = {"has_more": start + limit < len(ids), "first_id": shown[0] if shown else None,
            "last_id": shown[-1] if shown else None}  # fmt: skip
    return window, more


def page_size(request: Request, limit: int | None) -> int:
    return limit or runtime_of(request).settings.list_page_size


@router.get("/v1/models", tags=["OpenAI"])
async def list_models(
    request: Request, limit: int | None = Query(None, ge=1, le=10_000), after: str | None = None
) -> JSONResponse:
    """The base model, every adapter alias and every adapter version (``parent`` = base);
    for a tenant's key, only what that key may use. Paged past ``list_page_size`` entries
    (``limit``, ``after``: ``has_more`` and ``last_id`` say how to go on)."""
    listing = await model_listing(request)
    window, more = paged([c.id for c in listing.data], page_size(request, limit), after)
    listing.data = listing.data[window]
    return JSONResponse(listing.model_dump() | more)


@router.get("/v1/models/{model_id:path}", tags=["OpenAI"])
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    """One entry of ``/v1/models`` (the SDK's ``models.retrieve``); 404 like an unknown model."""
    for card in (await model_listing(request)).data:
        if card.id == model_id:
            return JSONResponse(card.model_dump())
    raise ApiError(404, f"The model `{model_id}` does not exist.", param="model")


async def model_listing(request: Request):
    runtime = runtime_of(request)
    principal = current()
    serving_models = runtime.handlers.models
    listing = await serving_models.show_available_models()
    cards = {card.id: card for card in listing.data}
    for model_id, key in runtime.registry.model_ids() if runtime.registry else []:
        if model_id not in cards:
            cards[model_id] = vllm_compat.ModelCard(
                id=model_id,
                root=serving_models.lora_requests[str(key)].path,
                parent=runtime.base_name,
                permission=[vllm_compat.ModelPermission()],
            )
    listing.data = [
        card for card in cards.values()
        if (principal.may_use_base() if card.id == runtime.base_name
            else principal.may_use_adapter(split_model(card.id)[0]))
    ]  # fmt: skip
    return listing


@router.post("/v1/load_lora_adapter", tags=["Adapters (vLLM-compatible)"])
async def load_lora_adapter(body: LoadAdapterRequest, request: Request) -> PlainTextResponse:
    name, version = split_model(body.lora_name)
    may_register(name)
    source = allowed_source(request, body.lora_path, "lora_path")
    await registry_of(request).register(name, source, version, load=True)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", tags=["Adapters (vLLM-compatible)"])
async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request) -> PlainTextResponse:
    name, version = split_model(body.lora_name)
    await registry_of(request).delete(owned(name), version)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/admin/adapters", tags=["Adapters"])
async def list_adapters(
    request: Request, limit: int | None = Query(None, ge=1, le=10_000), after: str | None = None
) -> dict:
    """Adapters by name, with versions, alias and residency; paged like ``/v1/models``."""
    registry = registry_of(request)
    principal = current()
    names = [n for n in registry.names() if principal.may_use_adapter(n)]
    window, more = paged(names, page_size(request, limit), after)
    return {"object": "list", "data": [registry.describe(n) for n in names[window]], **more}


@router.post("/admin/adapters", status_code=201, tags=["Adapters"])
async def register_adapter(body: RegisterAdapterRequest, request: Request) -> dict:
    registry = registry_of(request)
    may_register(body.name)
    if body.pin:
        check_pin_quota(registry, body.name)
    source = allowed_source(request, body.source)
    result = await registry.register(
        body.name, source, body.version, promote=body.promote, load=body.load
    )
    if body.pin:
        result.update(await registry.set_pinned(body.name, True))
    return result


@router.get("/admin/adapters/{name}", tags=["Adapters"])
async def show_adapter(name: str, request: Request) -> dict:
    return registry_of(request).describe(owned(name))


@router.delete("/admin/adapters/{name}", tags=["Adapters"])
async def delete_adapter(name: str, request: Request) -> dict:
    await registry_of(request).delete(owned(name))
    return {"deleted": name}


@router.delete("/admin/adapters/{name}/versions/{version}", tags=["Adapters"])
async def delete_version(name: str, version: str, request: Request) -> dict:
    await registry_of(request).delete(owned(name), version)
    return {"deleted": str(AdapterKey(name, version))}


@router.put("/admin/adapters/{name}/alias", tags=["Adapters"])
async def set_alias(name: str, body: AliasRequest, request: Request) -> dict:
    return await registry_of(request).set_alias(
        owned(name), body.version, body.canary_version, body.canary_weight,
        body.shadow_version, body.shadow_rate,
    )  # fmt: skip


@router.post("/admin/adapters/{name}/promote", tags=["Adapters"])
async def promote(name: str, request: Request, body: PromoteRequest | None = None) -> dict:
    """The shadow (or canary) version becomes the alias target; ``rollback`` undoes it."""
    return await registry_of(request).promote(owned(name), body.source if body else None)


@router.post("/admin/adapters/{name}/rollback", tags=["Adapters"])
async def rollback(name: str, request: Request) -> dict:
    """Restore the alias as it was before its last retarget; else turn canary and shadow off."""
    return await registry_of(request).rollback(owned(name))


@router.get("/admin/traffic", tags=["Adapters"])
async def traffic(request: Request) -> dict:
    """Per served model (base and ``adapter@version``): engine runs, tokens, and median
    latency and time to first token over its latest runs; a tenant sees its own models."""
    runtime = runtime_of(request)
    principal = current()
    rows = []
    for row in metrics.TRAFFIC.rows():
        adapter, _, version = row["model"].partition("@")
        if not version:
            if not principal.may_use_base():
                continue
            adapter = None
        elif not principal.may_use_adapter(adapter):
            continue
        rows.append({"adapter": adapter, "version": version or None, **row})
    return {"object": "list", "base_model": runtime.base_name, "data": rows}


@router.get("/admin/audit", tags=["Adapters"])
async def audit(
    request: Request,
    adapter: str | None = None,
    limit: int = Query(50, ge=1, le=1000),
    before: int | None = Query(None, ge=1, le=2**62, description="entries older than this id"),
) -> dict:
    """Registry changes, newest first: who (tenant or admin, key id), when, what."""
    log = registry_of(request).audit
    principal = current()
    data: list = []
    if log is not None:
        await log.flush()  # this replica's own changes are in what it answers
        data = await asyncio.to_thread(log.entries, principal.may_use_adapter, adapter, limit,
                                       before)  # fmt: skip
    return {"object": "list", "data": data}


@router.post("/admin/adapters/{name}/pin", tags=["Adapters"])
async def pin(name: str, request: Request) -> dict:
    registry = registry_of(request)
    check_pin_quota(registry, owned(name))
    return await registry.set_pinned(name, True)


@router.post("/admin/adapters/{name}/unpin", tags=["Adapters"])
async def unpin(name: str, request: Request) -> dict:
    return await registry_of(request).set_pinned(owned(name), False)


@router.post("/admin/adapters/{name}/versions/{version}/load", tags=["Adapters"])
async def load_version(name: str, version: str, request: Request) -> dict:
    registry = registry_of(request)
    await registry.load(AdapterKey(owned(name), version))
    return registry.describe(name)


@router.post("/admin/adapters/{name}/versions/{version}/unload", tags=["Adapters"])
async def unload_version(name: str, version: str, request: Request) -> dict:
    registry = registry_of(request)
    await registry.unload(AdapterKey(owned(name), version))
    return registry.describe(name)
