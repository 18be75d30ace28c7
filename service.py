"""loraswap's BentoML service: a base model on vLLM behind vLLM's own OpenAI routes."""

from __future__ import annotations

from pathlib import Path

import bentoml

from loraswap.config import get_settings
from loraswap.engine import Engine, start_fork_server
from loraswap.log_setup import configure_logging

configure_logging()
settings = get_settings().anchored(Path(__file__).resolve().parent)
if bentoml.server_context.worker_index is not None:  # a serving worker (not `bentoml build`)
    start_fork_server(settings)  # its imports run beside the rest of this module's (1.5 s)

from loraswap.access import AccessMiddleware  # noqa: E402
from loraswap.drain import Drain, DrainMiddleware  # noqa: E402
from loraswap.model_import import base_model_reference, resolved_model_path  # noqa: E402
from loraswap.openai_api import create_app  # noqa: E402
from loraswap.supervisor import EngineSupervisor  # noqa: E402

openai_app = create_app(settings)
drain = Drain(settings.drain_s, settings.drain_notice_s)


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
        self.supervisor = EngineSupervisor(openai_app, settings, Engine(settings, self.model_path))

    @bentoml.on_startup
    async def start_engine(self) -> None:
        drain.install(before_wait=self.supervisor.hand_back_jobs)
        await self.supervisor.start()

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        await self.supervisor.stop()

    async def __is_ready__(self) -> bool:
        if drain.draining or self.supervisor.restarting:
            return False
        return await self.supervisor.engine.is_healthy()

    def __is_alive__(self) -> bool:
        """Alive while the engine serves or is being restarted; not once restarts failed, so
        the orchestrator replaces the process."""
        return not self.supervisor.failed


LoRASwap.add_asgi_middleware(AccessMiddleware, settings=settings, tenancy=openai_app.state.tenancy)
LoRASwap.add_asgi_middleware(DrainMiddleware, drain=drain)
