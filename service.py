"""loraswap's BentoML service: a base model on vLLM behind vLLM's own OpenAI routes."""

from __future__ import annotations

from pathlib import Path

import bentoml

from loraswap import metrics
from loraswap.access import AccessMiddleware
from loraswap.batches import BatchRunner
from loraswap.config import configure_logging, get_settings
from loraswap.engine import Engine, limit_prompt_tokens
from loraswap.model_import import base_model_reference, resolved_model_path
from loraswap.openai_api import attach_engine, create_app
from loraswap.registry import AdapterRegistry

configure_logging()
settings = get_settings().anchored(Path(__file__).resolve().parent)
openai_app = create_app(settings)


@bentoml.asgi_app(openai_app, path="/")
@bentoml.service(
    name="loraswap",
    workers=1,
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": settings.max_concurrency},
    resources={"cpu": "2"},
)
class LoRASwap:
    """Base model + hot-swappable LoRA adapters behind OpenAI and native routes."""

    base_model = base_model_reference(settings.base_model, settings.base_model_revision)

    def __init__(self) -> None:
        self.model_path = resolved_model_path(self.base_model)
        self.engine = Engine(settings, self.model_path)
        self.registry: AdapterRegistry | None = None
        self.batches: BatchRunner | None = None

    @bentoml.on_startup
    async def start_engine(self) -> None:
        client = await self.engine.start()
        client.generate = metrics.count_tokens(client.generate, metrics.record_tokens)
        if settings.max_prompt_tokens is not None:
            client.generate = limit_prompt_tokens(client.generate, settings.max_prompt_tokens)
        await attach_engine(openai_app, client, self.engine.args)
        if settings.enable_lora:
            self.registry = AdapterRegistry(
                settings, self.model_path, client, openai_app.state.openai_serving_models
            )
            await self.registry.restore()
            if settings.preload_adapters and settings.adapter_roots:
                await self.registry.preload(settings.adapter_roots[0])
            openai_app.state.registry = self.registry
        self.batches = BatchRunner(openai_app.state, settings.state_dir, settings.batch_concurrency)
        openai_app.state.batches = self.batches
        self.batches.resume()

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        if self.batches is not None:
            await self.batches.close()
        if self.registry is not None:
            await self.registry.close()
        await self.engine.stop()

    async def __is_ready__(self) -> bool:
        return await self.engine.is_healthy()

    def __is_alive__(self) -> bool:
        """A dead engine never recovers in-process: let the orchestrator restart us."""
        return not self.engine.dead


LoRASwap.add_asgi_middleware(AccessMiddleware, settings=settings)
