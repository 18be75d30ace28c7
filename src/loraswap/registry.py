"""The adapter registry: names, versions, aliases and pins; what the engine has loaded.

The persisted state (a small JSON document at ``registry_uri``, local or any fsspec URL) is the
truth shared by replicas; each replica keeps its own engine residency (LRU over
``max_cpu_loras``) and re-reads the document when its ``revision`` moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from . import metrics
from .adapter_sources import materialize
from .adapter_validation import AdapterInvalid, BaseModelShapes, check_name, validate_adapter
from .atomic import write_atomic
from .config import Settings

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

logger = logging.getLogger(__name__)


class AdapterError(Exception):
    """A client-visible failure, rendered in the OpenAI error shape."""

    def __init__(
        self, status: int, message: str, err_type: str = "BadRequestError", param: str = "model"
    ):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


class VersionRecord(BaseModel):
    version: str
    source: str
    lora_int_id: int
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    registered_at: float


class AliasRecord(BaseModel):
    version: str
    canary_version: str | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)


class AdapterRecord(BaseModel):
    name: str
    versions: dict[str, VersionRecord] = Field(default_factory=dict)
    alias: AliasRecord
    pinned: bool = False


class RegistryState(BaseModel):
    revision: int = 0
    next_lora_id: int = 1
    adapters: dict[str, AdapterRecord] = Field(default_factory=dict)


class RegistryStore:
    """Reads and atomically writes the registry document (temp file + rename when local)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.local = "://" not in uri or uri.startswith("file://")
        self.storage_options = storage_options or {}

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(self.uri, storage_options=self.storage_options)
        return fs, paths[0]

    def load(self) -> RegistryState:
        try:
            if self.local:
                text = Path(self.uri.removeprefix("file://")).read_text()
            else:
                fs, path = self._fs()
                text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return RegistryState()
        return RegistryState.model_validate_json(text)

    def save(self, state: RegistryState) -> None:
        data = state.model_dump_json(indent=2)
        if not self.local:
            fs, path = self._fs()
            fs.pipe_file(path, data.encode())  # one object PUT: readers see old or new
            return
        path = Path(self.uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data.encode())


@dataclass
class Residency:
    """Per-version runtime facts of this replica."""

    path: Path
    loaded_at: float | None = None
    load_seconds: float | None = None
    requests: int = 0
    errors: int = 0
    last_used: float = 0.0
    loading: asyncio.Future[None] | None = field(default=None, repr=False)


