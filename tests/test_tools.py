"""OpenAI tool calling and structured output through the real server and the ``openai`` SDK.

The default model gets loraswap's tool-aware chat template and vLLM's ``hermes`` parser; with
``tool_strict_level=parameter`` the arguments of forced calls follow the function's schema.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import BASE_MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def ask(client, model: str = BASE_MODEL, **kwargs):
    return client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=64, temperature=0, **kwargs
    )


def streamed_calls(stream) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """(content, {index: {name, arguments}}, finish_reason) from a streamed chat."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    return content, calls, finish


def assert_valid_call(name: str, arguments: str, expected: str | None = None) -> None:
    assert name in SCHEMAS and (expected is None or name == expected), name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("model", [BASE_MODEL, "uppercase"])
def test_required_and_named_tool_choice_give_schema_valid_calls(client, model):
    reply = ask(client, model, tool_choice="required")
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].finish_reason == "tool_calls", reply
    for call in calls:
        assert call.id and call.type == "function"
        assert_valid_call(call.function.name, call.function.arguments)
    reply = ask(client, model, tool_choice=NAMED)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1, reply
    assert_valid_call(calls[0].function.name, calls[0].function.arguments, "get_time")


def test_streamed_tool_calls(client):
    for choice, expected in (("required", None), (NAMED, "get_time")):
        _, calls, finish = streamed_calls(ask(client, tool_choice=choice, stream=True))
        assert calls and finish in ("tool_calls", "stop"), (choice, calls, finish)
        for call in calls.values():
            assert_valid_call(call["name"], call["arguments"], expected)


def test_auto_and_none_tool_choice(client):
    """``auto`` (the SDK's default with tools) answers 200 with text or valid calls; a 135M
    model mostly answers in text. ``none`` never calls."""
    for stream in (False, True):
        for choice in ("auto", None):
            extra = {} if choice is None else {"tool_choice": choice}
            if stream:
                content, calls, _ = streamed_calls(ask(client, stream=True, **extra))
                calls = [(c["name"], c["arguments"]) for c in calls.values()]
            else:
                message = ask(client, **extra).choices[0].message
                content = message.content
                calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            assert content or calls
            for name, arguments in calls:
                assert_valid_call(name, arguments)
    message = ask(client, tool_choice="none").choices[0].message
    assert message.content and not message.tool_calls


def test_tool_result_turn(client):
    """A client sends the call and its result back; the template renders both."""
    call = ask(client, tool_choice=NAMED).choices[0].message
    messages = [
        *ASK,
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "14:05"},
    ]
    reply = client.chat.completions.create(
        model=BASE_MODEL, messages=messages, tools=[WEATHER, TIME], max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls


def test_responses_api_function_call(client):
    tool = {"type": "function", **WEATHER["function"]}
    reply = client.responses.create(
        model=BASE_MODEL, input="Weather in Paris?", tools=[tool], tool_choice="required",
        max_output_tokens=64,
    )  # fmt: skip
    calls = [item for item in reply.output if item.type == "function_call"]
    assert calls, reply.output
    assert_valid_call(calls[0].name, calls[0].arguments, "get_weather")


def test_response_format_json_schema(client):
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=BASE_MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}],
        max_tokens=128,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": person},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), person)
