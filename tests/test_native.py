"""Native endpoints through the real server: /generate, SSE, batch, WebSocket, cancellation."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse
from httpx_ws import connect_ws

from tests.conftest import BASE_MODEL, SHIPPED

CHAT = {
    "model": BASE_MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24,
    "temperature": 0,
}


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kwargs)


def running_requests(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )


def wait_idle(server, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while (value := running_requests(server)) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def test_generate_chat_and_prompt(server):
    resp = post(server, "/generate", CHAT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "Paris" in body["text"] and body["model"] == BASE_MODEL
    assert body["finish_reason"] == "stop" and body["usage"]["completion_tokens"] > 0
    resp = post(server, "/generate", {"model": BASE_MODEL, "prompt": "1, 2, 3,", "max_tokens": 4,
                                      "temperature": 0.8, "seed": 7, "n": 2})  # fmt: skip
    body = resp.json()
    assert resp.status_code == 200 and len(body["choices"]) == 2, body
    assert body["text"] == body["choices"][0]["text"]
    assert 2 <= body["usage"]["completion_tokens"] <= 8


def test_native_routes_default_to_the_base_model(server):
    """``model`` is optional on every native route: absent, the base model answers."""
    bare = {k: v for k, v in CHAT.items() if k != "model"}
    expected = post(server, "/generate", CHAT).json()["text"]
    body = post(server, "/generate", bare).json()
    assert body["model"] == BASE_MODEL and body["text"] == expected, body
    with (
        httpx.Client(timeout=120) as http,
        connect_sse(http, "POST", f"{server.url}/generate_stream", json=bare) as source,
    ):
        events = [json.loads(e.data) for e in source.iter_sse() if e.data != "[DONE]"]
    assert "".join(e.get("text", "") for e in events) == expected
    assert events[0]["model"] == BASE_MODEL and events[-1]["done"]
    results = post(server, "/generate_batch", {"requests": [bare]}).json()["results"]
    assert results[0]["text"] == expected and results[0]["model"] == BASE_MODEL
    ws_url = server.url.replace("http://", "ws://") + "/ws/generate"
    with httpx.Client(timeout=120) as http, connect_ws(ws_url, http) as ws:
        ws.send_json({"id": "bare", **bare})
        events = []
        while not events or not events[-1].get("done"):
            events.append(ws.receive_json(timeout=120))
    assert "".join(e.get("text", "") for e in events) == expected
    schema = httpx.get(f"{server.url}/docs.json", timeout=30).json()["components"]["schemas"]
    assert "model" not in schema["GenerateRequest"].get("required", [])


def test_generate_matches_the_openai_route(server, client):
    native = post(server, "/generate", CHAT).json()["text"]
    openai_text = client.chat.completions.create(**CHAT).choices[0].message.content
    assert native == openai_text


def test_generate_with_an_adapter(server):
    post(server, "/admin/adapters", {"name": "native-up", "source": str(SHIPPED / "uppercase")})
    body = post(server, "/generate", {**CHAT, "model": "native-up"}).json()
    assert body["model"] == "native-up@v1" and body["text"] == body["text"].upper()


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": BASE_MODEL}, 400),
        ({"model": BASE_MODEL, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400),
        ({**CHAT, "temperature": -1}, 400),
        ({**CHAT, "max_tokens": 0}, 400),
        ({**CHAT, "top_p": 0}, 400),
        ({**CHAT, "n": 100}, 400),
        ({**CHAT, "unknown_field": 1}, 400),
        ({**CHAT, "model": "no-such-model"}, 404),
        ({**CHAT, "messages": [{"role": "user", "content": "hello " * 3000}]}, 400),
        ({**CHAT, "messages": []}, 400),
        ("not an object", 400),
    ],
)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_bad_input_is_4xx_in_openai_shape(server, path, body, status):
    resp = post(server, path, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == status


def test_sse_framing_parsed_by_a_real_sse_parser(server):
    whole = post(server, "/generate", CHAT).json()["text"]
    with (
        httpx.Client(timeout=120) as http,
        connect_sse(http, "POST", f"{server.url}/generate_stream", json=CHAT) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["cache-control"] == "no-cache"
        assert source.response.headers["x-accel-buffering"] == "no"
        events = [sse.data for sse in source.iter_sse()]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    deltas = [p for p in payloads if "text" in p]
    assert len(deltas) > 2
    assert "".join(p["text"] for p in deltas) == whole
    final = payloads[-1]
    assert final["done"] and final["usage"]["completion_tokens"] == len(deltas)


def test_batch_runs_all_and_isolates_a_bad_item(server):
    items = [
        CHAT,
        {**CHAT, "model": "no-such-model"},
        {
            "model": BASE_MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0,
        },
        {**CHAT, "temperature": "hot"},
    ]
    resp = post(server, "/generate_batch", {"requests": items})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 4
    assert "Paris" in results[0]["text"]
    assert results[1]["error"]["code"] == 404
    assert "Paris" in results[2]["text"]
    assert results[3]["error"]["code"] == 400
    too_many = post(server, "/generate_batch", {"requests": [CHAT] * 65})
    assert too_many.status_code == 400 and "at most 64" in too_many.json()["error"]["message"]
    assert post(server, "/generate_batch", {"requests": []}).status_code == 400


def test_websocket_two_interleaved_requests_and_a_cancel(server):
    ws_url = server.url.replace("http://", "ws://") + "/ws/generate"
    long_story = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 400,
        "temperature": 0,
    }
    with httpx.Client(timeout=120) as http, connect_ws(ws_url, http) as ws:
        ws.send_json({"id": "a", **CHAT})
        ws.send_json({"id": "b", **long_story})
        ws.send_json({"id": "c", "model": BASE_MODEL})  # invalid: no prompt/messages
        seen: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
        cancelled = False
        while True:
            event = ws.receive_json(timeout=120)
            seen[event["id"]].append(event)
            if len(seen["b"]) == 3 and not cancelled:
                ws.send_json({"cancel": "b"})
                cancelled = True
            a_done = any(e.get("done") for e in seen["a"])
            b_done = any(e.get("cancelled") for e in seen["b"])
            if a_done and b_done and seen["c"]:
                break
    text_a = "".join(e.get("text", "") for e in seen["a"])
    assert "Paris" in text_a and seen["a"][-1]["usage"]["completion_tokens"] > 0
    assert seen["c"][0]["error"]["code"] == 400
    assert sum(1 for e in seen["b"] if "text" in e) < 100, "the cancel stopped generation"
    assert wait_idle(server) == 0


LONG = {
    "model": BASE_MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
    "max_tokens": 1500,
    "temperature": 0,
}


def test_disconnects_abort_engine_requests(server):
    # SSE: read a few events then drop the connection.
    with (
        httpx.Client(timeout=120) as http,
        connect_sse(http, "POST", f"{server.url}/generate_stream", json=LONG) as source,
    ):
        for i, _ in enumerate(source.iter_sse()):
            if i == 3:
                break
    assert wait_idle(server) == 0
    # OpenAI streaming route.
    with (
        httpx.Client(timeout=120) as http,
        http.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}
        ) as resp,
    ):
        for i, _ in enumerate(resp.iter_lines()):
            if i == 6:
                break
    assert wait_idle(server) == 0
    # WebSocket: close mid-generation.
    ws_url = server.url.replace("http://", "ws://") + "/ws/generate"
    with httpx.Client(timeout=120) as http, connect_ws(ws_url, http) as ws:
        ws.send_json({"id": 1, **LONG})
        for _ in range(3):
            ws.receive_json(timeout=120)
    assert wait_idle(server) == 0


def test_openapi_documents_the_native_routes(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    for path in ("/generate", "/generate_stream", "/generate_batch", "/admin/adapters"):
        assert path in spec["paths"], path
    schema = json.dumps(spec["components"]["schemas"]["GenerateRequest"])
    assert "examples" in schema
