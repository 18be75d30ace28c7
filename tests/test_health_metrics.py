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


def test_log_has_one_line_per_event_and_a_ready_banner(server):
    """A start and requests log each loraswap event once, in BentoML's format (with request
    ids on the access lines), and the start ends with where to go and what to try."""
    import re
    from collections import Counter

    for _ in range(10):
        httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    log = server.log_path.read_text(errors="replace")
    assert "[loraswap]" not in log, "a line in loraswap's own format: printed twice"
    bentoml_line = re.compile(r"^\S+ \[(?:INFO|WARNING|ERROR)\] \[[^\]]*\] (.*)$")
    messages = [m[1] for line in log.splitlines() if (m := bentoml_line.match(line))]
    events = Counter(m for m in messages if m.startswith(("registered shipped", "engine ")))
    assert events and max(events.values()) == 1, events
    assert sum("loraswap ready in" in m for m in messages) == 1
    assert f"at http://localhost:{server.port}" in log and "try: curl" in log
    access = [m for m in messages if "path=/generate," in m]
    assert len(access) >= 10 and all("trace=" in m for m in access)
