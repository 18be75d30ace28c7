"""Shadow versions, promote/rollback, the audit log and compare requests on the real server,
through the official ``openai`` client and the native routes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from httpx_ws import connect_ws

from tests.conftest import BASE_MODEL, SHIPPED, copy_adapter

NAME = "shadowed"
CLI = "loraswap"


def call(server, method: str, path: str, **kwargs) -> dict:
    resp = httpx.request(method, server.url + path, timeout=120, **kwargs)
    assert resp.status_code < 300, resp.text
    return resp.json()


def pair(server, primary: str, shadow: str, count: int, timeout: float = 120) -> dict:
    """The comparison summary of (primary, shadow) once ``count`` samples are stored."""
    deadline = time.monotonic() + timeout
    while True:
        data = call(server, "GET", f"/admin/comparisons?adapter={NAME}")["data"]
        found = [
            p for p in data if (p["primary_version"], p["shadow_version"]) == (primary, shadow)
        ]
        if found and found[0]["count"] >= count:
            return found[0]
        assert time.monotonic() < deadline, f"shadow comparisons not stored: {data}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shadowed(server, adapter_root: Path):
    """``shadowed``: v1 (the uppercase adapter, the alias), v2 (a copy of the same weights),
    v3 (the json adapter)."""
    copy = copy_adapter(SHIPPED / "uppercase", adapter_root / "uppercase-copy")
    for version, source in (("v1", SHIPPED / "uppercase"), ("v2", copy), ("v3", SHIPPED / "json")):
        body = {"name": NAME, "source": str(source), "version": version, "promote": version == "v1"}
        call(server, "POST", "/admin/adapters", json=body)
    yield NAME
    httpx.delete(f"{server.url}/admin/adapters/{NAME}", timeout=60)


def chat(client, content: str, stream: bool = False, model: str = NAME) -> tuple[str, str]:
    kwargs = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=12,
                  temperature=0)  # fmt: skip
    if not stream:
        out = client.chat.completions.create(**kwargs)
        return out.choices[0].message.content, out.model
    text, served = "", ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        served = chunk.model
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, served


def test_a_shadow_answers_beside_the_alias_without_touching_the_client(server, client, shadowed):
    call(server, "PUT", f"/admin/adapters/{NAME}/alias",
         json={"version": "v1", "shadow_version": "v2", "shadow_rate": 1.0})  # fmt: skip
    answers = [chat(client, "Say hello to Ann"), chat(client, "Name a colour", stream=True)]
    done = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8,
                                     temperature=0)  # fmt: skip
    assert {served for _, served in answers} == {f"{NAME}@v1"}  # the client gets the alias only
    assert answers[0][0].isupper()
    same = pair(server, "v1", "v2", 3)
    # the same weights in another version answer exactly the same (temperature 0)
    assert same["identical"] == 3 and same["shadow_errors"] == 0, same
    assert same["mean_primary_tokens"] == same["mean_shadow_tokens"]
    assert same["primary_latency_p50_s"] > 0 and same["shadow_latency_p50_s"] > 0
    assert same["samples"] == []

    call(server, "PUT", f"/admin/adapters/{NAME}/alias",
         json={"version": "v1", "shadow_version": "v3", "shadow_rate": 1.0})  # fmt: skip
    text, _ = chat(client, "Say hello to Bob")
    differ = pair(server, "v1", "v3", 1)
    sample = differ["samples"][0]
    assert differ["identical"] == 0 and sample["prompt"] == "user: Say hello to Bob"
    assert sample["primary_text"] == text  # what the client got is what was stored
    assert sample["shadow_text"].startswith("{")  # the json adapter's answer
    assert chat(client, "Hi", model=f"{NAME}@v1")[1] == f"{NAME}@v1"
    assert done.choices[0].text


def test_promote_and_rollback_in_one_call_each_with_an_audit_trail(server, client, shadowed):
    call(server, "PUT", f"/admin/adapters/{NAME}/alias",
         json={"version": "v1", "shadow_version": "v3", "shadow_rate": 0.5})  # fmt: skip
    promoted = call(server, "POST", f"/admin/adapters/{NAME}/promote", json={"from": "shadow"})
    assert promoted["alias"]["version"] == "v3" and promoted["previous_alias"]["version"] == "v1"
    text, served = chat(client, "Name a fruit")
    assert served == f"{NAME}@v3" and text.startswith("{")
    back = call(server, "POST", f"/admin/adapters/{NAME}/rollback")
    assert back["alias"]["version"] == "v1" and back["alias"]["shadow_version"] == "v3"
    assert chat(client, "Name a fruit")[1] == f"{NAME}@v1"
    resp = httpx.post(f"{server.url}/admin/adapters/{NAME}/promote", json={"from": "canary"},
                      timeout=30)  # fmt: skip
    assert resp.status_code == 409 and "no canary" in resp.json()["error"]["message"]

    actions = [e["action"] for e in call(server, "GET", f"/admin/audit?adapter={NAME}")["data"]]
    assert actions[:3] == ["rollback", "promote", "alias"], actions
    cli = [sys.executable, "-m", CLI]
    audit = subprocess.run([*cli, "audit", "--url", server.url, "--adapter", NAME],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert audit.returncode == 0 and "promote" in audit.stdout and "rollback" in audit.stdout
    summary = subprocess.run([*cli, "comparisons", "--url", server.url, "--adapter", NAME],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    assert "v1 vs shadow v2" in summary.stdout and "(100%)" in summary.stdout
    off = subprocess.run([*cli, "adapters", "--url", server.url, "shadow", NAME, "--off"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert off.returncode == 0 and json.loads(off.stdout)["alias"]["shadow_version"] is None


def test_traffic_shows_each_served_model(server, client, shadowed):
    chat(client, "Hello", stream=True)
    client.completions.create(model=BASE_MODEL, prompt="Hi", max_tokens=2)
    rows = {r["model"]: r for r in call(server, "GET", "/admin/traffic")["data"]}
    row = rows[f"{NAME}@v1"]
    assert row["adapter"] == NAME and row["requests"] >= 1 and row["generation_tokens"] > 0
    assert row["latency_p50_s"] > 0 and row["ttft_p50_s"] > 0
    assert rows[BASE_MODEL]["adapter"] is None


COMPARE = {"messages": [{"role": "user", "content": "Name a fruit"}], "max_tokens": 10,
           "temperature": 0}  # fmt: skip
MODELS = [BASE_MODEL, "uppercase", "json"]


def solo(server, model: str) -> str:
    return call(server, "POST", "/generate", json={**COMPARE, "model": model})["text"]


def test_compare_answers_like_each_model_alone(server):
    expected = {m: solo(server, m) for m in MODELS}
    assert len(set(expected.values())) == 3  # three different models
    out = call(server, "POST", "/generate", json={**COMPARE, "model": MODELS})
    assert out["object"] == "compare"
    assert [r["requested_model"] for r in out["results"]] == MODELS
    assert {r["requested_model"]: r["result"]["text"] for r in out["results"]} == expected

    texts, done = {m: "" for m in MODELS}, []
    with (
        httpx.Client(timeout=120) as http,
        connect_sse(
            http, "POST", f"{server.url}/generate_stream", json={**COMPARE, "model": MODELS}
        ) as events,
    ):
        for sse in events.iter_sse():
            if sse.data == "[DONE]":
                break
            event = json.loads(sse.data)
            if event.get("done"):
                done.append(event["requested_model"])
            else:
                texts[event["requested_model"]] += event["text"]
    assert texts == expected and sorted(done) == sorted(MODELS)

    ws_url = server.url.replace("http", "ws") + "/ws/generate"
    texts = {m: "" for m in MODELS[:2]}
    with httpx.Client(timeout=120) as http, connect_ws(ws_url, http) as ws:
        ws.send_json({"id": "c1", **COMPARE, "model": MODELS[:2]})
        while True:
            event = ws.receive_json(timeout=120)
            if event.get("done") and "requested_model" not in event:
                assert event["models"] == MODELS[:2]
                break
            if "text" in event:
                texts[event["requested_model"]] += event["text"]
    assert texts == {m: expected[m] for m in MODELS[:2]}


def test_compare_keeps_one_models_error_in_its_slot(server):
    out = call(server, "POST", "/generate", json={**COMPARE, "model": ["uppercase", "nope"]})
    results = {r["requested_model"]: r["result"] for r in out["results"]}
    assert results["uppercase"]["text"] and results["nope"]["error"]["code"] == 404
    resp = httpx.post(f"{server.url}/generate", json={**COMPARE, "model": ["nope", "nada"]},
                      timeout=60)  # fmt: skip
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"
    resp = httpx.post(f"{server.url}/generate_stream", json={**COMPARE, "model": ["a", "a"]},
                      timeout=60)  # fmt: skip
    assert resp.status_code in (400, 422) and "once" in resp.text
    batch = call(server, "POST", "/generate_batch",
                 json={"requests": [{**COMPARE, "model": ["uppercase", "json"]}]})  # fmt: skip
    assert batch["results"][0]["error"]["code"] == 400
    with httpx.Client(timeout=120) as http, connect_sse(
        http, "POST", f"{server.url}/generate_stream",
        json={**COMPARE, "model": ["uppercase", "nope"]},
    ) as events:  # fmt: skip
        seen = [json.loads(s.data) for s in events.iter_sse() if s.data != "[DONE]"]
    assert any(e["requested_model"] == "nope" and "error" in e for e in seen)
    assert any(e["requested_model"] == "uppercase" and e.get("done") for e in seen)
