"""Two customers on one real server: isolation on every route, tenant admins, key rotation,
per-tenant limits, usage that matches the responses, no plain key on disk or in the log."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from httpx_ws import connect_ws
from openai import OpenAI

from loraswap.routes import INFERENCE_ROUTES
from tests.conftest import BASE_MODEL, ROOT_KEY
from tests.test_access import request_for


def call(srv, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, srv.url + path, headers=headers, timeout=120, **kwargs)


def ok(response: httpx.Response) -> dict:
    assert response.status_code < 300, response.text
    return response.json()


@pytest.fixture(scope="module")
def world(tenanted):
    """acme (owns acme-*, base model) and beta (owns beta-*, no base model), with keys, and one
    adapter each: acme's registered by acme's own admin key, beta's by the global admin."""
    srv, keys = tenanted, {}
    ok(call(srv, "POST", "/admin/tenants", ROOT_KEY, json={"name": "acme", "adapters": ["acme-*"]}))
    ok(call(srv, "POST", "/admin/tenants", ROOT_KEY,
            json={"name": "beta", "adapters": ["beta-*"], "base_model": False}))  # fmt: skip
    for tenant, role in (("acme", "user"), ("acme", "admin"), ("beta", "user")):
        made = ok(call(srv, "POST", f"/admin/tenants/{tenant}/keys", ROOT_KEY, json={"role": role}))
        keys[f"{tenant}-{role}"] = made["key"]
    ok(call(srv, "POST", "/admin/adapters", keys["acme-admin"],
            json={"name": "acme-up", "source": "adapters/uppercase"}))  # fmt: skip
    ok(call(srv, "POST", "/admin/adapters", ROOT_KEY,
            json={"name": "beta-json", "source": "adapters/json"}))  # fmt: skip
    return keys


def sdk(srv, key: str) -> OpenAI:
    return OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_list_only_what_the_key_may_use(tenanted, world):
    acme = {m.id for m in sdk(tenanted, world["acme-user"]).models.list().data}
    beta = {m.id for m in sdk(tenanted, world["beta-user"]).models.list().data}
    root = {m.id for m in sdk(tenanted, ROOT_KEY).models.list().data}
    assert acme == {BASE_MODEL, "acme-up", "acme-up@v1"}
    assert beta == {"beta-json", "beta-json@v1"}
    assert {"acme-up", "beta-json", "json", "uppercase", BASE_MODEL} <= root
    assert sdk(tenanted, world["acme-user"]).models.retrieve("acme-up").id == "acme-up"
    with pytest.raises(openai.NotFoundError):
        sdk(tenanted, world["acme-user"]).models.retrieve("beta-json")


def test_someone_elses_adapter_is_the_unknown_model_404_on_every_route(tenanted, world):
    """The isolation matrix: each inference route, native SSE and WebSocket, as acme asking for
    beta's adapter, answers exactly what it answers for a model that does not exist."""
    acme = world["acme-user"]
    for path in INFERENCE_ROUTES:
        if path == "/ws/generate":
            continue
        answers = []
        for model in ("beta-json", "no-such-model"):
            body = request_for(path, model)
            if path == "/generate_batch":
                body = {"requests": [body]}
            resp = call(tenanted, "POST", path, acme, json=body)
            answers.append((resp.status_code, resp.text.replace(model, "M")))
        assert answers[0] == answers[1], (path, answers)
        assert answers[0][0] == 404 or '"code":404' in answers[0][1], (path, answers)
    beta_base = call(tenanted, "POST", "/v1/chat/completions", world["beta-user"],
                     json=request_for("/v1/chat/completions", BASE_MODEL))  # fmt: skip
    assert beta_base.status_code == 404  # beta may not use the base model
    body = request_for("/generate_stream", "beta-json")
    with httpx.Client(timeout=60) as http:
        headers = {"Authorization": f"Bearer {acme}"}
        with connect_sse(http, "POST", f"{tenanted.url}/generate_stream", json=body,
                         headers=headers) as source:  # fmt: skip
            assert source.response.status_code == 404
        url = tenanted.url.replace("http://", "ws://") + f"/ws/generate?api_key={acme}"
        with connect_ws(url, http) as ws:
            ws.send_json({"id": "x", **body})
            assert ws.receive_json(timeout=60)["error"]["code"] == 404
            ws.send_json({"id": "y", **request_for("/generate", "acme-up")})
            events = [ws.receive_json(timeout=60)]
            while not events[-1].get("done"):
                events.append(ws.receive_json(timeout=60))
            assert events[0]["model"] == "acme-up@v1"
    reply = sdk(tenanted, acme).chat.completions.create(**request_for("/v1/chat", "acme-up"))
    assert reply.model == "acme-up@v1"


