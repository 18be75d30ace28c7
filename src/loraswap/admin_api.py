"""Adapter routes: vLLM-compatible load/unload, ``/admin/adapters``, ``/v1/models``, and the
middleware that maps each request's ``model`` to an adapter version and loads it just in time."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .registry import AdapterError, AdapterRegistry, dumps_error

# Routes whose JSON body carries an OpenAI `model` field naming the base model or an adapter.
MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/tokenize",
        "/detokenize",
    }
)
MAX_BODY_BYTES = 64 << 20


def registry_of(request: Request) -> AdapterRegistry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        if getattr(request.app.state, "engine_client", None) is not None:
            raise AdapterError(
                400, "adapters are disabled (LORASWAP_ENABLE_LORA=false)", param=None
            )
        raise AdapterError(503, "the engine is still starting", "ServiceUnavailableError", None)
    return registry


class ModelRoutingMiddleware:
    """Rewrites ``model`` (an alias or ``name@version``) to the version that serves it.

    vLLM then echoes that version in the response's ``model``; the adapter is loaded into the
    engine before the request reaches vLLM (concurrent first requests share one load).
    """

    def __init__(self, app: Any, state_app: FastAPI) -> None:
        self.app = app
        self.state_app = state_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        registry = getattr(self.state_app.state, "registry", None)
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in MODEL_ROUTES
        ):
            await self.app(scope, receive, send)
            return

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                await self._error(send, 413, "request body too large", "BadRequestError", None)
                return
        body = b"".join(chunks)

        key = None
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            payload = None  # vLLM answers malformed JSON itself
        limit = self.state_app.state.settings.max_tokens_limit
        if limit is not None and isinstance(payload, dict):
            for field in ("max_tokens", "max_completion_tokens"):
                asked = payload.get(field)
                if isinstance(asked, int) and asked > limit:
                    message = f"{field} is {asked}; this server allows at most {limit}"
                    await self._error(send, 400, message, "BadRequestError", field)
                    return
        if registry and isinstance(payload, dict) and isinstance(payload.get("model"), str):
            key = registry.resolve(payload["model"])
        if key is not None:
            try:
                await registry.ensure_loaded(key)
            except AdapterError as exc:
                registry.record_request(key, ok=False)
                await self._error(send, exc.status, exc.message, exc.err_type, exc.param)
                return
            payload["model"] = key
            body = json.dumps(payload).encode()
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() != b"content-length"
            ] + [(b"content-length", str(len(body)).encode())]

        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # disconnects still reach vLLM, which aborts the request

        status = 500

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, watch if key else send)
        finally:
            if key is not None:
                registry.record_request(key, ok=status < 400)

    @staticmethod
    async def _error(send: Any, status: int, message: str, err_type: str, param: str | None):
        body = dumps_error(status, message, err_type, param)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class LoadAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body; ``lora_name`` may pin a version (``name@v2``)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(examples=["uppercase"])
    source: str = Field(
        description="adapters/<dir>, bentoml://tag, hf://org/name@rev, s3://bucket/prefix",
        examples=["adapters/uppercase"],
    )
    version: str | None = Field(None, description="default: v<N+1>")
    promote: bool = Field(True, description="point the alias at this version")
    load: bool = Field(False, description="load into the engine now, not on first request")
    pin: bool = False


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    canary_version: str | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)


def split_name(lora_name: str) -> tuple[str, str | None]:
    name, sep, version = lora_name.partition("@")
    return name, (version if sep else None)


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", tags=["OpenAI"])
    async def list_models(request: Request) -> JSONResponse:
        """The base model, every adapter alias and every adapter version (``parent`` = base)."""
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

        serving_models = getattr(request.app.state, "openai_serving_models", None)
        if serving_models is None:
            raise AdapterError(503, "the engine is still starting", "ServiceUnavailableError", None)
        listing = await serving_models.show_available_models()
        cards = {card.id: card for card in listing.data}
        registry: AdapterRegistry | None = request.app.state.registry
        for model_id, key in registry.servable_names() if registry else []:
            if model_id not in cards:
                cards[model_id] = ModelCard(
                    id=model_id,
                    root=serving_models.lora_requests[key].path,
                    parent=registry.base_name,
                    permission=[ModelPermission()],
                )
        listing.data = list(cards.values())
        return JSONResponse(listing.model_dump())

    @router.post("/v1/load_lora_adapter", tags=["Adapters (vLLM-compatible)"])
    async def load_lora_adapter(body: LoadAdapterRequest, request: Request) -> PlainTextResponse:
        name, version = split_name(body.lora_name)
        await registry_of(request).register(name, body.lora_path, version, load=True)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", tags=["Adapters (vLLM-compatible)"])
    async def unload_lora_adapter(
        body: UnloadAdapterRequest, request: Request
    ) -> PlainTextResponse:
        name, version = split_name(body.lora_name)
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
        return {"deleted": f"{name}@{version}"}

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
        await registry.ensure_loaded(registry.key(name, version))
        return registry.describe(name)

    @router.post("/admin/adapters/{name}/versions/{version}/unload", tags=["Adapters"])
    async def unload_version(name: str, version: str, request: Request) -> dict:
        registry = registry_of(request)
        await registry.unload(registry.key(name, version))
        return registry.describe(name)

    return router


async def adapter_error_handler(_: Request, exc: AdapterError) -> JSONResponse:
    return JSONResponse(
        json.loads(dumps_error(exc.status, exc.message, exc.err_type, exc.param)),
        status_code=exc.status,
    )


def install(app: FastAPI) -> None:
    """Add the adapter routes, their error handler and the routing middleware to ``app``."""
    app.include_router(build_router())
    app.add_exception_handler(AdapterError, adapter_error_handler)
    app.add_middleware(ModelRoutingMiddleware, state_app=app)
