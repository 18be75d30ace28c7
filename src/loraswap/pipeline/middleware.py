"""ASGI middleware: the pipeline in front of the inference routes vLLM's own router serves."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import ApiError, EngineUnavailable, send_http
from ..routes import INFERENCE_ROUTES
from .admission import Admission
from .requests import RequestPipeline

MAX_BODY_BYTES = 64 << 20  # reading stops with a 413 past this


class PipelineMiddleware:
    """Runs the pipeline in front of vLLM's own OpenAI routes (they take a raw JSON body).

    The body is read, admitted (limits, adapter resolution and load), re-serialised with the
    resolved ``model`` and replayed to vLLM; the response status is recorded per adapter.
    """

    def __init__(
        self,
        app: Any,
        pipeline_of: Callable[[], RequestPipeline | None],
        unavailable: Callable[[], str] = lambda: "the engine is still starting",
    ) -> None:
        self.app = app
        self.pipeline_of = pipeline_of
        self.unavailable = unavailable

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = INFERENCE_ROUTES.get(scope.get("path", ""))
        if scope["type"] != "http" or scope["method"] != "POST" or route is None:
            await self.app(scope, receive, send)
            return
        if not route.vllm:
            await self.app(scope, receive, send)
            return
        pipeline = self.pipeline_of()
        if pipeline is None:
            await send_http(send, EngineUnavailable(self.unavailable()))
            return

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                await send_http(send, ApiError(413, "request body too large"))
                return
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            payload = None  # vLLM answers malformed JSON itself
        admission = Admission(None)
        header = route.adapter_header.encode() if route.adapter_header else None
        named = next((v for k, v in scope["headers"] if header and k.lower() == header), None)
        if isinstance(payload, dict):
            if named is not None:  # the route's adapter header names the model
                payload["model"] = named.decode("latin-1")
            try:
                admission = await pipeline.admit(route.path, payload)
            except ApiError as exc:
                await send_http(send, exc)
                return
            body = json.dumps(payload).encode()
            drop = {b"content-length", header}
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
            headers.append((b"content-length", str(len(body)).encode()))
            if header and admission.key is not None:
                headers.append((header, str(admission.key).encode()))
            scope = {**scope, "headers": headers}

        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # disconnects still reach vLLM, which aborts the request

        status = 500

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        pipeline.interactive += 1
        try:
            await self.app(scope, replay, watch)
        finally:
            pipeline.interactive -= 1
            pipeline.finish(admission, ok=status < 400)
