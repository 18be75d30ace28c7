"""Adapter residency on this replica: which versions the engine can serve, which are loaded
in its memory (once ``capacity`` versions or ``host_bytes`` bytes are loaded, the least
recently used and least requested leave first; pins never leave), one shared load per
version, and per-version request counts. It talks to the engine only through the small
:class:`AdapterEngine` interface, so it is tested against a fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import metrics, router_metrics, vllm_compat
from ..errors import ApiError
from .keys import AdapterKey

logger = logging.getLogger(__name__)
# How many of the least recently used versions eviction weighs by their request counts.
EVICTION_WINDOW = 4


def _set_resident(key: AdapterKey, resident: bool) -> None:
    """The Prometheus gauge and the router's residency series follow a load or an unload."""
    metrics.set_resident(key, resident)
    router_metrics.resident_changed(key, resident)


class AdapterEngine(Protocol):
    """What residency needs of the engine and its serving layer."""

    def expose(self, key: AdapterKey, lora_int_id: int, path: Path) -> None:
        """Make the serving layer accept ``key`` as a model name (weights not loaded)."""

    def withdraw(self, key: AdapterKey) -> None: ...

    async def load(self, key: AdapterKey) -> None: ...

    async def unload(self, key: AdapterKey) -> None: ...

    async def pin(self, key: AdapterKey) -> None: ...


class VllmAdapterEngine:
    """:class:`AdapterEngine` on vLLM: ``LoRARequest``s in the OpenAI serving models' table and
    the engine client's add/remove/pin calls. With ``staging`` (the engine runs loraswap's worker
    extension) a load only fills the host tier (:mod:`loraswap.vllm_plugin.staging`); vLLM's own
    ``add_lora`` also takes a slot."""

    def __init__(
        self, client: Any, serving_models: Any, base_name: str, staging: bool = False
    ) -> None:
        self.client = client
        self.serving_models = serving_models
        self.base_name = base_name
        self.staging = staging

    def expose(self, key: AdapterKey, lora_int_id: int, path: Path) -> None:
        self.serving_models.lora_requests[str(key)] = vllm_compat.LoRARequest(
            lora_name=str(key),
            lora_int_id=lora_int_id,
            lora_path=str(path),
            base_model_name=self.base_name,
        )

    def withdraw(self, key: AdapterKey) -> None:
        self.serving_models.lora_requests.pop(str(key), None)

    def _request(self, key: AdapterKey) -> Any:
        return self.serving_models.lora_requests[str(key)]

    async def load(self, key: AdapterKey) -> None:
        if self.staging:
            from ..vllm_plugin import staging

            await self.client.collective_rpc(
                staging.METHOD, args=staging.rpc_args(self._request(key))
            )
        else:
            await self.client.add_lora(self._request(key))

    async def unload(self, key: AdapterKey) -> None:
        await self.client.remove_lora(self._request(key).lora_int_id)

    async def pin(self, key: AdapterKey) -> None:
        await self.client.pin_lora(self._request(key).lora_int_id)


@dataclass
class Resident:
    """Runtime facts of one servable version on this replica."""

    path: Path
    loaded_at: float | None = None
    bytes: int = 0
    load_seconds: float | None = None
    requests: int = 0
    errors: int = 0
    last_used: float = 0.0
    loading: asyncio.Future[None] | None = field(default=None, repr=False)


