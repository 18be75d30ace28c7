"""Calls into vLLM's OpenAI serving layer for an admitted request, with vLLM's failures mapped
to our errors: a dead engine is a 503, anything else vLLM's own status and body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydantic

from .. import vllm_compat
from ..errors import ApiError, EngineUnavailable
from .inputs import validation_message


@dataclass
class VllmHandlers:
    """vLLM's OpenAI serving objects (built by ``init_app_state``) the pipeline calls."""

    chat: Any
    completion: Any
    models: Any


async def call_vllm(handlers: VllmHandlers, path: str, body: dict[str, Any], raw: Any) -> Any:
    """vLLM's response object for ``body`` (an async iterator of SSE blocks when it streams)."""
    try:
        if path == "/v1/chat/completions":
            request = vllm_compat.ChatCompletionRequest.model_validate(body)
            result = await handlers.chat.create_chat_completion(request, raw)
        elif path == "/v1/completions":
            request = vllm_compat.CompletionRequest.model_validate(body)
            result = await handlers.completion.create_completion(request, raw)
        else:
            raise ApiError(400, f"unsupported endpoint {path!r}", param="url")
    except pydantic.ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None
    except vllm_compat.EngineDeadError:
        raise EngineUnavailable() from None
    except (vllm_compat.VLLMError, ValueError, TypeError, OverflowError) as exc:
        result = vllm_compat.create_error_response(exc)  # vLLM's own mapping to codes
    if isinstance(result, vllm_compat.ErrorResponse):
        if result.error.code >= 500 and getattr(handlers.chat.engine_client, "errored", 0):
            raise EngineUnavailable()
        raise ApiError.from_body(result.model_dump())
    return result


def sse_events(block: str) -> Iterator[dict[str, Any]]:
    """The JSON events in one block of vLLM's SSE stream (its ``[DONE]`` left out)."""
    for line in block.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data != "[DONE]":
            yield json.loads(data)
