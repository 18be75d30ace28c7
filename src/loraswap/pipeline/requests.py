"""The request pipeline the native, batch and shadow entries call: admit, run through vLLM,
finish, streaming or not, counting the client requests in flight (shadows and batch lines
beyond their floor wait for none)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..engine_runs import SOURCE, EngineRun
from ..errors import ApiError
from .admission import Admission, AdmissionControl
from .engine_guard import record_run
from .vllm_calls import VllmHandlers, call_vllm, sse_events

if TYPE_CHECKING:
    from ..adapters.resolver import AdapterResolver
    from ..tenants import Tenancy


class RequestPipeline(AdmissionControl):
    """Admission (see :class:`AdmissionControl`) and the vLLM serving objects it hands
    admitted requests to; ``handlers`` None until the engine is attached (then 503)."""

    def __init__(
        self,
        settings: Settings,
        registry: AdapterResolver | None = None,
        handlers: VllmHandlers | None = None,
        tenancy: Tenancy | None = None,
    ) -> None:
        super().__init__(settings, registry, tenancy)
        self.handlers = handlers
        self.interactive = 0  # requests in flight from clients (not batch lines)

    async def call_vllm(self, path: str, body: dict[str, Any], raw: Any) -> Any:
        if self.handlers is None:
            raise ApiError.engine_starting()
        return await call_vllm(self.handlers, path, body, raw)

    def engine_done(self, run: EngineRun) -> None:
        """Count a finished engine run as :func:`~.engine_guard.guard_engine` does."""
        record_run(run, self.settings, self.tenancy)

    async def run(
        self, path: str, body: dict[str, Any], raw: Any = None, background: bool = False
    ) -> Any:
        """Admit and run one non-streaming OpenAI request; vLLM's response object.
        ``background`` work (batch lines) does not count as interactive traffic."""
        self.interactive += not background
        source = SOURCE.set("batch" if background else "api")
        try:
            admission = await self.admit(path, body, background)
            try:
                result = await self.call_vllm(path, body, raw)
            except ApiError:
                self.finish(admission, ok=False)
                raise
            self.finish(admission, ok=True)
            return result
        finally:
            SOURCE.reset(source)
            self.interactive -= not background

    async def stream(
        self, path: str, body: dict[str, Any], raw: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Admit and stream one OpenAI request: vLLM's SSE chunks as dicts.

        Errors before the first chunk raise :class:`ApiError`; a later failure is yielded as an
        ``{"error": ...}`` chunk. Closing the iterator aborts the engine request.
        """
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.interactive += 1  # from admission on, as the other entries count it
        try:
            admission = await self.admit(path, body)
            try:
                chunks = await self.call_vllm(path, body, raw)
            except ApiError:
                self.finish(admission, ok=False)
                raise
        except BaseException:
            self.interactive -= 1
            raise
        return self._frames(admission, chunks)

    async def _frames(self, admission: Admission, chunks: Any) -> AsyncIterator[dict[str, Any]]:
        ok = True
        try:
            async for block in chunks:
                for chunk in sse_events(block):
                    if "error" in chunk:
                        ok = False
                    yield chunk
        finally:
            self.interactive -= 1
            await chunks.aclose()
            self.finish(admission, ok)