class Residency:
    def __init__(
        self,
        engine: AdapterEngine,
        capacity: int,
        pinned: Callable[[], set[AdapterKey]],
        host_bytes: int | None = None,
        size_of: Callable[[Path], int] = lambda path: 0,
        busy: Callable[[], Collection[AdapterKey]] = tuple,
    ) -> None:
        self.engine = engine
        self.capacity = capacity
        self.host_bytes = host_bytes
        self.size_of = size_of
        self.loaded_bytes = 0
        self.pinned = pinned
        self.busy = busy
        self.servable: dict[AdapterKey, Resident] = {}
        self.lru: OrderedDict[AdapterKey, None] = OrderedDict()
        self.broken: dict[AdapterKey, str] = {}
        router_metrics.watch(self)  # what a LoRA-aware router reads of this residency

    # ----- what can be served --------------------------------------------------------------
    def expose(self, key: AdapterKey, lora_int_id: int, path: Path) -> None:
        self.engine.expose(key, lora_int_id, path)
        self.servable[key] = Resident(path=path)
        self.broken.pop(key, None)

    def mark_broken(self, key: AdapterKey, reason: str) -> None:
        self.broken[key] = reason

    async def forget(self, key: AdapterKey) -> None:
        """Stop serving ``key``: out of the slots and the serving layer."""
        loaded = key in self.lru
        res = self.servable.pop(key, None)
        self.broken.pop(key, None)
        if loaded:
            self.lru.pop(key)
            self.loaded_bytes -= res.bytes if res else 0
            _set_resident(key, False)
            with contextlib.suppress(Exception):
                await self.engine.unload(key)
        self.engine.withdraw(key)

    def is_servable(self, key: AdapterKey) -> bool:
        return key in self.servable

    def is_loaded(self, key: AdapterKey) -> bool:
        return key in self.lru

    def status(self, key: AdapterKey) -> str:
        if key in self.broken:
            return "broken"
        if key in self.pinned():
            return "pinned"
        if key in self.lru:
            return "loaded"
        return "registered"

    # ----- slots ---------------------------------------------------------------------------
    async def ensure_loaded(self, key: AdapterKey) -> None:
        """Load ``key`` into an engine slot if needed; concurrent callers share one load."""
        res = self.servable.get(key)
        if res is None:
            raise ApiError(404, f"model {str(key)!r} is not servable", param="model")
        res.last_used = time.time()
        if key in self.lru:
            self.lru.move_to_end(key)
            return
        await asyncio.shield(self._start_load(key, res))

    def prefetch(self, key: AdapterKey) -> None:
        """Start loading ``key`` (a request for it waits for a slot): the load runs while it
        waits, and its own :meth:`ensure_loaded` then shares it. A failure is the request's to
        report, when it gets its slot and loads again."""
        res = self.servable.get(key)
        if res is None or key in self.lru or res.loading is not None:
            return
        res.last_used = time.time()

        def failed(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                logger.info("prefetch of adapter %s failed: %s", key, done.exception())

        self._start_load(key, res).add_done_callback(failed)

    def _start_load(self, key: AdapterKey, res: Resident) -> asyncio.Future[None]:
        """The one load of ``key`` in progress, started if none is; it leaves ``res`` when done,
        so a failed load is tried again by the next request."""
        if res.loading is None:
            loading = res.loading = asyncio.ensure_future(self._load(key, res))

            def settled(done: asyncio.Future[None]) -> None:
                if res.loading is done:
                    res.loading = None

            loading.add_done_callback(settled)
        return res.loading

    async def _load(self, key: AdapterKey, res: Resident) -> None:
        res.bytes = self.size_of(res.path)
        await self._make_room(res.bytes)
        started = time.perf_counter()
        try:
            await self.engine.load(key)
        except Exception as exc:
            raise ApiError(503, f"adapter {str(key)!r} failed to load: {exc}") from exc
        res.load_seconds = time.perf_counter() - started
        res.loaded_at = time.time()
        self.lru[key] = None
        self.loaded_bytes += res.bytes
        metrics.LOAD_SECONDS.observe(res.load_seconds)
        metrics.LOADS.labels(*metrics.labels_of(key)).inc()
        _set_resident(key, True)
        logger.info("loaded adapter %s in %.3fs", key, res.load_seconds)

    def _full(self, incoming: int) -> bool:
        over_bytes = self.host_bytes is not None and self.loaded_bytes + incoming > self.host_bytes
        return len(self.lru) >= self.capacity or (over_bytes and bool(self.lru))

    def _victim(self, keep: set[AdapterKey]) -> AdapterKey | None:
        """Recency and frequency: of the ``EVICTION_WINDOW`` least recently used versions not in
        ``keep``, the one with the fewest requests (the older on a tie), so an adapter in steady
        use that sat idle a moment outlives a one-off."""
        window = []
        for key in self.lru:
            if key not in keep:
                window.append(key)
                if len(window) == EVICTION_WINDOW:
                    break
        if not window:
            return None
        return min(window, key=lambda k: self.servable[k].requests if k in self.servable else 0)

    async def _make_room(self, incoming: int = 0) -> None:
        # Pins stay; so do versions with requests in flight: unloading one under a running
        # request makes vLLM load it again behind our back, and its own cache then evicts
        # a version this residency counts as loaded.
        keep = self.pinned() | set(self.busy())
        while self._full(incoming):
            victim = self._victim(keep)
            if victim is None:
                if len(self.lru) < self.capacity:
                    return  # only pins and busy versions are loaded: over the byte budget a while
                raise ApiError(503, "every adapter in memory is pinned or serving; unpin one")
            await self.evict(victim)
            metrics.EVICTIONS.labels(*metrics.labels_of(victim)).inc()

    async def evict(self, key: AdapterKey) -> None:
        """Out of the engine's slots; still servable (it loads again on the next request)."""
        if key not in self.lru:
            return
        self.lru.pop(key)
        await self.engine.unload(key)
        res = self.servable.get(key)
        if res is not None:
            res.loaded_at = None
            self.loaded_bytes -= res.bytes
        _set_resident(key, False)
        logger.info("evicted adapter %s", key)

    async def pin(self, key: AdapterKey) -> None:
        await self.ensure_loaded(key)
        try:
            await self.engine.pin(key)
        except Exception as exc:
            # vLLM's own cache can drop a version behind our back (a version deleted under a
            # running request is loaded again at its next step and takes a place): load it
            # again, then pin.
            logger.warning("pinning %s: %s; loading it again", key, exc)
            try:
                await self.engine.load(key)
                await self.engine.pin(key)
            except Exception as again:
                raise ApiError(503, f"adapter {str(key)!r} could not be pinned: {again}") from again
        router_metrics.refresh()

    # ----- observation ---------------------------------------------------------------------
    def record(self, key: AdapterKey, ok: bool) -> None:
        res = self.servable.get(key)
        metrics.REQUESTS.labels(*metrics.labels_of(key)).inc()
        if res is not None:
            res.requests += 1
        if not ok:
            metrics.ERRORS.labels(*metrics.labels_of(key)).inc()
            if res is not None:
                res.errors += 1

    def facts(self, key: AdapterKey) -> dict[str, Any]:
        res = self.servable.get(key)
        status = self.status(key)
        return {
            "status": status,
            # engine: in the engine's adapter memory (a slot is taken per step); disk: loads on use
            "residency": "engine" if status in ("loaded", "pinned") else "disk",
            "error": self.broken.get(key),
            "loaded_at": res.loaded_at if res else None,
            "load_seconds": res.load_seconds if res else None,
            "bytes": res.bytes if res and res.loaded_at else None,
            "requests": res.requests if res else 0,
            "errors": res.errors if res else 0,
            "last_used": res.last_used if res else None,
        }
