"""Health routes and the Prometheus endpoint of the real server."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.conftest import server_env
from tests.fleet import Replica


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_root, s3):
    """A server of this module's own, with a BentoML home of its own (the base model by path):
    /metrics reads BentoML's multiprocess directory in that home, which every later
    ``bentoml serve`` on the same home empties, so a server shared across modules loses its
    series from /metrics as soon as another module starts one."""
    work = tmp_path_factory.mktemp("metrics")
    srv = Replica(work, server_env(adapter_root, work, s3)).start()
    yield srv
    assert not srv.stop(), "processes left after SIGTERM"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


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
    import time
    from collections import Counter

    def access_lines() -> int:
        return server.log_path.read_text(errors="replace").count("path=/generate,")

    before = access_lines()
    for _ in range(10):
        httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    deadline = time.monotonic() + 10  # an access line is written after its response is sent
    while access_lines() < before + 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log_path.read_text(errors="replace")
    assert "[loraswap]" not in log, "a line in loraswap's own format: printed twice"
    bentoml_line = re.compile(r"^\S+ \[(?:INFO|WARNING|ERROR)\] \[[^\]]*\] (.*)$")
    messages = [m[1] for line in log.splitlines() if (m := bentoml_line.match(line))]
    events = Counter(m for m in messages if m.startswith(("registered shipped", "engine ")))
    assert events and max(events.values()) == 1, events
    assert sum("loraswap ready in" in m for m in messages) == 1
    assert f"at http://localhost:{server.port}" in log and "try: curl" in log
    phases = re.search(r"ready in (\d+) s .*\n  start: (.*)", log)
    assert phases, "the ready banner names no start phases"
    named = dict(part.rsplit(" ", 2)[:2] for part in phases[2].split("; "))
    assert {"bentoml serve until the worker", "worker import and set-up", "database",
            "vLLM import and engine choices", "engine (process, weights, warm-up)",
            "routes and adapters"} == set(named), named  # fmt: skip
    assert abs(sum(map(float, named.values())) - int(phases[1])) <= 1, phases[0]
    access = [m for m in messages if "path=/generate," in m]
    assert len(access) >= 10 and all("trace=" in m for m in access)


def router_series(text: str) -> tuple[list, list]:
    """``vllm:lora_requests_info`` and ``vllm:lora_adapter_loaded`` samples of a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return samples.get("vllm:lora_requests_info", []), samples.get("vllm:lora_adapter_loaded", [])


def test_a_lora_aware_router_finds_the_adapter_by_the_name_requests_use(server, client):
    """What llm-d's endpoint picker reads from /metrics on the serving port: the adapters a
    replica runs (the series with the newest timestamp wins), matched against the request's
    ``model`` (here the alias ``uppercase``), and the ones it has loaded; GET /health too."""
    import threading
    import time

    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    done, enough = threading.Event(), threading.Event()

    def stream() -> None:
        """A long stream (so a slow scrape still lands inside it), closed once it was seen."""
        try:
            chunks = client.completions.create(
                model="uppercase", prompt="Tell me a story", max_tokens=1024, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            with chunks:
                for _ in chunks:
                    if enough.is_set():
                        break
        finally:
            done.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while not seen and time.monotonic() < deadline:
        started = time.monotonic()
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        scrape_s = time.monotonic() - started
        info, _ = router_series(text)
        if info:
            latest = max(info, key=lambda s: s.value).labels
            names = latest["running_lora_adapters"].split(",")
            names += latest["waiting_lora_adapters"].split(",")
            if "uppercase" in names:
                seen.append(latest)
        if done.is_set() and not seen:
            break
        time.sleep(0.1)
    enough.set()
    thread.join(timeout=120)
    assert seen, f"no scrape named uppercase: {info}"
    assert {"uppercase", "uppercase@v1"} <= set(",".join(seen[0].values()).split(","))
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    _, loaded = router_series(text)
    by_name = {s.labels["adapter_name"]: s for s in loaded}
    assert by_name["uppercase"].value == 1 and by_name["uppercase@v1"].value == 1
    assert by_name["uppercase"].labels["level"] in ("gpu", "cpu")
    for series in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                   "vllm:kv_cache_usage_perc"):  # fmt: skip
        assert f"{series}{{" in text
    lines = [x for x in text.splitlines() if x.startswith(("vllm:lora_", "vllm:num_requests_"))]
    print(f"scrape took {scrape_s:.3f}s; seen during the stream: {seen[0]}", *lines, sep="\n")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