def wait_batch(client: OpenAI, batch_id: str):
    for _ in range(240):
        job = client.batches.retrieve(batch_id)
        if job.status in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError("batch did not finish")


def test_batches_and_files_belong_to_their_tenant(tenanted, world):
    acme, beta = sdk(tenanted, world["acme-user"]), sdk(tenanted, world["beta-user"])
    lines = [
        {"custom_id": model, "method": "POST", "url": "/v1/chat/completions",
         "body": request_for("/v1/chat/completions", model)}
        for model in ("acme-up", "beta-json")
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = acme.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    job = wait_batch(acme, acme.batches.create(input_file_id=upload.id,
                     endpoint="/v1/chat/completions", completion_window="24h").id)  # fmt: skip
    assert job.status == "completed" and job.request_counts.completed == 1
    output = json.loads(acme.files.content(job.output_file_id).text)
    assert output["response"]["body"]["model"] == "acme-up@v1"
    error = json.loads(acme.files.content(job.error_file_id).text)
    assert error["custom_id"] == "beta-json" and error["response"]["status_code"] == 404
    for object_id in (upload.id, job.output_file_id):
        with pytest.raises(openai.NotFoundError):
            beta.files.retrieve(object_id)
        with pytest.raises(openai.NotFoundError):
            beta.files.content(object_id)
        with pytest.raises(openai.NotFoundError):
            beta.files.delete(object_id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.cancel(job.id)
    with pytest.raises(openai.NotFoundError):  # beta cannot start a job on acme's file
        beta.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                            completion_window="24h")  # fmt: skip
    assert job.id not in {b.id for b in beta.batches.list().data}
    assert upload.id not in {f.id for f in beta.files.list().data}
    assert job.id in {b.id for b in acme.batches.list().data}
    assert job.id in {b.id for b in sdk(tenanted, ROOT_KEY).batches.list().data}


def test_tenant_admins_manage_only_their_own_adapters(tenanted, world):
    admin, user = world["acme-admin"], world["acme-user"]
    listed = ok(call(tenanted, "GET", "/admin/adapters", admin))["data"]
    assert [a["name"] for a in listed] == ["acme-up"]
    for method, path, body in (
        ("GET", "/admin/adapters/beta-json", None),
        ("DELETE", "/admin/adapters/beta-json", None),
        ("PUT", "/admin/adapters/beta-json/alias", {"version": "v1"}),
        ("POST", "/admin/adapters/beta-json/pin", None),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "beta-json"}),
    ):
        assert call(tenanted, method, path, admin, json=body).status_code == 404, path
    named = call(tenanted, "POST", "/admin/adapters", admin,
                 json={"name": "beta-mine", "source": "adapters/json"})  # fmt: skip
    assert named.status_code == 403 and "acme-*" in named.json()["error"]["message"]
    outside = call(tenanted, "POST", "/admin/adapters", admin,
                   json={"name": "acme-evil", "source": "/etc"})  # fmt: skip
    assert outside.status_code == 400
    assert ok(call(tenanted, "POST", "/admin/adapters/acme-up/pin", admin))["pinned"]
    ok(call(tenanted, "POST", "/admin/adapters", admin,
            json={"name": "acme-json", "source": "adapters/json"}))  # fmt: skip
    quota = call(tenanted, "POST", "/admin/adapters/acme-json/pin", admin)
    assert quota.status_code == 409, quota.text  # one pin per tenant by default
    ok(call(tenanted, "POST", "/admin/adapters/acme-up/unpin", admin))
    ok(call(tenanted, "DELETE", "/admin/adapters/acme-json", admin))
    assert call(tenanted, "GET", "/admin/adapters", user).status_code == 403
    assert call(tenanted, "GET", "/admin/tenants", admin).status_code == 403
    assert call(tenanted, "POST", "/admin/tenants", admin, json={"name": "x"}).status_code == 403


