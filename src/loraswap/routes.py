"""The route table: every inference route the service serves and what the pipeline does to it.

Access control (keys, concurrency) and the request pipeline (model resolution, limits, metrics)
both read this table, so a route is either listed here with its rules or is not inference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceRoute:
    path: str
    # Fields of the JSON body that ask for output tokens (checked against the limit).
    token_fields: tuple[str, ...] = ()
    # Served by vLLM's own router: the pipeline middleware rewrites its body before vLLM sees it.
    # Otherwise the route's handler calls the pipeline itself (native, WebSocket).
    vllm_router: bool = True
    # Counted against the in-flight limit (generation); tokenizer routes are cheap.
    generates: bool = True


INFERENCE_ROUTES: dict[str, InferenceRoute] = {
    r.path: r
    for r in (
        InferenceRoute("/v1/chat/completions", ("max_tokens", "max_completion_tokens")),
        InferenceRoute("/v1/completions", ("max_tokens",)),
        InferenceRoute("/v1/responses", ("max_output_tokens",)),
        InferenceRoute("/tokenize", generates=False),
        InferenceRoute("/detokenize", generates=False),
        InferenceRoute("/generate", ("max_tokens",), vllm_router=False),
        InferenceRoute("/generate_stream", ("max_tokens",), vllm_router=False),
        InferenceRoute("/generate_batch", ("max_tokens",), vllm_router=False),
        InferenceRoute("/ws/generate", ("max_tokens",), vllm_router=False),
    )
}
# Batch lines run as one of these endpoints.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ADMIN_PREFIXES = ("/admin/", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
OPEN_PATHS = ("/docs", "/docs.json", "/v1/docs", "/v1/openapi.json", "/")


def inference_route(path: str) -> InferenceRoute | None:
    return INFERENCE_ROUTES.get(path)
