"""The route table: every route the service serves, on purpose, and the rules each one follows.

Access control (keys, in-flight limit), the request pipeline (model resolution, limits, default
output bound, accounting) and the mounting of vLLM's routers all read this table. vLLM's routers
are filtered through it: a route vLLM adds in an upgrade is not served until it is listed here
(the start log names what was left out), and the README's route table is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# user: any key; admin: a global admin key or a tenant's admin key (scoped to its adapters and
# usage); operator: global admin keys only (tenants and their keys); metrics: the metrics token or
# a key that sees every adapter, where keys are set (access.py).
Access = Literal["open", "health", "metrics", "user", "admin", "operator"]


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    access: Access
    summary: str
    # Inference only: fields of the JSON body that ask for output tokens (the first one gets
    # the default bound when the client sets none); empty for routes that generate nothing.
    token_fields: tuple[str, ...] = ()
    inference: bool = False
    # Served by vLLM's own router (the pipeline middleware rewrites its body first).
    vllm: bool = False
    # A header that names the adapter instead of the body's ``model`` (SageMaker's).
    adapter_header: str | None = None

    @property
    def generates(self) -> bool:
        return bool(self.token_fields)


def _inference(
    path: str, summary: str, fields: tuple[str, ...] = (), vllm: bool = True, **kw: str
) -> Route:
    return Route(path, ("POST",), "user", summary, fields, inference=True, vllm=vllm, **kw)


CHAT_FIELDS = ("max_tokens", "max_completion_tokens")
NATIVE_FIELDS = ("max_tokens",)

ROUTES: tuple[Route, ...] = (
    # OpenAI-, Anthropic- and SageMaker-compatible inference, served by vLLM's handlers
    _inference("/v1/chat/completions", "OpenAI chat", CHAT_FIELDS),
    _inference("/v1/completions", "OpenAI completions", ("max_tokens",)),
    _inference("/v1/responses", "OpenAI Responses (stateless)", ("max_output_tokens",)),
    _inference("/v1/messages", "Anthropic Messages", ("max_tokens",)),
    _inference("/v1/messages/count_tokens", "Anthropic token count"),
    _inference(
        "/invocations",
        "SageMaker: a chat or completion body",
        CHAT_FIELDS,
        adapter_header="x-amzn-sagemaker-adapter-identifier",
    ),
    _inference("/tokenize", "vLLM tokenizer"),
    _inference("/detokenize", "vLLM detokenizer"),
    # native inference (loraswap's handlers call the pipeline)
    _inference("/generate", "one prompt or chat", NATIVE_FIELDS, vllm=False),
    _inference("/generate_stream", "the same as Server-Sent Events", NATIVE_FIELDS, vllm=False),
    _inference("/generate_batch", "many at once, results in order", NATIVE_FIELDS, vllm=False),
    _inference("/ws/generate", "WebSocket: many streams, cancel by id", NATIVE_FIELDS, vllm=False),
    # models, batches, files, server facts
    Route("/v1/models", ("GET",), "user", "base model, adapter aliases and versions"),
    Route("/v1/models/{model_id}", ("GET",), "user", "one of them (404 like an unknown model)"),
    Route("/v1/files", ("GET", "POST"), "user", "Batch API input and output files"),
    Route("/v1/files/{file_id}", ("GET", "DELETE"), "user", "one file"),
    Route("/v1/files/{file_id}/content", ("GET",), "user", "a file's bytes"),
    Route("/v1/batches", ("GET", "POST"), "user", "OpenAI Batch API jobs"),
    Route("/v1/batches/{batch_id}", ("GET",), "user", "one job"),
    Route("/v1/batches/{batch_id}/cancel", ("POST",), "user", "cancel a job"),
    Route("/info", ("GET",), "user", "the key's models; machine, settings and why: global admins"),
    Route("/version", ("GET",), "user", "vLLM's version", vllm=True),
    # adapter management
    Route("/admin/adapters", ("GET", "POST"), "admin", "list, register"),
    Route("/admin/adapters/{name}", ("GET", "DELETE"), "admin", "show, delete"),
    Route("/admin/adapters/{name}/alias", ("PUT",), "admin", "alias, canary and shadow"),
    Route("/admin/adapters/{name}/pin", ("POST",), "admin", "keep loaded"),
    Route("/admin/adapters/{name}/unpin", ("POST",), "admin", "allow eviction"),
    Route("/admin/adapters/{name}/promote", ("POST",), "admin", "shadow or canary becomes target"),
    Route("/admin/adapters/{name}/rollback", ("POST",), "admin", "undo the last retarget"),
    Route("/admin/adapters/{name}/versions/{version}", ("DELETE",), "admin", "delete a version"),
    Route("/admin/adapters/{name}/versions/{version}/load", ("POST",), "admin", "load now"),
    Route("/admin/adapters/{name}/versions/{version}/unload", ("POST",), "admin", "evict now"),
    Route("/admin/audit", ("GET",), "admin", "registry changes: who, when, what"),
    Route("/admin/comparisons", ("GET",), "admin", "shadow vs primary answers, per pair"),
    Route("/admin/traffic", ("GET",), "admin", "runs, tokens, latency per served model"),
    Route("/v1/load_lora_adapter", ("POST",), "admin", "vLLM-compatible register + load"),
    Route("/v1/unload_lora_adapter", ("POST",), "admin", "vLLM-compatible delete"),
    # tenants, keys, usage
    Route("/admin/tenants", ("GET", "POST"), "operator", "list, create tenants"),
    Route("/admin/tenants/{name}", ("GET", "PATCH", "DELETE"), "operator", "show, change, delete"),
    Route("/admin/tenants/{name}/keys", ("POST",), "operator", "new key (shown once)"),
    Route("/admin/tenants/{name}/keys/{key_id}", ("DELETE",), "operator", "revoke a key"),
    Route("/admin/usage", ("GET",), "admin", "requests and tokens per tenant and model"),
    # health, metrics, docs
    Route("/livez", ("GET",), "health", "BentoML liveness"),
    Route("/readyz", ("GET",), "health", "BentoML readiness (engine healthy)"),
    Route("/healthz", ("GET",), "health", "BentoML health"),
    Route("/health", ("GET",), "health", "vLLM health", vllm=True),
    Route("/ping", ("GET", "POST"), "health", "SageMaker health", vllm=True),
    Route("/metrics", ("GET",), "metrics", "Prometheus (BentoML, vLLM, loraswap series)"),
    Route("/metrics/{token}", ("GET",), "metrics", "the same, the metrics token in the path"),
    Route("/console", ("GET",), "open", "operator console (data needs a key where keys are set)"),
    Route("/console/{name}", ("GET",), "open", "the console's script and style"),
    Route("/docs", ("GET",), "open", "Swagger UI"),
    Route("/docs.json", ("GET",), "open", "OpenAPI document"),
    Route("/", ("GET",), "open", "BentoML index"),
    Route("/v1/docs", ("GET",), "open", "Swagger UI of the OpenAI app"),
    Route("/v1/openapi.json", ("GET",), "open", "OpenAPI document of the OpenAI app"),
)
BY_PATH: dict[str, Route] = {r.path: r for r in ROUTES}
INFERENCE_ROUTES: dict[str, Route] = {r.path: r for r in ROUTES if r.inference}
# vLLM router paths served: everything else vLLM registers is removed at start.
VLLM_PATHS: frozenset[str] = frozenset(r.path for r in ROUTES if r.vllm)
# Batch lines run as one of these endpoints.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ADMIN_PREFIXES = ("/admin/", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def inference_route(path: str) -> Route | None:
    return INFERENCE_ROUTES.get(path)


def access_of(path: str) -> Access:
    """Who may call ``path``: templated routes by prefix, anything unlisted needs a user key."""
    route = BY_PATH.get(path)
    if route is not None:
        return route.access
    if path.startswith("/admin/tenants"):
        return "operator"
    if path.startswith("/console/"):
        return "open"  # static assets only: the console's data comes from keyed routes
    if path.startswith(ADMIN_PREFIXES) or path == "/admin":
        return "admin"
    return "user"


def markdown_table() -> str:
    """The README's route table."""
    rows = ["| Route | Methods | Access | What | Output bound |", "| --- | --- | --- | --- | --- |"]
    for r in ROUTES:
        bound = ", ".join(f"`{f}`" for f in r.token_fields) or ""
        rows.append(f"| `{r.path}` | {', '.join(r.methods)} | {r.access} | {r.summary} | {bound} |")
    return "\n".join(rows)
