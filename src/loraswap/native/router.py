"""Native routes: `/generate`, `/generate_stream` (SSE), `/generate_batch`, `/ws/generate`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from ..errors import ApiError
from ..runtime import runtime_of
from .protocol import (
    BatchRequest,
    BatchResponse,
    CompareResponse,
    ErrorResult,
    GenerateRequest,
    GenerateResponse,
)
from .serving import NativeServing, parse

ERRORS = {code: {"model": ErrorResult} for code in (400, 401, 404, 429, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def serving(conn: Request | WebSocket) -> NativeServing:
    return NativeServing(runtime_of(conn).pipeline)


def sse(payload: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n"


router = APIRouter(tags=["Native"])


@router.post("/generate", response_model=GenerateResponse | CompareResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request):
    """Generate text for one prompt or chat; returns ``{text, model, finish_reason, usage}``.
    With a list of models: ``{object: "compare", results: [{requested_model, result}]}``."""
    if body.compared:
        return await serving(request).compare(body, request)
    return await serving(request).generate(body, request)


@router.post(
    "/generate_stream",
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def generate_stream(body: GenerateRequest, request: Request):
    """Server-Sent Events: ``data: {text, index, model, finish_reason}`` per delta, then
    ``data: {done: true, usage}`` and ``data: [DONE]``; a later failure is an ``error`` event.
    With a list of models, every event carries ``requested_model`` (deltas interleave; one
    ``done`` or ``error`` per model), then ``data: [DONE]``."""
    if body.compared:
        merged = await serving(request).compare_stream(body, request)

        async def compared() -> AsyncIterator[str]:
            try:
                async for event in merged:
                    yield sse(event, "error" if "error" in event else None)
                yield "data: [DONE]\n\n"
            finally:
                await merged.aclose()

        return StreamingResponse(compared(), media_type="text/event-stream", headers=SSE_HEADERS)
    events = await serving(request).stream(body, request)
    try:
        first = await anext(events)  # errors before the first byte are plain 4xx
    except StopAsyncIteration:
        first = None
    if first is not None and "error" in first:
        await events.aclose()
        raise ApiError.from_body(first)

    async def frames() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield sse(first)
                async for event in events:
                    yield sse(event, "error" if "error" in event else None)
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield sse(exc.body(), "error")
        finally:
            await events.aclose()

    return StreamingResponse(frames(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/generate_batch", response_model=BatchResponse, responses=ERRORS)
async def generate_batch(body: BatchRequest, request: Request):
    """Run every request at once (the engine batches them); one item's failure stays in its
    slot. Results come back in input order."""
    runtime = runtime_of(request)
    limit = runtime.settings.max_batch_size
    if len(body.requests) > limit:
        raise ApiError(
            400, f"a batch holds at most {limit} requests, got {len(body.requests)}",
            param="requests",
        )  # fmt: skip
    native = NativeServing(runtime.pipeline)

    async def one(item: Any) -> GenerateResponse | ErrorResult:
        try:
            req = parse(item)
            if req.compared:
                raise ApiError(400, "a list of models (compare) is for /generate, "
                               "/generate_stream and /ws/generate", param="model")  # fmt: skip
            return await native.generate(req)
        except ApiError as exc:
            return ErrorResult.model_validate(exc.body())

    return BatchResponse(results=list(await asyncio.gather(*(one(i) for i in body.requests))))


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket) -> None:
    """Send ``{id, ...GenerateRequest}`` (several at once); receive ``{id, text, ...}`` deltas and
    ``{id, done: true, usage}``; send ``{cancel: id}`` to stop one. With a list of models, events
    carry ``requested_model`` and the end is ``{id, done: true, models}``."""
    await ws.accept()
    tasks: dict[str, asyncio.Task[None]] = {}
    lock = asyncio.Lock()

    async def send(message: dict) -> None:
        async with lock:
            await ws.send_json(message)

    async def run(rid: str, req: GenerateRequest) -> None:
        try:
            if req.compared:  # tagged per model, then one final done without requested_model
                async for event in await serving(ws).compare_stream(req):
                    await send({"id": rid, **event})
                await send({"id": rid, "done": True, "models": req.compared})
                return
            async for event in await serving(ws).stream(req):
                await send({"id": rid, **event})
        except ApiError as exc:
            await send({"id": rid, **exc.body()})
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await send({"id": rid, "cancelled": True, "done": True})
            raise
        finally:
            tasks.pop(rid, None)

    async def reject(rid: Any, message: str) -> None:
        await send({"id": rid, **ApiError(400, message).body()})

    try:
        while True:
            try:
                message = json.loads(await ws.receive_text())
            except ValueError:
                await reject(None, "each message must be a JSON object")
                continue
            if not isinstance(message, dict):
                await reject(None, "each message must be a JSON object")
                continue
            if "cancel" in message:
                task = tasks.get(str(message["cancel"]))
                if task is None:
                    await reject(message["cancel"], "no running request with that id")
                else:
                    task.cancel()
                continue
            rid = message.pop("id", None)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                await reject(rid, "every request needs an `id` (string or integer)")
                continue
            rid = str(rid)
            if rid in tasks:
                await reject(rid, "a request with this id is still running")
                continue
            try:
                req = GenerateRequest.model_validate(message)
            except ValueError as exc:
                await reject(rid, str(exc))
                continue
            tasks[rid] = asyncio.create_task(run(rid, req))
    except WebSocketDisconnect:
        pass
    finally:
        for task in list(tasks.values()):
            task.cancel()  # aborts the engine requests of a client that went away
        await asyncio.gather(*tasks.values(), return_exceptions=True)