class AdapterRegistry:
    """Registers, validates, loads and evicts adapters; resolves the OpenAI ``model`` field."""

    def __init__(
        self,
        settings: Settings,
        base_model_dir: str,
        engine: EngineClient,
        serving_models: OpenAIServingModels,
    ) -> None:
        self.settings = settings
        self.base_name = settings.served_model_name
        self.engine = engine
        self.serving_models = serving_models
        self.shapes = BaseModelShapes.from_checkpoint(base_model_dir)
        self.store = RegistryStore(settings.registry_uri, settings.fsspec_storage_options)
        self.state = RegistryState()
        self.resident: dict[str, Residency] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.broken: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None

    # ----- keys and lookup ---------------------------------------------------------------
    @staticmethod
    def key(name: str, version: str) -> str:
        return f"{name}@{version}"

    def _record(self, name: str) -> AdapterRecord:
        record = self.state.adapters.get(name)
        if record is None:
            raise AdapterError(404, f"adapter {name!r} is not registered", "NotFoundError")
        return record

    def _version(self, name: str, version: str) -> VersionRecord:
        record = self._record(name)
        if version not in record.versions:
            raise AdapterError(404, f"adapter {name!r} has no version {version!r}", "NotFoundError")
        return record.versions[version]

    def resolve(self, model: str) -> str | None:
        """``name@version`` or an alias → the key that serves it; None if not an adapter."""
        if model == self.base_name:
            return None
        name, sep, version = model.partition("@")
        record = self.state.adapters.get(name)
        if record is None:
            return None
        if sep:
            return model if version in record.versions and model in self.resident else None
        alias = record.alias
        chosen = alias.version
        if alias.canary_version and random.random() < alias.canary_weight:
            chosen = alias.canary_version
        key = self.key(name, chosen)
        return key if key in self.resident else None

    # ----- persistence and replicas --------------------------------------------------------
    async def restore(self) -> None:
        """Load the persisted registry and expose every valid version (pinned ones loaded)."""
        state = await asyncio.to_thread(self.store.load)
        async with self._lock:
            await self._apply_state(state)
        if self.settings.registry_poll_s > 0:
            self._sync_task = asyncio.create_task(self._poll())

    async def preload(self, root: Path) -> None:
        """Register the adapters shipped in ``root`` (by directory name) that are not yet known."""
        if not root.is_dir():
            return
        for directory in sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()):
            if directory.name in self.state.adapters:
                continue
            try:
                await self.register(directory.name, str(directory.resolve()))
                logger.info("registered shipped adapter %s", directory.name)
            except AdapterError as exc:
                logger.error("shipped adapter %s not registered: %s", directory.name, exc.message)

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                state = await asyncio.to_thread(self.store.load)
                if state.revision != self.state.revision:
                    async with self._lock:
                        await self._apply_state(state)
                    logger.info("registry changed elsewhere: now at revision %d", state.revision)
            except Exception:
                logger.exception("registry sync failed")

    async def _apply_state(self, state: RegistryState) -> None:
        """Make this replica serve ``state``: expose new versions, drop removed ones."""
        wanted = {
            self.key(rec.name, v.version): (rec, v)
            for rec in state.adapters.values()
            for v in rec.versions.values()
        }
        for key in list(self.resident):
            if key not in wanted:
                await self._forget(key)
        self.state = state
        for key, (rec, ver) in wanted.items():
            if key in self.resident:
                continue
            try:
                path, _ = await self._prepare(rec.name, ver.version, ver.source)
            except AdapterInvalid as exc:
                self.broken[key] = str(exc)
                logger.error("adapter %s cannot be served: %s", key, exc)
                continue
            self._expose(key, ver, path)
        for rec in state.adapters.values():
            if rec.pinned:
                with contextlib.suppress(AdapterError):
                    await self._pin_in_engine(self.key(rec.name, rec.alias.version))

    async def _commit(self, mutate: Any) -> Any:
        """Re-read the shared state, apply ``mutate(state)``, persist it; hold the lock."""
        latest = await asyncio.to_thread(self.store.load)
        if latest.revision != self.state.revision:
            await self._apply_state(latest)
        state = self.state.model_copy(deep=True)
        result = await mutate(state)
        state.revision += 1
        await asyncio.to_thread(self.store.save, state)
        self.state = state
        return result

    # ----- engine exposure -----------------------------------------------------------------
    async def _prepare(self, name: str, version: str, source: str) -> tuple[Path, Any]:
        """Fetch and validate an adapter without touching the engine."""

        def work() -> tuple[Path, Any]:
            got = materialize(
                source,
                name=name,
                version=version,
                roots=self.settings.adapter_roots,
                cache_dir=self.settings.adapter_cache_dir,
                storage_options=self.settings.fsspec_storage_options,
            )
            info = validate_adapter(got.path, self.shapes, self.settings.max_lora_rank)
            return got.path, info

        return await asyncio.to_thread(work)

    def _lora_request(self, key: str, ver: VersionRecord, path: Path) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=key,
            lora_int_id=ver.lora_int_id,
            lora_path=str(path),
            base_model_name=self.base_name,
        )

    def _expose(self, key: str, ver: VersionRecord, path: Path) -> None:
        """Make vLLM's serving layer know ``key`` (weights load just in time)."""
        self.serving_models.lora_requests[key] = self._lora_request(key, ver, path)
        self.resident[key] = Residency(path=path)
        self.broken.pop(key, None)

    async def _forget(self, key: str) -> None:
        lora = self.serving_models.lora_requests.pop(key, None)
        self.resident.pop(key, None)
        self.broken.pop(key, None)
        if key in self.lru:
            self.lru.pop(key)
            metrics.RESIDENT.labels(*metrics.split_key(key)).set(0)
        if lora is not None:
            with contextlib.suppress(Exception):
                await self.engine.remove_lora(lora.lora_int_id)

    async def ensure_loaded(self, key: str) -> None:
        """Load ``key`` into the engine if needed; concurrent callers share one load."""
        res = self.resident.get(key)
        if res is None:
            raise AdapterError(404, f"model {key!r} is not servable", "NotFoundError")
        res.last_used = time.time()
        if key in self.lru:
            self.lru.move_to_end(key)
            return
        if res.loading is None:
            res.loading = asyncio.ensure_future(self._load(key, res))
        try:
            await asyncio.shield(res.loading)
        finally:
            if res.loading is not None and res.loading.done():
                res.loading = None

    async def _load(self, key: str, res: Residency) -> None:
        await self._make_room()
        lora = self.serving_models.lora_requests[key]
        started = time.perf_counter()
        try:
            await self.engine.add_lora(lora)
        except Exception as exc:
            raise AdapterError(
                503, f"adapter {key!r} failed to load: {exc}", "ServiceUnavailableError"
            ) from exc
        res.load_seconds = time.perf_counter() - started
        res.loaded_at = time.time()
        self.lru[key] = None
        labels = metrics.split_key(key)
        metrics.LOAD_SECONDS.labels(*labels).observe(res.load_seconds)
        metrics.RESIDENT.labels(*labels).set(1)
        logger.info("loaded adapter %s in %.3fs", key, res.load_seconds)

    def _pinned_keys(self) -> set[str]:
        return {self.key(r.name, r.alias.version) for r in self.state.adapters.values() if r.pinned}

    async def _make_room(self) -> None:
        pinned = self._pinned_keys()
        while len(self.lru) >= self.settings.max_cpu_loras:
            victim = next((k for k in self.lru if k not in pinned), None)
            if victim is None:
                raise AdapterError(
                    503, "every adapter slot is pinned; unpin one", "ServiceUnavailableError"
                )
            await self._evict(victim)
            metrics.EVICTIONS.labels(*metrics.split_key(victim)).inc()

    async def _evict(self, key: str) -> None:
        self.lru.pop(key, None)
        lora = self.serving_models.lora_requests.get(key)
        if lora is not None:
            await self.engine.remove_lora(lora.lora_int_id)
        res = self.resident.get(key)
        if res is not None:
            res.loaded_at = None
        metrics.RESIDENT.labels(*metrics.split_key(key)).set(0)
        logger.info("evicted adapter %s", key)

    async def _pin_in_engine(self, key: str) -> None:
        await self.ensure_loaded(key)
        await self.engine.pin_lora(self.serving_models.lora_requests[key].lora_int_id)

    # ----- mutations -----------------------------------------------------------------------
    async def register(
        self,
        name: str,
        source: str,
        version: str | None = None,
        promote: bool = True,
        load: bool = False,
    ) -> dict[str, Any]:
        """Validate and add a version; point the alias at it when ``promote``."""
        try:
            check_name(name)
            if version is not None:
                check_name(version, "version")
        except AdapterInvalid as exc:
            raise AdapterError(400, str(exc), param="lora_name") from None
        if name == self.base_name:
            raise AdapterError(400, f"{name!r} is the base model's name", param="lora_name")
        if not isinstance(source, str) or not source.strip():
            raise AdapterError(400, "source (lora_path) must be a non-empty string", param="source")

        async with self._lock:
            existing = self.state.adapters.get(name)
            if existing is not None:
                same = [v for v in existing.versions.values() if v.source == source]
                if version is None and same:
                    version = same[-1].version  # re-registering the same source: no new version
                if version in existing.versions and existing.versions[version].source != source:
                    raise AdapterError(
                        409, f"{name}@{version} exists with another source", "ConflictError"
                    )
            if version is None:
                count = len(existing.versions) if existing else 0
                taken = set(existing.versions) if existing else set()
                version = next(
                    f"v{i}" for i in range(count + 1, count + 1000) if f"v{i}" not in taken
                )
            key = self.key(name, version)
            created = existing is None or version not in existing.versions
            if created:
                try:
                    path, info = await self._prepare(name, version, source)
                except AdapterInvalid as exc:
                    raise AdapterError(
                        400, f"adapter {key!r} rejected: {exc}", param="source"
                    ) from None

            async def mutate(state: RegistryState) -> None:
                record = state.adapters.get(name)
                if created:
                    ver = VersionRecord(
                        version=version,
                        source=source,
                        lora_int_id=state.next_lora_id,
                        rank=info.rank,
                        alpha=info.alpha,
                        target_modules=info.target_modules,
                        size_bytes=info.size_bytes,
                        registered_at=time.time(),
                    )
                    state.next_lora_id += 1
                    if record is None:
                        record = AdapterRecord(name=name, alias=AliasRecord(version=version))
                        state.adapters[name] = record
                    record.versions[version] = ver
                    self._expose(key, ver, path)
                if promote and record.alias.version != version:
                    record.alias = AliasRecord(version=version)

            await self._commit(mutate)
        if load:
            await self.ensure_loaded(key)
        return {"name": name, "version": version, "created": created, **self.describe(name)}

    async def delete(self, name: str, version: str | None = None) -> None:
        async with self._lock:
            record = self._record(name)
            if version is not None:
                self._version(name, version)
                if record.alias.version == version and len(record.versions) > 1:
                    raise AdapterError(
                        409,
                        f"{name}@{version} is the alias target; point the alias elsewhere first",
                        "ConflictError",
                    )
            keys = [self.key(name, v) for v in ([version] if version else record.versions)]

            async def mutate(state: RegistryState) -> None:
                rec = state.adapters[name]
                if version is None or len(rec.versions) == 1:
                    del state.adapters[name]
                else:
                    del rec.versions[version]
                    if rec.alias.canary_version == version:
                        rec.alias = AliasRecord(version=rec.alias.version)

            await self._commit(mutate)
            for key in keys:
                await self._forget(key)

    async def set_alias(
        self, name: str, version: str, canary_version: str | None = None, canary_weight: float = 0
    ) -> dict[str, Any]:
        async with self._lock:
            self._version(name, version)
            if canary_version is not None:
                self._version(name, canary_version)
            if not 0 <= canary_weight <= 1:
                raise AdapterError(
                    400, "canary_weight must be within [0, 1]", param="canary_weight"
                )
            alias = AliasRecord(
                version=version,
                canary_version=canary_version,
                canary_weight=canary_weight if canary_version else 0.0,
            )

            async def mutate(state: RegistryState) -> None:
                state.adapters[name].alias = alias

            await self._commit(mutate)
        return self.describe(name)

    async def set_pinned(self, name: str, pinned: bool) -> dict[str, Any]:
        async with self._lock:
            record = self._record(name)
            if pinned and not record.pinned:
                limit = self.settings.max_loras - 1
                if len(self._pinned_keys()) >= limit:
                    raise AdapterError(
                        409, f"at most {limit} adapters may be pinned (max_loras - 1)",
                        "ConflictError",
                    )  # fmt: skip

            async def mutate(state: RegistryState) -> None:
                state.adapters[name].pinned = pinned

            await self._commit(mutate)
        key = self.key(name, record.alias.version)
        if pinned:
            await self._pin_in_engine(key)
        elif key in self.lru:
            await self._evict(key)  # the engine keeps pins until the adapter is removed
        return self.describe(name)

    async def unload(self, key: str) -> None:
        """Evict from the engine but keep registered (it loads again on the next request)."""
        if key not in self.resident:
            raise AdapterError(404, f"{key!r} is not registered", "NotFoundError")
        if key in self.lru:
            await self._evict(key)

    # ----- observation ---------------------------------------------------------------------
    def record_request(self, key: str, ok: bool) -> None:
        res = self.resident.get(key)
        labels = metrics.split_key(key)
        metrics.REQUESTS.labels(*labels).inc()
        if res is not None:
            res.requests += 1
        if not ok:
            metrics.ERRORS.labels(*labels).inc()
            if res is not None:
                res.errors += 1

    def describe(self, name: str) -> dict[str, Any]:
        record = self._record(name)
        pinned = self._pinned_keys()
        versions = []
        for ver in record.versions.values():
            key = self.key(name, ver.version)
            res = self.resident.get(key)
            if key in self.broken:
                status = "broken"
            elif key in pinned:
                status = "pinned"
            elif key in self.lru:
                status = "loaded"
            else:
                status = "registered"
            versions.append(
                {
                    **ver.model_dump(),
                    "id": key,
                    "status": status,
                    "error": self.broken.get(key),
                    "loaded_at": res.loaded_at if res else None,
                    "load_seconds": res.load_seconds if res else None,
                    "requests": res.requests if res else 0,
                    "errors": res.errors if res else 0,
                    "last_used": res.last_used if res else None,
                }
            )
        return {
            "name": name,
            "alias": record.alias.model_dump(),
            "pinned": record.pinned,
            "versions": versions,
        }

    def listing(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in sorted(self.state.adapters)]

    def servable_names(self) -> list[tuple[str, str]]:
        """(model id, key it serves) for every alias and version, for ``/v1/models``."""
        names = []
        for record in self.state.adapters.values():
            alias_key = self.key(record.name, record.alias.version)
            if alias_key in self.resident:
                names.append((record.name, alias_key))
            names += [
                (self.key(record.name, v), self.key(record.name, v))
                for v in record.versions
                if self.key(record.name, v) in self.resident
            ]
        return names


def dumps_error(status: int, message: str, err_type: str, param: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    ).encode()