def test_keys_rotate_and_a_revoked_key_fails_on_its_next_request(tenanted, world):
    made = ok(call(tenanted, "POST", "/admin/tenants/acme/keys", ROOT_KEY, json={"label": "tmp"}))
    client = sdk(tenanted, made["key"])
    assert {m.id for m in client.models.list().data} >= {"acme-up"}
    ok(call(tenanted, "DELETE", f"/admin/tenants/acme/keys/{made['id']}", ROOT_KEY))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert sdk(tenanted, world["acme-user"]).models.list().data  # the other key still works


def stream_in_background(srv, key: str, results: list, body: dict) -> threading.Thread:
    def run() -> None:
        resp = call(srv, "POST", "/v1/chat/completions", key, json=body)
        results.append((resp.status_code, resp.headers.get("retry-after")))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_each_limit_answers_429_with_retry_after_and_recovers(tenanted, world):
    ok(call(tenanted, "POST", "/admin/tenants", ROOT_KEY, json={
        "name": "gamma", "adapters": [], "limits": {"max_concurrent": 2, "requests_per_minute": 6,
                                                    "tokens_per_minute": 200}}))  # fmt: skip
    key = ok(call(tenanted, "POST", "/admin/tenants/gamma/keys", ROOT_KEY, json={}))["key"]
    long = {**request_for("/v1/chat/completions", BASE_MODEL), "max_tokens": 120,
            "ignore_eos": True}  # fmt: skip
    results: list = []
    threads = [stream_in_background(tenanted, key, results, long) for _ in range(4)]
    for thread in threads:
        thread.join()
    codes = sorted(code for code, _ in results)
    assert codes.count(200) == 2 and codes.count(429) == 2, results
    assert all(retry for code, retry in results if code == 429)
    # 2 x (prompt + 120) tokens are over 200 per minute: the next request is refused
    over = call(tenanted, "POST", "/v1/chat/completions", key,
                json=request_for("/v1/chat/completions", BASE_MODEL))  # fmt: skip
    assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
    # the sliding window counter: this minute's rest, then last minute's share falling off
    # (up to two minutes when this minute's count is over the budget)
    assert 1 <= int(over.headers["retry-after"]) <= 120
    # another tenant is not affected
    assert (
        call(
            tenanted,
            "POST",
            "/v1/chat/completions",
            world["acme-user"],
            json=request_for("/v1/chat/completions", BASE_MODEL),
        ).status_code
        == 200
    )
    # lifting the limits at run time lets gamma in again at once (no restart)
    ok(call(tenanted, "PATCH", "/admin/tenants/gamma", ROOT_KEY,
            json={"limits": {"requests_per_minute": 100}}))  # fmt: skip
    assert (
        call(
            tenanted,
            "POST",
            "/v1/chat/completions",
            key,
            json=request_for("/v1/chat/completions", BASE_MODEL),
        ).status_code
        == 200
    )


