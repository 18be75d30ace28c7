"""What the engine did for one request, and the request context the engine wrapper reads.

Below the pipeline, metrics and shadows, which all use these, so none of them imports another
for them.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class EngineRun:
    """What the engine did for one request, filled as it runs and finishes."""

    lora_name: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None  # None until the engine finished
    text: str | None = None  # the first choice's text, kept only for captured runs


# Set for a request whose answer is wanted (a shadowed request and its shadow): the engine
# wrapper fills this run, text included. Unset (the usual case), no text is kept.
CAPTURE: ContextVar[EngineRun | None] = ContextVar("loraswap_capture", default=None)
# Whose traffic the engine is serving: "api" (a client), "batch" (a Batch API line: its tokens
# count against the owner's daily batch budget) or "shadow" (the operator's evaluation).
SOURCE: ContextVar[str] = ContextVar("loraswap_source", default="api")
