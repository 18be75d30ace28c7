"""Native generation on top of vLLM's own OpenAI serving layer.

A native request becomes an OpenAI chat or completion request and goes through vLLM's handlers, so
chat templates, sampling-parameter checks, context-length checks and errors are vLLM's; this module
only reshapes the result and re-frames the stream as one JSON event per delta.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import Request

from ..registry import AdapterError, AdapterRegistry
from .protocol import Choice, ErrorBody, ErrorResult, GenerateRequest, GenerateResponse, Usage


class NativeError(Exception):
    """An error to report in the OpenAI error shape."""

    def __init__(self, result: ErrorResult) -> None:
        super().__init__(result.error.message)
        self.result = result

    @classmethod
    def of(cls, status: int, message: str, err_type: str = "BadRequestError", param=None):
        return cls(
            ErrorResult(error=ErrorBody(message=message, type=err_type, param=param, code=status))
        )


def validation_message(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )


class NativeServing:
    """Runs native requests through vLLM's chat/completion handlers on the app's state."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def parse(self, item: Any) -> GenerateRequest:
        try:
            return GenerateRequest.model_validate(item)
        except pydantic.ValidationError as exc:
            raise NativeError.of(400, validation_message(exc)) from None

    async def _route(self, req: GenerateRequest) -> tuple[str, str | None]:
        """Check limits, then map ``model`` to the adapter version serving it (loaded)."""
        limit = self.state.settings.max_tokens_limit
        if limit is not None and req.max_tokens is not None and req.max_tokens > limit:
            raise NativeError.of(
                400, f"max_tokens is {req.max_tokens}; this server allows at most {limit}",
                param="max_tokens",
            )  # fmt: skip
        return await self.route_model(req.model)

    async def route_model(self, model: str) -> tuple[str, str | None]:
        """The name vLLM should see (the adapter version, loaded) and the adapter key."""
        registry: AdapterRegistry | None = getattr(self.state, "registry", None)
        if registry is None:
            return model, None
        key = registry.resolve(model)
        if key is None:
            return model, None
        try:
            await registry.ensure_loaded(key)
        except AdapterError as exc:
            registry.record_request(key, ok=False)
            raise NativeError.of(exc.status, exc.message, exc.err_type, exc.param) from None
        return key, key

    def record(self, key: str | None, ok: bool) -> None:
        if key is not None and self.state.registry is not None:
            self.state.registry.record_request(key, ok)

    async def _call(self, req: GenerateRequest, model: str, stream: bool, raw: Request | None):
        endpoint = "/v1/chat/completions" if req.messages is not None else "/v1/completions"
        return await self.openai(endpoint, req.openai_body(model, stream), raw)

    async def openai(self, endpoint: str, body: dict[str, Any], raw: Request | None = None):
        """Run an OpenAI request body through vLLM's handler for ``endpoint``."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )
        from vllm.exceptions import VLLMError

        try:
            if endpoint == "/v1/chat/completions":
                result = await self.state.openai_serving_chat.create_chat_completion(
                    ChatCompletionRequest.model_validate(body), raw
                )
            elif endpoint == "/v1/completions":
                result = await self.state.openai_serving_completion.create_completion(
                    CompletionRequest.model_validate(body), raw
                )
            else:
                raise NativeError.of(400, f"unsupported endpoint {endpoint!r}", param="url")
        except pydantic.ValidationError as exc:
            raise NativeError.of(400, validation_message(exc)) from None
        except (VLLMError, ValueError, TypeError, OverflowError) as exc:  # vLLM's own checks
            result = create_error_response(exc)  # vLLM's mapping of its errors to codes
        if isinstance(result, ErrorResponse):
            raise NativeError(ErrorResult.model_validate(result.model_dump()))
        return result

    async def generate(self, req: GenerateRequest, raw: Request | None = None) -> GenerateResponse:
        model, key = await self._route(req)
        try:
            result = await self._call(req, model, stream=False, raw=raw)
        except NativeError:
            self.record(key, ok=False)
            raise
        self.record(key, ok=True)
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

    async def stream(self, req: GenerateRequest, raw: Request | None = None) -> AsyncIterator[dict]:
        """Delta events ``{text, index, model, finish_reason}``, then ``{done, usage}``.

        Closing this generator closes vLLM's, which aborts the engine request.
        """
        model, key = await self._route(req)
        try:
            chunks = await self._call(req, model, stream=True, raw=raw)
        except NativeError:
            self.record(key, ok=False)
            raise
        ok = True
        finish: dict[int, str | None] = {}
        try:
            async for line in chunks:
                for data in _sse_data(line):
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        ok = False
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
            self.record(key, ok)


def _sse_data(block: str) -> list[str]:
    """The ``data:`` payloads in one chunk of vLLM's SSE output."""
    return [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