def test_usage_matches_the_responses_and_survives_in_the_ledger(tenanted, world):
    ok(
        call(
            tenanted,
            "POST",
            "/admin/tenants",
            ROOT_KEY,
            json={"name": "delta", "adapters": ["beta-json"]},
        )
    )
    key = ok(call(tenanted, "POST", "/admin/tenants/delta/keys", ROOT_KEY, json={}))["key"]
    client, expected = sdk(tenanted, key), {}
    for model in (BASE_MODEL, "beta-json", BASE_MODEL):
        reply = client.chat.completions.create(**request_for("/v1/chat/completions", model))
        got = expected.setdefault(reply.model, [0, 0, 0])
        got[0] += 1
        got[1] += reply.usage.prompt_tokens
        got[2] += reply.usage.completion_tokens
    native = call(tenanted, "POST", "/generate", key, json={"prompt": "Hi", "max_tokens": 5})
    usage = ok(native)["usage"]
    got = expected[BASE_MODEL]
    got[0] += 1
    got[1] += usage["prompt_tokens"]
    got[2] += usage["completion_tokens"]
    rows = ok(call(tenanted, "GET", "/admin/usage?tenant=delta", ROOT_KEY))["data"]
    counted = {r["model"]: [r["requests"], r["prompt_tokens"], r["completion_tokens"]]
               for r in rows if r["source"] == "api"}  # fmt: skip
    assert counted == expected
    mine = ok(call(tenanted, "GET", "/admin/usage", world["acme-admin"]))["data"]
    assert mine and {r["tenant"] for r in mine} == {"acme"}  # a tenant admin sees its own only
    series = 'loraswap_tenant_tokens_total{kind="completion",model="beta-json@v1",tenant="delta"}'
    deadline = time.monotonic() + 15
    while series not in (metrics := call(tenanted, "GET", "/metrics", ROOT_KEY).text):
        if time.monotonic() > deadline:  # BentoML's multiprocess collector sorts the labels
            tenant_lines = [x for x in metrics.splitlines() if x.startswith("loraswap_tenant")]
            raise AssertionError(f"{series} not in /metrics: {tenant_lines}")
        time.sleep(0.5)


def test_batch_token_budget_per_day(tenanted, world):
    ok(call(tenanted, "PATCH", "/admin/tenants/beta", ROOT_KEY,
            json={"limits": {"batch_tokens_per_day": 1}}))  # fmt: skip
    beta = sdk(tenanted, world["beta-user"])
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": request_for("/v1/chat/completions", "beta-json")}
        for i in range(3)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = beta.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    first = wait_batch(beta, beta.batches.create(input_file_id=upload.id,
                       endpoint="/v1/chat/completions", completion_window="24h").id)  # fmt: skip
    second = wait_batch(beta, beta.batches.create(input_file_id=upload.id,
                        endpoint="/v1/chat/completions", completion_window="24h").id)  # fmt: skip
    assert first.request_counts.completed >= 1
    assert second.request_counts.completed == 0 and second.request_counts.failed == 3
    refused = json.loads(beta.files.content(second.error_file_id).text.splitlines()[0])
    assert refused["response"]["status_code"] == 429


def test_no_plain_key_on_disk_or_in_the_log(tenanted, world):
    written = [p.read_bytes() for p in tenanted.state.rglob("*") if p.is_file()]
    written.append(tenanted.log_path.read_bytes())
    for key in world.values():
        assert not any(key.encode() in blob for blob in written), "a plain key was written"


def test_readme_tenants_block_runs_as_written(tenanted, tmp_path):
    """The README's tenant set-up, against this server (it has the admin key it needs)."""
    import os
    import re
    import subprocess

    from tests.server import ROOT

    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- example: run by tests/test_tenants.py[^>]*-->\n```bash\n(.*?)```", readme, re.S
    )
    assert block, "the README's tenants block is gone"
    code = block[1].replace("root-secret", ROOT_KEY)
    code = code.replace("localhost:3000", f"127.0.0.1:{tenanted.port}")
    env = {**os.environ, "BENTOML_PORT": str(tenanted.port), "PATH": os.environ["PATH"]}
    prelude = f"set -euo pipefail\ncd {tmp_path}\nln -s {ROOT}/.venv .venv\n"
    prelude += 'curl() { command curl --fail-with-body "$@"; }\n'
    done = subprocess.run(["bash", "-c", prelude + code], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"globex-support"' in done.stdout and "globex-support@v1" in done.stdout
    assert (tmp_path / "globex.key").read_text().startswith("lsk-")
