"""Builds the runtime when the engine is up: the one place that knows every part (vLLM's
serving layer, the pipeline, adapters, shadows and batches), so that the parts, and the routes
that reach them through :mod:`.runtime`, need not know each other."""

from __future__ import annotations

from typing import Any

from . import metrics
from .adapters.registry import AdapterRegistry
from .adapters.residency import VllmAdapterEngine
from .adapters.validation import BaseModelShapes
from .audit import AuditLog
from .batches import BatchRunner, BatchStore
from .config import Settings, quiet_vllm_client_errors
from .engine import Engine, is_cpu_build
from .openai_api import attach_engine
from .pipeline import RequestPipeline, guard_engine
from .runtime import Runtime
from .shadows.runner import ShadowRunner
from .shadows.store import ComparisonStore
from .vllm_plugin import staging


async def build_runtime(app: Any, settings: Settings, engine: Engine) -> Runtime:
    """Wire a started engine to vLLM's serving layer, the pipeline, adapters and batches."""
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


def start_shadows(pipeline: RequestPipeline, settings: Settings, db: Any) -> ShadowRunner:
    store = ComparisonStore(db, settings.shadow_retention_days, settings.shadow_max_records)
    store.prune()
    return ShadowRunner(pipeline, store, settings.shadow_concurrency, settings.shadow_queue_size)
