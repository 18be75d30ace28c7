"""The request pipeline without an engine: limits, model resolution and accounting, for every
inference route of the route table, and its ASGI middleware in front of a stand-in vLLM app."""

from __future__ import annotations

import asyncio
import json

import pytest

from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.slots import SlotGate
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.pipeline import PipelineMiddleware, RequestPipeline, check_input
from loraswap.routes import BATCH_ENDPOINTS, INFERENCE_ROUTES

KEY = AdapterKey("sql", "v2")


class FakeRegistry:
    def __init__(self, fail_load: bool = False) -> None:
        self.loaded: list[AdapterKey] = []
        self.records: list[tuple[AdapterKey, bool]] = []
        self.fail_load = fail_load
        self.slots = SlotGate(lambda: 8, 1.0, set)

    def resolve(self, model: str) -> AdapterKey | None:
        return KEY if model in ("sql", "sql@v2") else None

    async def ensure_loaded(self, key: AdapterKey) -> None:
        if self.fail_load:
            raise ApiError(503, "failed to load")
        self.loaded.append(key)

    def record_request(self, key: AdapterKey, ok: bool) -> None:
        self.records.append((key, ok))


def pipeline(limit: int | None = 16, **kw) -> tuple[RequestPipeline, FakeRegistry]:
    registry = FakeRegistry(**kw)
    settings = Settings(max_tokens_limit=limit, default_max_tokens=None)
    return RequestPipeline(settings, registry), registry


LIMITED = [(path, field) for path, r in INFERENCE_ROUTES.items() for field in r.token_fields]


NOT_GENERATING = {"/tokenize", "/detokenize", "/v1/messages/count_tokens"}


def test_every_generating_route_has_a_token_limit():
    for path, route in INFERENCE_ROUTES.items():
        assert bool(route.token_fields) == (path not in NOT_GENERATING), path
    assert set(BATCH_ENDPOINTS) <= set(INFERENCE_ROUTES)


@pytest.mark.parametrize("path", sorted(set(INFERENCE_ROUTES) - NOT_GENERATING))
def test_default_output_bound_when_the_client_sets_none(path):
    route = INFERENCE_ROUTES[path]
    pipe = RequestPipeline(Settings(default_max_tokens=77, max_tokens_limit=None))
    body = {"model": "base"}
    asyncio.run(pipe.admit(path, body))
    assert body[route.token_fields[0]] == 77
    asked = {"model": "base", route.token_fields[-1]: 5}
    asyncio.run(pipe.admit(path, asked))
    assert asked == {"model": "base", route.token_fields[-1]: 5}  # the client's own wins


def test_no_default_bound_leaves_the_body_alone():
    pipe = RequestPipeline(Settings(default_max_tokens=None))
    body = {"model": "base"}
    asyncio.run(pipe.admit("/v1/chat/completions", body))
    assert body == {"model": "base"}


@pytest.mark.parametrize(("path", "field"), LIMITED)
def test_over_limit_is_400_on_every_route(path, field):
    pipe, registry = pipeline(limit=16)
    with pytest.raises(ApiError) as err:
        asyncio.run(pipe.admit(path, {"model": "sql", field: 200}))
    assert err.value.status == 400 and err.value.param == field
    assert registry.loaded == []  # refused before any adapter load
    asyncio.run(pipe.admit(path, {"model": "sql", field: 16}))


def test_adapter_is_resolved_loaded_and_rewritten():
    pipe, registry = pipeline()
    body = {"model": "sql", "max_tokens": 4}
    admission = asyncio.run(pipe.admit("/v1/chat/completions", body))
    assert body["model"] == "sql@v2" and admission.key == KEY and registry.loaded == [KEY]
    pipe.finish(admission, ok=True)
    assert registry.records == [(KEY, True)]


def test_base_and_unknown_models_pass_through_untouched():
    pipe, registry = pipeline()
    for model in ("base", "no-such-model", 42):
        body = {"model": model}
        admission = asyncio.run(pipe.admit("/v1/completions", body))
        assert body["model"] == model and admission.key is None
        pipe.finish(admission, ok=False)
    assert registry.records == []


def test_failed_load_is_counted_as_an_error():
    pipe, registry = pipeline(fail_load=True)
    with pytest.raises(ApiError):
        asyncio.run(pipe.admit("/generate", {"model": "sql"}))
    assert registry.records == [(KEY, False)]
    assert not registry.slots.in_flight  # the slot it waited for is free again


def test_an_admitted_adapter_request_holds_its_slot_until_finished():
    pipe, registry = pipeline()

    async def scenario():
        admission = await pipe.admit("/generate", {"model": "sql"})
        assert registry.slots.in_flight == {KEY: 1}
        pipe.finish(admission, ok=True)
        assert not registry.slots.in_flight

    asyncio.run(scenario())


