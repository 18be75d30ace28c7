"""Adapter routes: ``/v1/models``, vLLM-compatible load/unload, and ``/admin/adapters``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import vllm_compat
from ..runtime import registry_of, runtime_of
from .keys import AdapterKey, split_model
from .protocol import AliasRequest, LoadAdapterRequest, RegisterAdapterRequest, UnloadAdapterRequest

router = APIRouter()


@router.get("/v1/models", tags=["OpenAI"])
async def list_models(request: Request) -> JSONResponse:
    """The base model, every adapter alias and every adapter version (``parent`` = base)."""
    runtime = runtime_of(request)
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
    listing.data = list(cards.values())
    return JSONResponse(listing.model_dump())


@router.post("/v1/load_lora_adapter", tags=["Adapters (vLLM-compatible)"])
async def load_lora_adapter(body: LoadAdapterRequest, request: Request) -> PlainTextResponse:
    name, version = split_model(body.lora_name)
    await registry_of(request).register(name, body.lora_path, version, load=True)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", tags=["Adapters (vLLM-compatible)"])
async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request) -> PlainTextResponse:
    name, version = split_model(body.lora_name)
    await registry_of(request).delete(name, version)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/admin/adapters", tags=["Adapters"])
async def list_adapters(request: Request) -> dict:
    return {"object": "list", "data": registry_of(request).listing()}


@router.post("/admin/adapters", status_code=201, tags=["Adapters"])
async def register_adapter(body: RegisterAdapterRequest, request: Request) -> dict:
    registry = registry_of(request)
    result = await registry.register(
        body.name, body.source, body.version, promote=body.promote, load=body.load
    )
    if body.pin:
        result.update(await registry.set_pinned(body.name, True))
    return result


@router.get("/admin/adapters/{name}", tags=["Adapters"])
async def show_adapter(name: str, request: Request) -> dict:
    return registry_of(request).describe(name)


@router.delete("/admin/adapters/{name}", tags=["Adapters"])
async def delete_adapter(name: str, request: Request) -> dict:
    await registry_of(request).delete(name)
    return {"deleted": name}


@router.delete("/admin/adapters/{name}/versions/{version}", tags=["Adapters"])
async def delete_version(name: str, version: str, request: Request) -> dict:
    await registry_of(request).delete(name, version)
    return {"deleted": str(AdapterKey(name, version))}


@router.put("/admin/adapters/{name}/alias", tags=["Adapters"])
async def set_alias(name: str, body: AliasRequest, request: Request) -> dict:
    return await registry_of(request).set_alias(
        name, body.version, body.canary_version, body.canary_weight
    )


@router.post("/admin/adapters/{name}/pin", tags=["Adapters"])
async def pin(name: str, request: Request) -> dict:
    return await registry_of(request).set_pinned(name, True)


@router.post("/admin/adapters/{name}/unpin", tags=["Adapters"])
async def unpin(name: str, request: Request) -> dict:
    return await registry_of(request).set_pinned(name, False)


@router.post("/admin/adapters/{name}/versions/{version}/load", tags=["Adapters"])
async def load_version(name: str, version: str, request: Request) -> dict:
    registry = registry_of(request)
    await registry.load(AdapterKey(name, version))
    return registry.describe(name)


@router.post("/admin/adapters/{name}/versions/{version}/unload", tags=["Adapters"])
async def unload_version(name: str, version: str, request: Request) -> dict:
    registry = registry_of(request)
    await registry.unload(AdapterKey(name, version))
    return registry.describe(name)
