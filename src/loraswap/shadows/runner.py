"""Shadow requests: a sampled share of an alias's requests also runs on its shadow version.

The pipeline decides at admission (the alias's shadow rate) and captures the primary's answer
from the engine; once the primary has answered the client, its shadow job is queued here.
Shadows run on idle capacity only: a worker starts one once no client request has been in flight
for ``IDLE_GRACE_S`` (so the gaps of a busy client do not count as idle), and a client request
arriving aborts the running shadows (the engine drops them at once) and puts them back in the
queue, up to ``MAX_TRIES`` starts. So a shadow never shares the engine's batch
with client traffic and never touches a response; a full queue drops the sample (counted).
Both answers are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import metrics
from ..adapters.keys import AdapterKey
from ..engine_runs import CAPTURE, SOURCE, EngineRun
from ..errors import ApiError, raise_if_cancelling
from ..tenants import CURRENT, Principal
from .store import Comparison, ComparisonStore

if TYPE_CHECKING:
    from ..adapters.resolver import AdapterResolver

logger = logging.getLogger(__name__)
SHADOWED_ROUTES = ("/v1/chat/completions", "/v1/completions")
PROMPT_CHARS = 4000
MAX_TRIES = 3  # starts of one shadow job, each aborted by client traffic, before it is dropped
IDLE_POLL_S = 0.02
IDLE_GRACE_S = 0.2


class ShadowHost(Protocol):
    """What shadow runs need of :class:`~loraswap.pipeline.RequestPipeline` (which queues
    them, so this module does not import it)."""

    interactive: int  # client requests in flight: shadows wait for none
    registry: AdapterResolver | None  # set wherever shadows run (adapters on)

    async def call_vllm(self, path: str, body: dict[str, Any], raw: Any) -> Any: ...


@dataclass
class ShadowJob:
    path: str
    body: dict[str, Any]  # the request as the client sent it, ``model`` set to the shadow
    primary: AdapterKey
    shadow: AdapterKey
    principal: Principal
    primary_run: EngineRun = field(default_factory=EngineRun)
    tries: int = 0


def shadow_job(
    path: str, body: dict[str, Any], primary: AdapterKey, shadow: AdapterKey, who: Principal
) -> ShadowJob | None:
    """The shadow of one request, or None for requests that are not shadowed: other routes,
    several prompts in one request."""
    if path not in SHADOWED_ROUTES or shadow == primary:
        return None
    if path == "/v1/completions" and not isinstance(body.get("prompt"), str):
        return None
    twin = copy.deepcopy(body)
    twin["model"] = str(shadow)
    twin["stream"] = False
    twin.pop("stream_options", None)
    return ShadowJob(path, twin, primary, shadow, who)


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt as readable text (chat: one ``role: content`` line per message)."""
    if "messages" in body:
        lines = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else m
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            lines.append(f"{m.get('role', '?') if isinstance(m, dict) else '?'}: {content}")
        text = "\n".join(lines)
    else:
        text = str(body.get("prompt", ""))
    return text[:PROMPT_CHARS]


class ShadowRunner:
    def __init__(
        self, pipeline: ShadowHost, store: ComparisonStore, concurrency: int, queue_size: int
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(queue_size)
        self.running: set[asyncio.Task[None]] = set()
        self.closing = False
        self.workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    def submit(self, job: ShadowJob) -> None:
        """Queue a job whose primary answered completely; drop it when the queue is full."""
        if job.primary_run.latency_s is None or job.primary_run.text is None:
            return  # the primary was cut short (client gone, engine error): nothing to compare
        try:
            self.queue.put_nowait(job)
            metrics.SHADOW_PENDING.inc()
        except asyncio.QueueFull:
            metrics.SHADOW_RUNS.labels("dropped").inc()

    def yield_to_client(self) -> None:
        """A client request is being admitted: abort the running shadows (they run again later)."""
        for task in self.running:
            task.cancel()

    async def _idle(self) -> None:
        quiet_since = time.monotonic()
        while True:
            if self.pipeline.interactive > 0:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= IDLE_GRACE_S:
                return
            await asyncio.sleep(IDLE_POLL_S)

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            await self._idle()
            job.tries += 1
            task = asyncio.create_task(self.run(job))
            self.running.add(task)
            try:
                await task
            except asyncio.CancelledError:
                if self.closing:
                    raise
                self._retry(job)
            except Exception as exc:  # one job's failure never stops the worker
                logger.error("shadow run of %s failed: %s", job.shadow, exc)
            finally:
                self.running.discard(task)
                metrics.SHADOW_PENDING.dec()

    def _retry(self, job: ShadowJob) -> None:
        if job.tries >= MAX_TRIES:
            metrics.SHADOW_RUNS.labels("preempted").inc()
            return
        try:
            self.queue.put_nowait(job)
            metrics.SHADOW_PENDING.inc()
        except asyncio.QueueFull:
            metrics.SHADOW_RUNS.labels("dropped").inc()

    async def run(self, job: ShadowJob) -> None:
        shadow_run = EngineRun()
        tokens = (CAPTURE.set(shadow_run), SOURCE.set("shadow"), CURRENT.set(job.principal))
        error = None
        registry = self.pipeline.registry
        try:
            await registry.slots.acquire(job.shadow, background=True)
            try:
                await registry.ensure_loaded(job.shadow)
                await self.pipeline.call_vllm(job.path, job.body, None)
            finally:
                registry.slots.release(job.shadow)
            registry.record_request(job.shadow, ok=True)
        except ApiError as exc:
            raise_if_cancelling()  # aborted for a client: a preemption, not the shadow's failure
            error = exc.message
            registry.record_request(job.shadow, ok=False)
        finally:
            CURRENT.reset(tokens[2])
            SOURCE.reset(tokens[1])
            CAPTURE.reset(tokens[0])
        metrics.SHADOW_RUNS.labels("failed" if error else "done").inc()
        p = job.primary_run
        comparison = Comparison(
            tenant=job.principal.name, adapter=job.primary.name,
            primary_version=job.primary.version, shadow_version=job.shadow.version,
            route=job.path, prompt=prompt_text(job.body),
            primary_text=p.text or "", shadow_text=None if error else shadow_run.text,
            primary_tokens=p.completion_tokens,
            shadow_tokens=None if error else shadow_run.completion_tokens,
            primary_latency_s=p.latency_s, shadow_latency_s=shadow_run.latency_s,
            primary_ttft_s=p.ttft_s, shadow_ttft_s=shadow_run.ttft_s, shadow_error=error,
        )  # fmt: skip
        await asyncio.to_thread(self.store.add, comparison)

    async def close(self) -> None:
        self.closing = True
        for task in self.workers:
            task.cancel()
        for task in self.workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
