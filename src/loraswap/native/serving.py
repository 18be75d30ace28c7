"""Native generation through the request pipeline and vLLM's own OpenAI serving layer.

A native request becomes an OpenAI chat or completion body and runs through
:class:`~loraswap.pipeline.RequestPipeline` (limits, adapter routing, metrics) and vLLM's handlers
(chat templates, sampling checks, context checks, errors); this module only reshapes the result
and re-frames the stream as one JSON event per delta.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pydantic

from ..errors import ApiError
from ..pipeline import RequestPipeline, validation_message
from .protocol import (
    Choice,
    CompareResponse,
    CompareResult,
    ErrorResult,
    GenerateRequest,
    GenerateResponse,
    Usage,
)


def parse(item: Any) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(item)
    except pydantic.ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def endpoint_of(req: GenerateRequest) -> str:
    return "/v1/chat/completions" if req.messages is not None else "/v1/completions"


class NativeServing:
    def __init__(self, pipeline: RequestPipeline) -> None:
        self.pipeline = pipeline

    def body_of(self, req: GenerateRequest) -> dict[str, Any]:
        """The OpenAI body, the base model standing in for an absent ``model``."""
        body = req.openai_body()
        body.setdefault("model", self.pipeline.settings.served_model_name)
        return body

    async def generate(self, req: GenerateRequest, raw: Any = None) -> GenerateResponse:
        result = await self.pipeline.run(endpoint_of(req), self.body_of(req), raw)
        choices = [
            Choice(
                index=c.index,
                text=(c.message.content or "") if hasattr(c, "message") else c.text,
                finish_reason=c.finish_reason,
            )
            for c in result.choices
        ]
        usage = result.usage
        return GenerateResponse(
            text=choices[0].text,
            model=result.model,
            finish_reason=choices[0].finish_reason,
            usage=Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens or 0,
                total_tokens=usage.total_tokens,
            ),
            choices=choices,
        )

    async def stream(self, req: GenerateRequest, raw: Any = None) -> AsyncIterator[dict]:
        """Delta events ``{text, index, model, finish_reason}``, then ``{done, usage}``; a
        failure after the start is an ``{error}`` event. Errors before the start raise.

        Closing this generator closes vLLM's, which aborts the engine request.
        """
        chunks = await self.pipeline.stream(endpoint_of(req), self.body_of(req), raw)
        return _deltas(chunks)

    async def compare(self, req: GenerateRequest, raw: Any = None) -> CompareResponse:
        """Every listed model answers the same input, at once (the engine batches them); one
        model's error stays in its result. All failing (a bad input): that error is raised."""
        models = req.compared or []

        async def one(model: str) -> GenerateResponse | ApiError:
            try:
                return await self.generate(req.for_model(model), raw)
            except ApiError as exc:
                return exc

        answers = await asyncio.gather(*(one(m) for m in models))
        if all(isinstance(a, ApiError) for a in answers):
            raise answers[0]
        return CompareResponse(results=[
            CompareResult(requested_model=m, result=(
                ErrorResult.model_validate(a.body()) if isinstance(a, ApiError) else a))
            for m, a in zip(models, answers, strict=True)
        ])  # fmt: skip

    async def compare_stream(self, req: GenerateRequest, raw: Any = None) -> AsyncIterator[dict]:
        """The listed models' streams merged as they come, each event tagged with
        ``requested_model``; a model that fails yields its error event, the others go on. All
        failing before the start: the first error is raised."""
        models = req.compared or []

        async def start(model: str) -> AsyncIterator[dict] | ApiError:
            try:
                return await self.stream(req.for_model(model), raw)
            except ApiError as exc:
                return exc

        streams = await asyncio.gather(*(start(m) for m in models))
        if all(isinstance(s, ApiError) for s in streams):
            raise streams[0]
        return _merged(list(zip(models, streams, strict=True)))


async def _deltas(chunks: Any) -> AsyncIterator[dict]:
    finish: dict[int, str | None] = {}
    try:
        async for chunk in chunks:
            if "error" in chunk:
                yield {"error": chunk["error"]}
                return
            for choice in chunk.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content") or ""
                finish[choice["index"]] = choice.get("finish_reason")
                if text or choice.get("finish_reason"):
                    yield {
                        "text": text,
                        "index": choice["index"],
                        "model": chunk["model"],
                        "finish_reason": choice.get("finish_reason"),
                    }
            if chunk.get("usage"):
                yield {
                    "done": True,
                    "model": chunk["model"],
                    "finish_reason": finish.get(0),
                    "usage": chunk["usage"],
                }
    finally:
        await chunks.aclose()


async def _merged(streams: list[tuple[str, AsyncIterator[dict] | ApiError]]) -> AsyncIterator[dict]:
    queue: asyncio.Queue[dict | None] = asyncio.Queue()

    async def pump(model: str, events: AsyncIterator[dict]) -> None:
        try:
            async for event in events:
                await queue.put({"requested_model": model, **event})
        except ApiError as exc:
            await queue.put({"requested_model": model, **exc.body()})
        finally:
            await events.aclose()
            await queue.put(None)

    tasks = []
    try:
        for model, events in streams:
            if isinstance(events, ApiError):
                yield {"requested_model": model, **events.body()}
            else:
                tasks.append(asyncio.create_task(pump(model, events)))
        running = len(tasks)
        while running:
            event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield event
    finally:
        for task in tasks:
            task.cancel()  # a client gone: each model's stream closes, aborting its request
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
