"""The typed runtime shared by every route, built once the engine is up (by :mod:`.assembly`).

Routes reach the engine, the pipeline, the adapter registry and the batch runner through
:func:`runtime_of` instead of reading loose attributes of ``app.state``. This module only gives
access to that state, so every route may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Settings
from .errors import ApiError
from .machine import Choice
from .pipeline import RequestPipeline, VllmHandlers

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from .adapters.registry import AdapterRegistry
    from .batches.runner import BatchRunner


@dataclass
class Runtime:
    settings: Settings
    engine: EngineClient
    handlers: VllmHandlers
    pipeline: RequestPipeline
    registry: AdapterRegistry | None = None
    batches: BatchRunner | None = None
    choices: dict[str, Choice] = field(default_factory=dict)
    cpu_build: bool = True
    model_path: str = ""

    @property
    def base_name(self) -> str:
        return self.settings.served_model_name

    async def close(self) -> None:
        if self.pipeline.tenancy is not None:
            await self.pipeline.tenancy.usage.close()
        if self.batches is not None:
            await self.batches.close()
        if self.pipeline.shadows is not None:
            await self.pipeline.shadows.close()
        if self.registry is not None:
            await self.registry.close()


def runtime_of(conn: Any) -> Runtime:
    """The runtime of the app serving ``conn`` (a Request or WebSocket); 503 while starting."""
    runtime = getattr(conn.app.state, "runtime", None)
    if runtime is None:
        raise ApiError.engine_starting(unavailable_reason(conn.app))
    return runtime


def unavailable_reason(app: Any) -> str:
    return getattr(app.state, "unavailable", None) or "the engine is still starting"


def registry_of(conn: Any) -> AdapterRegistry:
    runtime = runtime_of(conn)
    if runtime.registry is None:
        raise ApiError(400, "adapters are disabled (LORASWAP_ENABLE_LORA=false)")
    return runtime.registry
