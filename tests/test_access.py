"""API keys, the concurrency limit, and engine death, on a server started with keys and limits."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from httpx_ws import WebSocketUpgradeError, connect_ws
from openai import OpenAI

from loraswap.routes import BATCH_ENDPOINTS, INFERENCE_ROUTES
from tests.conftest import BASE_MODEL, server_env
from tests.server import Server

API_KEY, ADMIN_KEY = "user-key-1", "admin-key-1"
CHAT = {
    "model": BASE_MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 8,
}


@pytest.fixture(scope="module")
def locked(tmp_path_factory, adapter_root, s3):
    state = tmp_path_factory.mktemp("locked")
    env = server_env(
        adapter_root, state, s3,
        LORASWAP_API_KEYS=f"{API_KEY},user-key-2",
        LORASWAP_ADMIN_API_KEYS=ADMIN_KEY,
        LORASWAP_AUTH_METRICS_ROUTE="true",
        LORASWAP_MAX_CONCURRENT_REQUESTS="2",
        LORASWAP_RETRY_AFTER_S="3",
        LORASWAP_MAX_TOKENS_LIMIT="64",
        LORASWAP_MAX_PROMPT_TOKENS="200",
    )  # fmt: skip
    srv = Server(state / "serve.log", env=env).start()
    yield srv
    assert not srv.stop(), "processes left after SIGTERM"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/generate"),
     ("POST", "/generate_batch"), ("GET", "/admin/adapters"), ("POST", "/v1/load_lora_adapter"),
     ("GET", "/metrics"), ("GET", "/v1/batches")],
)  # fmt: skip
def test_no_key_is_401_in_openai_shape(locked, method, path):
    for headers in ({}, auth("wrong"), {"Authorization": "Basic abc"}):
        resp = httpx.request(method, f"{locked.url}{path}", json={}, headers=headers, timeout=30)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["type"] == "AuthenticationError"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_keys_open_their_routes_only(locked):
    client = OpenAI(base_url=f"{locked.url}/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{locked.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.post(f"{locked.url}/generate", json=CHAT, headers=auth("user-key-2"),
                      timeout=60).status_code == 200  # fmt: skip
    assert httpx.get(f"{locked.url}/admin/adapters", headers=auth(API_KEY)).status_code == 401
    assert httpx.get(f"{locked.url}/admin/adapters", headers=auth(ADMIN_KEY)).status_code == 200
    assert httpx.get(f"{locked.url}/metrics", headers=auth(API_KEY)).status_code == 200
    for path in ("/livez", "/readyz"):
        assert httpx.get(f"{locked.url}{path}", timeout=10).status_code == 200


def test_websocket_needs_a_key(locked):
    url = locked.url.replace("http://", "ws://") + "/ws/generate"
    with httpx.Client() as http:
        for bad in (url, f"{url}?api_key=wrong"):
            with pytest.raises(WebSocketUpgradeError) as refused, connect_ws(bad, http):
                pass
            assert refused.value.response.status_code == 403
        with connect_ws(f"{url}?api_key={API_KEY}", http) as ws:
            ws.send_json({"id": 1, **CHAT})
            events = []
            while not events or not events[-1].get("done"):
                events.append(ws.receive_json(timeout=60))
            assert events[-1]["usage"]["completion_tokens"] > 0


def _over_limit_via(locked, path: str, field: str) -> dict:
    """Send one request asking for 65 tokens (limit 64) through ``path``; its error body."""
    ask = [{"role": "user", "content": "Say hello."}]
    body = {"model": BASE_MODEL, field: 65}
    if path == "/v1/responses":
        body["input"] = "Say hello."
    elif path == "/v1/completions":
        body["prompt"] = "Say hello."
    else:
        body["messages"] = ask
    if path == "/ws/generate":
        url = locked.url.replace("http://", "ws://") + f"{path}?api_key={API_KEY}"
        with httpx.Client() as http, connect_ws(url, http) as ws:
            ws.send_json({"id": "x", **body})
            return ws.receive_json(timeout=60)
    if path == "/generate_batch":
        resp = httpx.post(f"{locked.url}{path}", json={"requests": [body]},
                          headers=auth(API_KEY), timeout=60)  # fmt: skip
        assert resp.status_code == 200, resp.text
        return resp.json()["results"][0]
    resp = httpx.post(f"{locked.url}{path}", json=body, headers=auth(API_KEY), timeout=60)
    assert resp.status_code == 400, (path, resp.text)
    return resp.json()


def _over_limit_via_batch_line(locked, endpoint: str, field: str) -> dict:
    client = OpenAI(base_url=f"{locked.url}/v1", api_key=API_KEY, max_retries=0)
    key = "messages" if endpoint.endswith("chat/completions") else "prompt"
    value = [{"role": "user", "content": "Hi"}] if key == "messages" else "Hi"
    line = {"custom_id": "over", "method": "POST", "url": endpoint,
            "body": {"model": BASE_MODEL, key: value, field: 65}}  # fmt: skip
    upload = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint,
                                  completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.error_file_id, batch
    row = json.loads(client.files.content(batch.error_file_id).text.splitlines()[0])
    assert row["response"]["status_code"] == 400
    return row["response"]["body"]


def test_max_tokens_limit_on_every_inference_route_and_batch_lines(locked):
    """The same over-limit request through each route of the route table: one pipeline, so a
    route added to the table without the limit fails here."""
    seen = []
    for path, route in INFERENCE_ROUTES.items():
        for field in route.token_fields:
            error = _over_limit_via(locked, path, field)
            seen.append((path, field))
            assert error["error"]["code"] == 400, (path, field, error)
            assert "at most 64" in error["error"]["message"], (path, field, error)
    for endpoint in BATCH_ENDPOINTS:
        error = _over_limit_via_batch_line(locked, endpoint, "max_tokens")
        assert "at most 64" in error["error"]["message"], (endpoint, error)
    assert len(seen) >= 8


def test_max_prompt_tokens(locked):
    long = {**CHAT, "messages": [{"role": "user", "content": "hello " * 300}]}
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream"):
        body = long if path != "/v1/completions" else {**CHAT, "prompt": "hello " * 300}
        if path == "/v1/completions":
            body.pop("messages")
        resp = httpx.post(f"{locked.url}{path}", json=body, headers=auth(API_KEY), timeout=60)
        assert resp.status_code == 400, (path, resp.text)
        assert "at most 200" in resp.json()["error"]["message"]


def test_burst_beyond_the_limit_gets_429_with_retry_after(locked):
    body = {**CHAT, "max_tokens": 48, "messages": [{"role": "user", "content": "Tell a story."}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers=auth(API_KEY)) as http:
            return await asyncio.gather(
                *(http.post(f"{locked.url}/v1/chat/completions", json=body) for _ in range(8))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "3"
    assert limited.json()["error"]["type"] == "RateLimitError"
    time.sleep(1)
    ok = httpx.post(
        f"{locked.url}/v1/chat/completions", json=CHAT, headers=auth(API_KEY), timeout=60
    )
    assert ok.status_code == 200


def test_zz_dead_engine_makes_the_server_unready(locked):
    """Runs last in this module: it kills the engine."""
    locked.engine_core().send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    codes = {}
    while time.monotonic() < deadline:
        codes = {
            p: httpx.get(f"{locked.url}{p}", timeout=10).status_code for p in ("/readyz", "/livez")
        }
        if codes == {"/readyz": 503, "/livez": 503}:
            break
        time.sleep(1)
    assert codes == {"/readyz": 503, "/livez": 503}, locked.log_tail()
