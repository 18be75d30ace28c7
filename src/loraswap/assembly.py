"""Builds the runtime when the engine is up: the one place that knows every part (vLLM's
serving layer, the pipeline, adapters, shadows and batches), so that the parts, and the routes
that reach them through :mod:`.runtime`, need not know each other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from . import metrics
from .adapters.registry import AdapterRegistry
from .adapters.residency import VllmAdapterEngine
from .adapters.validation import BaseModelShapes
from .audit import AuditLog
from .batches import BatchRunner, BatchStore
from .config import Settings
from .engine import Engine, is_cpu_build
from .log_setup import quiet_vllm_client_errors
from .openai_api import attach_engine
from .pipeline import RequestPipeline, VllmHandlers, guard_engine
from .runtime import Runtime
from .shadows.runner import ShadowRunner
from .shadows.store import ComparisonStore
from .tenants import Tenant
from .vllm_plugin import staging


async def build_runtime(app: Any, settings: Settings, engine: Engine) -> Runtime:
    """Wire a started engine to vLLM's serving layer, the pipeline, adapters and batches. Each
    part gets what it uses when it is made; only the pipeline and the shadow runner need each
    other (a shadow is a request the pipeline runs), so the runner joins the pipeline last."""
    settings = engine.resolved  # ``auto`` values (dtype, slots, host tier) as chosen at start
    storage = app.state.tenancy.storage
    quiet_vllm_client_errors()
    metrics.labels_of.limit = settings.metrics_adapter_series
    client = engine.client
    guard_engine(client, settings, app.state.tenancy)  # before vLLM's serving layer gets it
    handlers = await attach_engine(app, client, engine.args)
    registry = await build_registry(
        settings, engine, handlers, storage.db, app.state.tenancy.directory.stored
    )
    pipeline = RequestPipeline(settings, registry, handlers, app.state.tenancy)
    if registry is not None:
        pipeline.shadows = await start_shadows(pipeline, settings, storage.db)
    batches = BatchRunner(
        pipeline,
        BatchStore(storage),
        settings.batch_concurrency,
        settings.batch_idle_concurrency,
        principal_of=app.state.tenancy.principal_of,
        replica=app.state.replica,
        lease_s=settings.batch_lease_s,
        poll_s=settings.batch_poll_s,
    )
    batches.start_polling()
    return Runtime(
        settings, client, handlers, pipeline, registry, batches, choices=engine.choices,
        cpu_build=is_cpu_build(), model_path=engine.model_path,
    )  # fmt: skip


async def build_registry(
    settings: Settings,
    engine: Engine,
    handlers: VllmHandlers,
    db: Any,
    tenants: Callable[[], Mapping[str, Tenant]] | None = None,
) -> AdapterRegistry | None:
    """The adapter registry on this engine, restored from the catalogue (None: LoRA off);
    ``tenants`` reads the stored tenants a refetched adapter's sources are checked with."""
    if not settings.enable_lora:
        return None
    staged = getattr(engine.args, "worker_extension_cls", "") == staging.QUALNAME
    slots = VllmAdapterEngine(engine.client, handlers.models, settings.served_model_name, staged)
    shapes = await asyncio.to_thread(BaseModelShapes.from_checkpoint, engine.model_path)
    host = engine.choices.get("adapter_host_bytes")
    registry = AdapterRegistry(
        settings, shapes, slots, AuditLog(db), host_bytes=host.value if host else None, db=db,
        tenants=tenants,
    )  # fmt: skip
    await registry.restore()
    if settings.preload_adapters and settings.adapter_roots:
        await registry.preload(settings.adapter_roots[0])
    return registry


async def start_shadows(pipeline: RequestPipeline, settings: Settings, db: Any) -> ShadowRunner:
    store = ComparisonStore(db, settings.shadow_retention_days, settings.shadow_max_records)
    await asyncio.to_thread(store.prune)
    return ShadowRunner(pipeline, store, settings.shadow_concurrency, settings.shadow_queue_size)
