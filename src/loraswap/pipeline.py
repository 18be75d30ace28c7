"""The one request pipeline every inference entry goes through.

OpenAI routes served by vLLM's router (through :class:`PipelineMiddleware`), native HTTP and
WebSocket requests, and Batch API lines all call :meth:`RequestPipeline.admit`: it applies every
limit, resolves ``model`` (alias, canary, ``name@version``) to the adapter version that serves it,
loads that adapter just in time and rewrites ``model`` so vLLM serves exactly that version. The
engine-side limits (prompt length) and token accounting sit in one wrapper around the engine's
``generate`` (:meth:`RequestPipeline.guard_engine`), which sees the exact token counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pydantic

from . import metrics, vllm_compat
from .adapters.keys import AdapterKey
from .config import Settings
from .errors import ApiError, EngineUnavailable, send_http
from .routes import INFERENCE_ROUTES, Route
from .tenants import Principal, current

if TYPE_CHECKING:
    from .adapters.slots import SlotGate
    from .shadows.runner import ShadowJob, ShadowRunner
    from .tenants import Tenancy

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

MAX_BODY_BYTES = 64 << 20
TEXT_PARTS = frozenset({"input_text", "output_text"})
# "batch" while a Batch API line runs: its tokens count against the owner's daily batch budget.
SOURCE: ContextVar[str] = ContextVar("loraswap_source", default="api")


class AdapterResolver(Protocol):
    """What the pipeline needs of the adapter registry."""

    def resolve(self, model: str) -> AdapterKey | None: ...

    async def ensure_loaded(self, key: AdapterKey) -> None: ...

    def record_request(self, key: AdapterKey, ok: bool) -> None: ...

    def shadow_of(self, model: str) -> AdapterKey | None: ...

    @property
    def slots(self) -> SlotGate: ...


@dataclass
class Admission:
    """An admitted request: the name vLLM serves it under and the adapter version, if any."""

    model: Any
    key: AdapterKey | None = None
    principal: Principal | None = field(default=None, repr=False)
    limited: bool = False  # counted by the tenant limiter: release it at finish
    shadow: ShadowJob | None = field(default=None, repr=False)  # queued once this one answered


@dataclass
class VllmHandlers:
    """vLLM's OpenAI serving objects (built by ``init_app_state``) the pipeline calls."""

    chat: Any
    completion: Any
    models: Any


def validation_message(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )


