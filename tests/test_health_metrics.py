"""Health routes and the Prometheus endpoint of the real server."""

from __future__ import annotations

import httpx


def test_livez_and_readyz(server):
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_metrics_carry_bentoml_and_vllm_series(server, client):
    client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "vllm:num_requests_running{" in text
    assert "vllm:generation_tokens_total" in text
    assert "bentoml_" in text
