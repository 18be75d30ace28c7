"""The one request pipeline every inference entry goes through.

OpenAI routes served by vLLM's router (through :class:`PipelineMiddleware`), native HTTP and
WebSocket requests, and Batch API lines all call :meth:`RequestPipeline.admit`: it applies every
limit, resolves ``model`` (alias, canary, ``name@version``) to the adapter version that serves it,
loads that adapter just in time and rewrites ``model`` so vLLM serves exactly that version. The
engine-side limits (prompt length) and token accounting sit in one wrapper around the engine's
``generate`` (:func:`guard_engine`), which sees the exact token counts.

Modules, each importing only those before it: ``inputs`` (body repairs, output bound),
``admission`` (checks, adapter slot and load, tenant limits), ``vllm_calls`` (vLLM's serving
layer), ``engine_guard`` (the ``generate`` wrapper), ``requests`` (:class:`RequestPipeline`),
``middleware`` (:class:`PipelineMiddleware`).
"""

from ..engine_runs import CAPTURE, SOURCE, EngineRun
from .admission import Admission, AdmissionControl
from .engine_guard import guard_engine, guarded_generate
from .inputs import check_input, check_token_limits, validation_message
from .middleware import MAX_BODY_BYTES, PipelineMiddleware
from .requests import RequestPipeline
from .vllm_calls import VllmHandlers, call_vllm

__all__ = [
    "CAPTURE",
    "MAX_BODY_BYTES",
    "SOURCE",
    "Admission",
    "AdmissionControl",
    "EngineRun",
    "PipelineMiddleware",
    "RequestPipeline",
    "VllmHandlers",
    "call_vllm",
    "check_input",
    "check_token_limits",
    "guard_engine",
    "guarded_generate",
    "validation_message",
]