def test_no_limit_configured_lets_any_value_through():
    pipe, _ = pipeline(limit=None)
    asyncio.run(pipe.admit("/v1/chat/completions", {"model": "x", "max_tokens": 10**6}))


async def _call(app, path: str, payload: bytes):
    """Drive an ASGI app with one POST; the status and the JSON body it answered."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def echo_app(scope, receive, send):
    """Stands in for vLLM's router: answers with the body it received."""
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_middleware_rewrites_model_for_vllm_routes_and_refuses_over_limit():
    pipe, registry = pipeline(limit=16)
    app = PipelineMiddleware(echo_app, lambda: pipe)
    status, seen = asyncio.run(_call(app, "/v1/responses", b'{"model": "sql"}'))
    assert status == 200 and seen["model"] == "sql@v2"
    assert registry.records == [(KEY, True)]
    status, error = asyncio.run(
        _call(app, "/v1/responses", b'{"model": "sql", "max_output_tokens": 99}')
    )
    assert status == 400 and error["error"]["param"] == "max_output_tokens"


def test_middleware_answers_503_while_the_engine_starts():
    app = PipelineMiddleware(echo_app, lambda: None)
    status, error = asyncio.run(_call(app, "/v1/chat/completions", b"{}"))
    assert status == 503 and error["error"]["type"] == "ServiceUnavailableError"


def test_middleware_leaves_malformed_json_to_vllm():
    pipe, _ = pipeline()
    app = PipelineMiddleware(echo_app, lambda: pipe)
    status, _ = asyncio.run(_call(app, "/v1/completions", b'"just a string"'))
    assert status == 200


def test_middleware_resolves_sagemakers_adapter_header():
    """/invocations names its adapter in a header: resolved like `model`, passed on resolved."""
    pipe, _ = pipeline()
    seen_headers: list = []

    async def app(scope, receive, send):
        seen_headers.extend(scope["headers"])
        await echo_app(scope, receive, send)

    async def call():
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": b'{"model": "x"}', "more_body": False}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        headers = [(b"x-amzn-sagemaker-adapter-identifier", b"sql")]
        scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
        await PipelineMiddleware(app, lambda: pipe)(scope, receive, send)
        return json.loads(sent[1]["body"])

    body = asyncio.run(call())
    assert body["model"] == "sql@v2"
    assert (b"x-amzn-sagemaker-adapter-identifier", b"sql@v2") in seen_headers


def test_responses_message_without_content_is_400():
    """vLLM 0.32 answers it with a 500 (list index out of range); found by the fuzzer."""
    pipe, _ = pipeline()
    body = {"model": "base", "input": [{"type": "message", "role": "assistant", "content": []}]}
    with pytest.raises(ApiError) as err:
        asyncio.run(pipe.admit("/v1/responses", body))
    assert err.value.status == 400 and err.value.param == "input"


@pytest.mark.parametrize(
    "item",
    [
        {"type": "message", "role": "user", "content": []},
        {"type": "message", "role": "user", "content": [{"type": "input_file", "file_id": "x"}]},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]},
    ],
)
def test_responses_inputs_vllm_would_answer_with_a_500_are_400(item):
    """Found by fuzzing: vLLM 0.32 fails these with a 500 (an IndexError, an assert)."""
    with pytest.raises(ApiError) as refused:
        check_input(INFERENCE_ROUTES["/v1/responses"], {"input": [item]})
    assert refused.value.status == 400 and refused.value.param == "input"


def test_text_tool_outputs_and_plain_messages_pass_the_responses_check():
    echoed = {"type": "message", "role": "assistant", "id": "", "status": "completed",
              "content": [{"type": "refusal", "refusal": ""}]}  # fmt: skip
    body = {"input": [echoed]}
    check_input(INFERENCE_ROUTES["/v1/responses"], body)
    assert "id" not in body["input"][0] and "status" not in body["input"][0]
    assert body["input"][0]["content"] == [{"type": "output_text", "text": ""}]
    check_input(INFERENCE_ROUTES["/v1/responses"], {"input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call_output", "call_id": "c", "output": "18 C"},
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_text", "text": "18 C"}]},
    ]})  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("constraints", [235434697, "json", [{"json": {}}]])
def test_structured_outputs_that_is_not_an_object_is_400(path, constraints):
    """Found by fuzzing: vLLM 0.32's validator calls ``.get`` on it (an AttributeError, a 500)."""
    with pytest.raises(ApiError) as refused:
        check_input(INFERENCE_ROUTES[path], {"structured_outputs": constraints})
    assert refused.value.status == 400 and refused.value.param == "structured_outputs"
    check_input(INFERENCE_ROUTES[path], {"structured_outputs": {"choice": ["a", "b"]}})
    check_input(INFERENCE_ROUTES[path], {"structured_outputs": None})
