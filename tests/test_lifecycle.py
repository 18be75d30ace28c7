"""Restart, replicas and Ctrl-C on real servers: state survives, nothing is left running."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import SHIPPED, server_env
from tests.server import Server

pytestmark = pytest.mark.engine


def test_registry_survives_restart_replicas_agree_and_ctrl_c_leaves_nothing(
    tmp_path, s3, adapter_root
):
    """Two replicas share a registry on S3: the second restores it at start, sees later
    changes made through the first, and Ctrl-C on the first leaves no process behind."""
    uri = f"s3://{s3['bucket']}/replicas/registry.json"
    env = server_env(
        adapter_root, tmp_path, s3, LORASWAP_REGISTRY_URI=uri, LORASWAP_REGISTRY_POLL_S="1"
    )
    first = Server(tmp_path / "first.log", env=env).start()
    second = None
    try:
        for source in ("uppercase", "json"):
            resp = httpx.post(
                f"{first.url}/admin/adapters",
                json={"name": "persona", "source": str(SHIPPED / source)},
                timeout=60,
            )
            assert resp.status_code == 201, resp.text
        httpx.put(f"{first.url}/admin/adapters/persona/alias", json={"version": "v1"}, timeout=30)
        assert httpx.post(f"{first.url}/admin/adapters/persona/pin", timeout=60).status_code == 200
        answer_first = chat(first.url, "persona")
        batch_id = finished_batch(first.url, tmp_path)

        second = Server(tmp_path / "second.log", env=env).start()
        info = httpx.get(f"{second.url}/admin/adapters/persona", timeout=30).json()
        assert info["alias"]["version"] == "v1" and info["pinned"]
        assert {v["version"]: v["status"] for v in info["versions"]}["v1"] == "pinned"
        models = {m["id"] for m in httpx.get(f"{second.url}/v1/models", timeout=30).json()["data"]}
        assert {"persona", "persona@v1", "persona@v2"} <= models
        assert chat(second.url, "persona") == answer_first
        restored = OpenAI(base_url=f"{second.url}/v1", api_key="x").batches.retrieve(batch_id)
        assert restored.status == "completed" and restored.request_counts.completed == 1
        assert answer_first[0] == "persona@v1"

        httpx.put(f"{first.url}/admin/adapters/persona/alias", json={"version": "v2"}, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and chat(second.url, "persona")[0] != "persona@v2":
            time.sleep(1)
        assert chat(second.url, "persona")[0] == "persona@v2"

        assert len(first.known) >= 3, "expected the server, its worker and the engine core"
        first.signal(signal.SIGINT, group=True)  # what a terminal's Ctrl-C does
        left = first.wait_gone()
        assert not left, f"left after Ctrl-C: {[(p.pid, p.name()) for p in left]}"
        assert "stopping vLLM engine" in first.log_path.read_text(errors="replace")
    finally:
        first.stop()
        if second is not None:
            assert not second.stop(), "processes left after SIGTERM"


def finished_batch(url: str, tmp_path) -> str:
    """A completed Batch API job (its state must survive a restart)."""
    client = OpenAI(base_url=f"{url}/v1", api_key="x")
    body = {"model": "persona", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps({"custom_id": "a", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")  # fmt: skip
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).status != "completed" and time.monotonic() < deadline:
        time.sleep(1)
    assert client.batches.retrieve(batch.id).status == "completed"
    return batch.id


def chat(url: str, model: str) -> tuple[str, str]:
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "temperature": 0,
            "max_tokens": 16,
        },
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["model"], body["choices"][0]["message"]["content"]
