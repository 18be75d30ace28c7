"""The OpenAI route, through the real server and the real ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import BASE_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client: OpenAI, **kwargs):
    params = {"model": BASE_MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 32}
    return client.chat.completions.create(**{**params, **kwargs})


def test_models_lists_the_base_model(client: OpenAI):
    models = client.models.list().data
    assert BASE_MODEL in [m.id for m in models]


def test_models_retrieve(client: OpenAI):
    """The SDK's ``models.retrieve``: the same entry as in the list, 404 for unknown ids."""
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL
    adapter = client.models.retrieve("uppercase@v1")
    assert adapter.id == "uppercase@v1" and adapter.model_extra["parent"] == BASE_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_answers_with_the_real_model(client: OpenAI):
    resp = chat(client)
    assert "Paris" in resp.choices[0].message.content
    assert resp.model == BASE_MODEL
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0


def test_stream_equals_non_stream_at_temperature_zero(client: OpenAI):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = chat(client, messages=messages, max_tokens=48).choices[0].message.content
    chunks = list(
        chat(client, messages=messages, max_tokens=48, stream=True,
             stream_options={"include_usage": True})
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert len([c for c in chunks if c.choices]) > 2, "expected several deltas"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert not chunks[-1].choices


def test_completions(client: OpenAI):
    resp = client.completions.create(
        model=BASE_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in resp.choices[0].text
    assert resp.usage.completion_tokens <= 8


def test_streamed_completions_report_usage(client: OpenAI):
    chunks = list(
        client.completions.create(
            model=BASE_MODEL, prompt="One, two, three,", max_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 10


def test_max_tokens_is_respected(client: OpenAI):
    resp = chat(client, messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=5)  # fmt: skip
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_unknown_model_is_404(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="no-such-model")
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.body["message"]


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": -1},
        {"temperature": -1},
        {"top_p": 2},
        {"n": 0},
        {"max_tokens": 10_000},
    ],
)
def test_bad_sampling_values_are_400(client: OpenAI, params):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, **params)
    assert err.value.status_code == 400


def test_prompt_over_the_context_is_400(client: OpenAI):
    long_prompt = "hello " * 4000
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": long_prompt}])
    assert "context" in str(err.value).lower() or "length" in str(err.value).lower()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE_MODEL, prompt=long_prompt, max_tokens=4)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model": "smollm2-135m-instruct", "messages": "hi"}',
        b'{"model": "smollm2-135m-instruct", "messages": [], "max_tokens": 4}',
        b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}],'
        b' "temperature": "hot"}',
        b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
        b"[]",
    ],
)
def test_malformed_requests_are_4xx_in_openai_shape(server, body):
    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["code"] == resp.status_code


def test_server_still_answers_after_bad_input(client: OpenAI, server):
    for body in (b"{", b'{"model": "x"}'):
        httpx.post(f"{server.url}/v1/completions", content=body, timeout=30)
    assert "Paris" in chat(client).choices[0].message.content
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
