"""The OpenAI-compatible routes: vLLM's own serving layer mounted on our FastAPI app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from .config import Settings

if TYPE_CHECKING:
    from argparse import Namespace

    from vllm.engine.protocol import EngineClient


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app BentoML mounts at ``/``; vLLM's routes carry their own ``/v1`` prefix.

    vLLM's exception handlers are installed now, before the first request freezes the
    middleware stack, so client mistakes become 4xx in the OpenAI error shape, not 500.
    """
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

    from . import admin_api, batches
    from .native.router import router as native_router

    app = FastAPI(
        title="loraswap OpenAI-compatible API",
        docs_url="/v1/docs",
        openapi_url="/v1/openapi.json",
        redoc_url=None,
    )
    app.state.registry = None
    app.state.settings = settings
    init_exception_handler(app)
    admin_api.install(app)
    app.include_router(native_router)
    batches.install(app)
    return app


async def attach_engine(app: FastAPI, engine_client: EngineClient, args: Namespace) -> None:
    """Register vLLM's routers and serving state once the engine is up."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.routers import register_api_routers

    supported_tasks = await engine_client.get_supported_tasks()
    app.state.args = args  # register_api_routers reads it
    register_api_routers(args, app, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
