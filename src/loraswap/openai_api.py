"""The ASGI app BentoML mounts at ``/``: vLLM's OpenAI serving layer plus loraswap's routers,
with the request pipeline in front of vLLM's inference routes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI

from . import errors, vllm_compat
from .adapters.router import router as adapters_router
from .batches import router as batches_router
from .batches.runner import replica_id
from .config import Settings
from .console.router import router as console_router
from .info import build_router as info_router
from .native.router import router as native_router
from .pipeline import PipelineMiddleware, VllmHandlers
from .routes import VLLM_PATHS
from .runtime import unavailable_reason
from .shadows.router import router as shadows_router
from .tenants import Tenancy
from .tenants.router import router as tenants_router

if TYPE_CHECKING:
    from argparse import Namespace

    from vllm.engine.protocol import EngineClient

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """vLLM's routes carry their own ``/v1`` prefix. Nothing here imports vLLM: the BentoML CLI
    imports the service before it starts the worker, and vLLM would cost it ~12 s of the start;
    vLLM's routes and exception handlers join in :func:`attach_engine`."""
    app = FastAPI(
        title="loraswap OpenAI-compatible API",
        docs_url="/v1/docs",
        openapi_url="/v1/openapi.json",
        redoc_url=None,
    )
    app.state.runtime = None
    app.state.tenancy = Tenancy(settings)  # outlives engine restarts, like the access layer
    app.state.replica = replica_id()  # this process among replicas (batch job leases)
    errors.install(app)  # vLLM's handlers join when the engine attaches (attach_engine)
    app.include_router(adapters_router)  # before vLLM's: its /v1/models lists adapters too
    app.include_router(native_router)
    app.include_router(batches_router)
    app.include_router(info_router())
    app.include_router(tenants_router)
    app.include_router(shadows_router)
    app.include_router(console_router)
    app.add_middleware(
        PipelineMiddleware,
        pipeline_of=lambda: _pipeline(app),
        unavailable=lambda: unavailable_reason(app),
    )
    return app


def keep_listed_vllm_routes(app: FastAPI, ours: list) -> None:
    """Serve only the vLLM routes the route table lists (and none that duplicate ours, such as
    ``/v1/models``); name the rest once in the log."""
    mine = {id(r) for r in ours}
    our_paths = {getattr(r, "path", None) for r in ours}
    kept, dropped = [], set()
    for route in app.router.routes:
        path = getattr(route, "path", None)
        if id(route) in mine or (path in VLLM_PATHS and path not in our_paths):
            kept.append(route)
        else:
            dropped.add(str(path))
    app.router.routes[:] = kept
    app.openapi_schema = None
    if dropped:
        logger.info("vLLM routes not served (not in the route table): %s", sorted(dropped))


def _pipeline(app: FastAPI):
    runtime = app.state.runtime
    return runtime.pipeline if runtime is not None else None


async def attach_engine(app: FastAPI, client: EngineClient, args: Namespace) -> VllmHandlers:
    """vLLM's serving state for ``client`` (again after an engine restart); its routers, the
    ones the route table lists, the first time."""
    supported_tasks = await client.get_supported_tasks()
    app.state.args = args  # register_api_routers reads it
    if not getattr(app.state, "vllm_routes_mounted", False):
        ours = list(app.router.routes)
        errors.install_vllm(app)
        vllm_compat.register_api_routers(args, app, supported_tasks, client.model_config)
        keep_listed_vllm_routes(app, ours)
        app.state.vllm_routes_mounted = True
    await vllm_compat.init_app_state(client, app.state, args, supported_tasks)
    return VllmHandlers(
        chat=app.state.openai_serving_chat,
        completion=app.state.openai_serving_completion,
        models=app.state.openai_serving_models,
    )
