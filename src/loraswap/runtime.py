"""The typed runtime built once when the engine is up, shared by every route.

Routes reach the engine, the pipeline, the adapter registry and the batch runner through
:func:`runtime_of` instead of reading loose attributes of ``app.state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import metrics
from .config import Settings
from .errors import ApiError
from .machine import Choice
from .pipeline import RequestPipeline, VllmHandlers, guard_engine

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from .adapters.registry import AdapterRegistry
    from .batches.runner import BatchRunner
    from .engine import Engine


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


async def build_runtime(app: Any, settings: Settings, engine: Engine) -> Runtime:
    """Wire a started engine to vLLM's serving layer, the pipeline, adapters and batches."""
    from .adapters.registry import AdapterRegistry
    from .adapters.residency import VllmAdapterEngine
    from .adapters.validation import BaseModelShapes
    from .audit import AuditLog
    from .batches import BatchRunner, BatchStore
    from .config import quiet_vllm_client_errors
    from .engine import is_cpu_build
    from .openai_api import attach_engine

    settings = engine.resolved  # ``auto`` values (dtype, slots, host tier) as chosen at start
    storage = app.state.tenancy.storage
    quiet_vllm_client_errors()
    metrics.labels_of.limit = settings.metrics_adapter_series
    client = engine.client
    guard_engine(client, settings, app.state.tenancy)  # before vLLM's serving layer gets it
    handlers = await attach_engine(app, client, engine.args)
    pipeline = RequestPipeline(settings, handlers=handlers, tenancy=app.state.tenancy)
    runtime = Runtime(
        settings, client, handlers, pipeline, choices=engine.choices, cpu_build=is_cpu_build(),
        model_path=engine.model_path,
    )  # fmt: skip
    if settings.enable_lora:
        from .vllm_plugin import staging

        staged = getattr(engine.args, "worker_extension_cls", "") == staging.QUALNAME
        slots = VllmAdapterEngine(client, handlers.models, settings.served_model_name, staged)
        shapes = BaseModelShapes.from_checkpoint(engine.model_path)
        host = engine.choices.get("adapter_host_bytes")
        registry = AdapterRegistry(
            settings, shapes, slots, AuditLog(storage.db),
            host_bytes=host.value if host else None, db=storage.db,
        )  # fmt: skip
        await registry.restore()
        if settings.preload_adapters and settings.adapter_roots:
            await registry.preload(settings.adapter_roots[0])
        runtime.registry = pipeline.registry = registry
        pipeline.shadows = start_shadows(pipeline, settings, storage.db)
    runtime.batches = BatchRunner(
        pipeline,
        BatchStore(storage),
        settings.batch_concurrency,
        settings.batch_idle_concurrency,
        principal_of=app.state.tenancy.principal_of,
        replica=app.state.replica,
        lease_s=settings.batch_lease_s,
        poll_s=settings.batch_poll_s,
    )
    runtime.batches.start_polling()
    return runtime


def start_shadows(pipeline: RequestPipeline, settings: Settings, db: Any) -> Any:
    from .shadows.runner import ShadowRunner
    from .shadows.store import ComparisonStore

    store = ComparisonStore(db, settings.shadow_retention_days, settings.shadow_max_records)
    store.prune()
    return ShadowRunner(pipeline, store, settings.shadow_concurrency, settings.shadow_queue_size)


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