class RequestPipeline:
    def __init__(
        self,
        settings: Settings,
        registry: AdapterResolver | None = None,
        handlers: VllmHandlers | None = None,
        tenancy: Tenancy | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.handlers = handlers
        self.tenancy = tenancy
        self.shadows: ShadowRunner | None = None
        self.interactive = 0  # requests in flight from clients (not batch lines)

    # ----- admission -----------------------------------------------------------------------
    @staticmethod
    def check_input(route: Route, body: dict[str, Any]) -> None:
        """Inputs vLLM 0.32 answers with a 500 instead of a 400 (found by fuzzing): refused,
        or rewritten into the form vLLM handles."""
        if route.path == "/v1/responses" and isinstance(body.get("input"), list):
            for i, item in enumerate(body["input"]):
                if not isinstance(item, dict):
                    continue
                if item.get("type") == "message" and not item.get("content"):
                    raise ApiError(400, f"input[{i}] is a message without content", param="input")
                # Items echoed back in their output form (with id/status) are parsed by vLLM 0.32
                # into typed objects its chat parser then fails on (500s: an assert, a missing
                # attribute). Those fields mean nothing for generation: drop them, so vLLM reads
                # the item as the input form it handles.
                if item.get("type") in ("message", "function_call_output"):
                    item.pop("id", None)
                    item.pop("status", None)
                # A function_call_output's list output: text parts only (others hit the same
                # assert). A string output always works.
                output = item.get("output") if item.get("type") == "function_call_output" else None
                if isinstance(output, list) and any(
                    not isinstance(p, dict) or p.get("type") not in TEXT_PARTS for p in output
                ):
                    raise ApiError(
                        400, f"input[{i}].output: a function_call_output's output is a string "
                        "or a list of input_text parts", param="input",
                    )  # fmt: skip
                content = item.get("content")
                for j, part in enumerate(content if isinstance(content, list) else []):
                    if isinstance(part, dict) and part.get("type") == "refusal":
                        # vLLM reads an echoed refusal as text it lacks (a 500): it is text
                        content[j] = {"type": "output_text", "text": str(part.get("refusal", ""))}
                    if isinstance(part, dict) and part.get("type") == "input_file":
                        raise ApiError(
                            400, f"input[{i}].content[{j}]: input_file parts are not supported",
                            param="input",
                        )  # fmt: skip

    def check_limits(self, route: Route, body: dict[str, Any]) -> None:
        """The hard output limit, and the default bound when the client asks for none."""
        if route.token_fields and all(body.get(f) is None for f in route.token_fields):
            default = self.settings.default_max_tokens
            if default is not None:
                body[route.token_fields[0]] = default
        limit = self.settings.max_tokens_limit
        if limit is None:
            return
        for name in route.token_fields:
            asked = body.get(name)
            if isinstance(asked, int) and not isinstance(asked, bool) and asked > limit:
                raise ApiError(
                    400, f"{name} is {asked}; this server allows at most {limit}", param=name
                )

    def check_access(self, principal: Principal, model: Any, key: AdapterKey | None) -> None:
        """A tenant uses only its adapters (and the base model if allowed); anything else is
        the same 404 as a model that does not exist, so nothing leaks."""
        if principal.tenant is None:
            return
        if key is not None:
            allowed = principal.may_use_adapter(key.name)
        else:
            allowed = model in (None, self.settings.served_model_name) and principal.may_use_base()
        if not allowed:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")

    def check_batch_budget(self, principal: Principal) -> None:
        tenant = principal.tenant
        cap = tenant.limits.batch_tokens_per_day if tenant is not None else None
        if cap is None or self.tenancy is None:
            return
        used = self.tenancy.usage.batch_tokens_today(tenant.name)
        if used >= cap:
            raise ApiError(
                429, f"tenant {tenant.name!r} used its {cap} batch tokens for today (UTC)",
                headers={"retry-after": "3600"},
            )  # fmt: skip

    async def admit(self, path: str, body: dict[str, Any], background: bool = False) -> Admission:
        """Check ``body`` for ``path``: limits, who may use its ``model``, the tenant's limits;
        resolve and load its adapter, rewrite its ``model``. Every admission is finished."""
        route = INFERENCE_ROUTES[path]
        self.check_input(route, body)
        self.check_limits(route, body)
        principal = current()
        model = body.get("model")
        key = None
        if self.registry is not None and isinstance(model, str):
            key = self.registry.resolve(model)
        self.check_access(principal, model, key)
        if background:
            self.check_batch_budget(principal)
        shadow = None
        if key is not None:
            if not background:
                shadow = self.shadow_of(route.path, body, model, key, principal)
            try:
                await self.registry.slots.acquire(key, background)
            except ApiError:
                self.registry.record_request(key, ok=False)
                raise
        try:
            if key is not None:
                try:
                    await self.registry.ensure_loaded(key)
                except ApiError:
                    self.registry.record_request(key, ok=False)
                    raise
                body["model"] = model = str(key)
            limited = False
            if not background and self.tenancy is not None:
                limited = await self.tenancy.limiter.acquire(principal)
        except BaseException:
            if key is not None:
                self.registry.slots.release(key)
            raise
        if shadow is not None:
            CAPTURE.set(shadow.primary_run)  # the engine fills in the primary's answer
        if not background and self.shadows is not None:
            self.shadows.yield_to_client()  # shadows use idle capacity only
        return Admission(model, key, principal, limited, shadow)

    def shadow_of(
        self, path: str, body: dict[str, Any], model: str, key: AdapterKey, principal: Principal
    ) -> ShadowJob | None:
        """The shadow job of a request to an alias with a shadow version (sampled)."""
        if self.shadows is None:
            return None
        shadow_key = self.registry.shadow_of(model)
        if shadow_key is None:
            return None
        from .shadows.runner import shadow_job

        return shadow_job(path, body, key, shadow_key, principal)

    def finish(self, admission: Admission, ok: bool) -> None:
        if admission.shadow is not None and ok and self.shadows is not None:
            self.shadows.submit(admission.shadow)
        if admission.key is not None and self.registry is not None:
            self.registry.slots.release(admission.key)
            self.registry.record_request(admission.key, ok)
        if admission.limited and self.tenancy is not None:
            self.tenancy.limiter.release_soon(admission.principal)  # in a task if it must wait

    # ----- running through vLLM's serving layer --------------------------------------------
    async def call_vllm(self, path: str, body: dict[str, Any], raw: Any) -> Any:
        if self.handlers is None:
            raise ApiError.engine_starting()
        try:
            if path == "/v1/chat/completions":
                request = vllm_compat.ChatCompletionRequest.model_validate(body)
                result = await self.handlers.chat.create_chat_completion(request, raw)
            elif path == "/v1/completions":
                request = vllm_compat.CompletionRequest.model_validate(body)
                result = await self.handlers.completion.create_completion(request, raw)
            else:
                raise ApiError(400, f"unsupported endpoint {path!r}", param="url")
        except pydantic.ValidationError as exc:
            raise ApiError(400, validation_message(exc)) from None
        except vllm_compat.EngineDeadError:
            raise EngineUnavailable() from None
        except (vllm_compat.VLLMError, ValueError, TypeError, OverflowError) as exc:
            result = vllm_compat.create_error_response(exc)  # vLLM's own mapping to codes
        if isinstance(result, vllm_compat.ErrorResponse):
            if result.error.code >= 500 and getattr(self.handlers.chat.engine_client, "errored", 0):
                raise EngineUnavailable()
            raise ApiError.from_body(result.model_dump())
        return result

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
                for line in block.splitlines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        ok = False
                    yield chunk
        finally:
            self.interactive -= 1
            await chunks.aclose()
            self.finish(admission, ok)

    # ----- the engine side -----------------------------------------------------------------
    def guard_engine(self, client: EngineClient) -> None:
        """Wrap ``client.generate`` once: refuse over-long prompts, count tokens."""
        client.generate = guarded_generate(
            client.generate, self.settings.max_prompt_tokens, self.engine_done
        )

    def engine_done(self, run: EngineRun) -> None:
        """The engine finished a request (in the request's context): count its tokens and time
        for its model, its tenant's usage and token-per-minute budget (shadow runs are the
        operator's evaluation, not the tenant's traffic: usage only)."""
        prompt, completion = run.prompt_tokens, run.completion_tokens
        model = run.lora_name or self.settings.served_model_name
        if run.lora_name is not None:
            metrics.record_tokens(run.lora_name, prompt, completion)
        source = SOURCE.get()
        if source != "shadow":
            metrics.TRAFFIC.record(model, run)
        if self.tenancy is not None:
            principal = current()
            self.tenancy.usage.record(principal.name, model, prompt, completion, source)
            if source != "shadow":
                self.tenancy.limiter.add_tokens_soon(principal, prompt + completion)


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


def guarded_generate(
    generate: Callable[..., AsyncIterator[Any]],
    max_prompt_tokens: int | None,
    on_done: Callable[[EngineRun], None],
) -> Callable[..., AsyncIterator[Any]]:
    """``EngineClient.generate`` with the prompt-length limit, token counts and timings
    (``lora_name`` None for the base model), and the answer's text when captured.

    Every route reaches the engine through ``generate``, so this covers them all; the limit's
    error is vLLM's own validation error, which its serving layer answers with a 400.
    """

    async def guarded(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        prompt = args[0] if args else kwargs.get("prompt")
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if max_prompt_tokens is not None and ids is not None and len(ids) > max_prompt_tokens:
            raise vllm_compat.VLLMValidationError(
                f"the prompt has {len(ids)} tokens; this server accepts at most "
                f"{max_prompt_tokens} (LORASWAP_MAX_PROMPT_TOKENS)",
                parameter="input_tokens",
                value=len(ids),
            )
        lora = kwargs.get("lora_request")
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        kind = getattr(params, "output_kind", None)
        delta = kind == vllm_compat.RequestOutputKind.DELTA
        streamed = kind != vllm_compat.RequestOutputKind.FINAL_ONLY  # else no first-token time
        captured = CAPTURE.get()
        run = captured if captured is not None else EngineRun()
        run.lora_name = lora.lora_name if lora is not None else None
        start = time.perf_counter()
        text = ""
        try:
            async for output in generate(*args, **kwargs):
                if output.prompt_token_ids is not None:
                    run.prompt_tokens = len(output.prompt_token_ids)
                produced = sum(len(o.token_ids) for o in output.outputs)
                if run.ttft_s is None and produced and streamed:
                    run.ttft_s = time.perf_counter() - start
                run.completion_tokens = run.completion_tokens + produced if delta else produced
                if captured is not None:
                    first = next((o for o in output.outputs if o.index == 0), None)
                    if first is not None:
                        text = text + first.text if delta else first.text
                yield output
            run.latency_s = time.perf_counter() - start
        finally:
            if captured is not None:
                run.text = text
            on_done(run)

    return guarded


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
