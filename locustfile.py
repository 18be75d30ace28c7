"""Load test for a local loraswap server: a realistic traffic mix, loopback targets only.

Bounded headless run (60 s, 8 users, 2 spawned per second, stats as CSV)::

    .venv/bin/locust -f locustfile.py --headless -u 8 -r 2 -t 60s -H http://127.0.0.1:3000 \\
        --csv benchmarks/results/locust

Give at least as many users (``-u``) as there are user classes (5), or some get none. The host
must be 127.0.0.1, localhost or ::1; anything else is refused before a request is sent. A server
started with ``LORASWAP_API_KEYS`` needs ``--api-key KEY`` (or ``LORASWAP_API_KEY=KEY``).

Users (weight): ``ChatStreamUser`` (3) streams chat completions; ``ChatUser`` (2) chat completions
without streaming, now and then ``GET /v1/models``; ``CompletionsUser`` (1) ``/v1/completions``,
streamed or not; ``NativeUser`` (2) ``/generate``, ``/generate_stream`` and a small
``/generate_batch``; ``WebSocketUser`` (1) two interleaved requests per ``/ws/generate``
connection turn, sometimes cancelling one. Models are the base and the shipped adapters
(``uppercase``, ``json``) mixed; row names end in ``base`` or ``lora``.

Locust times a streamed request only up to its headers, so streamed rows here are re-timed to the
last byte, and streaming adds two rows per endpoint: ``TTFT`` (time to the first text delta) and
``TPOT`` (time per output token after the first: (last delta - first delta) / (tokens - 1), tokens
from the usage block). Their "size" column is the output tokens of the request. Output tokens of
every request are also summed and logged at the end with the output token rate.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from itertools import count
from typing import Any
from urllib.parse import urlsplit

import gevent
import websocket  # websocket-client
from locust import HttpUser, User, between, events, task
from locust.exception import StopUser

BASE_MODEL = "smollm2-135m-instruct"
MODELS = (BASE_MODEL, "uppercase", "json")  # the base and the shipped (preloaded) adapters
MAX_TOKENS = (32, 48, 64)  # bounded, so a 2-core CPU box copes
CHAT_PROMPTS = (
    "Give me one fun fact about owls.",
    "What is the capital of France?",
    "Describe a sunny day in two sentences.",
    "List three fruits and their colours.",
    "Explain what a rainbow is to a child.",
)
COMPLETION_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

log = logging.getLogger("loraswap.locust")
output_tokens: Counter[str] = Counter()  # per row name, for the summary at the end
test_started = 0.0


def is_loopback_url(host: str | None) -> bool:
    """True only for an http(s) URL whose host is 127.0.0.1, localhost or ::1."""
    if not host:
        return False
    try:
        parts = urlsplit(host.strip())
        hostname = parts.hostname
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and (hostname or "").lower() in LOOPBACK_HOSTS


def refusal(host: str | None) -> str:
    return (
        f"loraswap locustfile: refusing to run against {host!r}; only loopback targets are "
        "allowed (-H http://127.0.0.1:PORT, http://localhost:PORT or http://[::1]:PORT)"
    )


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--api-key",
        env_var="LORASWAP_API_KEY",
        default="",
        help="Bearer key for a server started with LORASWAP_API_KEYS",
        is_secret=True,
    )


@events.init.add_listener
def _refuse_remote_host(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    host = environment.host
    if host is None and not (options is not None and options.headless):
        return  # web UI without -H: the host comes with the start form, checked at test_start
    if not is_loopback_url(host):
        log.error(refusal(host))
        raise SystemExit(2)


@events.test_start.add_listener
def _check_host_at_start(environment: Any, **_: Any) -> None:
    global test_started
    output_tokens.clear()
    test_started = time.perf_counter()
    if not is_loopback_url(environment.host):
        halt(environment, environment.host)


@events.test_stop.add_listener
def _log_output_tokens(environment: Any, **_: Any) -> None:
    elapsed = time.perf_counter() - test_started if test_started else 0.0
    total = sum(output_tokens.values())
    if not total or not elapsed:
        return
    rows = ", ".join(f"{name}: {n}" for name, n in sorted(output_tokens.items()))
    log.info(
        "output tokens: %d in %.0f s (%.1f tokens/s); %s", total, elapsed, total / elapsed, rows
    )


def halt(environment: Any, host: str | None) -> None:
    """Refuse a non-loopback host: quit a headless run, stop the test in the web UI."""
    log.error(refusal(host))
    environment.process_exit_code = 2
    runner = environment.runner
    if runner is not None:
        headless = getattr(environment.parsed_options, "headless", True)
        gevent.spawn(runner.quit if headless else runner.stop)


def stop_unless_loopback(user: User) -> None:
    """Stop the user (and the run) before its first request when its host is not loopback."""
    if not is_loopback_url(user.host):
        halt(user.environment, user.host)
        raise StopUser()


def kind(model: str) -> str:
    return "base" if model == BASE_MODEL else "lora"


def completion_tokens(usage: Any) -> int | None:
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return None


def chat_body(model: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": random.choice(CHAT_PROMPTS)}],
        "max_tokens": random.choice(MAX_TOKENS),
        "temperature": 0.7,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


class StreamTimer:
    """TTFT and TPOT of one streamed request, fired as their own locust rows."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.deltas = 0

    def delta(self, text: str | None) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.deltas += 1

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000

    def report(self, environment: Any, name: str, tokens: int | None) -> None:
        """Fire TTFT (and TPOT with two tokens or more); ``tokens`` from usage, else deltas."""
        if self.first is None or self.last is None:
            return
        n = tokens if tokens else self.deltas
        output_tokens[name] += n
        fire = environment.events.request.fire
        fire(
            request_type="TTFT",
            name=name,
            response_time=(self.first - self.start) * 1000,
            response_length=n,
            exception=None,
            context={},
        )
        if n > 1:
            fire(
                request_type="TPOT",
                name=name,
                response_time=(self.last - self.first) * 1000 / (n - 1),
                response_length=n,
                exception=None,
                context={},
            )


def sse_events(response: Any) -> Iterator[tuple[str | None, str]]:
    """``(event, data)`` per Server-Sent Event of a streamed ``requests`` response."""
    event = None
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            event = None
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


class LoopbackHttpUser(HttpUser):
    """An HTTP user that stops before its first request unless the host is loopback."""

    abstract = True
    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        stop_unless_loopback(self)
        key = getattr(self.environment.parsed_options, "api_key", "")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def post_json(self, path: str, body: dict[str, Any], name: str) -> dict[str, Any] | None:
        """POST without streaming; the parsed body on success, None once reported failed."""
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            try:
                data = resp.json()
            except ValueError:
                resp.failure(f"HTTP {resp.status_code}, not JSON: {resp.text[:200]!r}")
                return None
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {json.dumps(data)[:300]}")
                return None
            tokens = completion_tokens(data.get("usage"))
            if not tokens:
                resp.failure(f"no output tokens in {json.dumps(data)[:300]}")
                return None
            output_tokens[name] += tokens
            return data

    def post_stream(self, path: str, body: dict[str, Any], name: str, native: bool) -> None:
        """POST a streaming request, read it to the end; OpenAI chunks or native events."""
        timer = StreamTimer()
        with self.client.post(path, json=body, name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:300]}")
                return
            tokens, done, error = None, False, None
            try:
                for event, data in sse_events(resp):
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if event == "error" or "error" in chunk:
                        error = chunk.get("error", chunk)
                        break
                    if native:
                        timer.delta(chunk.get("text"))
                    for choice in chunk.get("choices") or []:  # OpenAI: chat delta or text
                        delta = choice.get("delta") or {}
                        timer.delta(choice.get("text") or delta.get("content"))
                    tokens = completion_tokens(chunk.get("usage")) or tokens
            except Exception as exc:  # a dropped connection or a broken chunk
                error = f"{type(exc).__name__}: {exc}"
            # locust timed the headers only: report the whole stream and its size instead
            resp.request_meta["response_time"] = timer.elapsed_ms()
            if error is not None:
                resp.failure(f"stream error: {error}")
            elif not done:
                resp.failure("stream ended without [DONE]")
            elif timer.first is None:
                resp.failure("stream without any text")
            else:
                resp.success()
                timer.report(self.environment, name, tokens)


class ChatStreamUser(LoopbackHttpUser):
    """Streamed chat completions, base and adapters mixed."""

    weight = 3

    @task
    def chat_stream(self) -> None:
        model = random.choice(MODELS)
        self.post_stream(
            "/v1/chat/completions", chat_body(model, stream=True), f"chat stream {kind(model)}",
            native=False,
        )  # fmt: skip


class ChatUser(LoopbackHttpUser):
    """Chat completions without streaming, and now and then the model list."""

    weight = 2

    @task(8)
    def chat(self) -> None:
        model = random.choice(MODELS)
        data = self.post_json("/v1/chat/completions", chat_body(model), f"chat {kind(model)}")
        if data is not None and not data.get("choices"):
            log.warning("chat without choices: %s", data)

    @task(1)
    def models(self) -> None:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            try:
                ids = {m["id"] for m in resp.json()["data"]}
            except (ValueError, KeyError, TypeError):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]!r}")
                return
            if missing := set(MODELS) - ids:
                resp.failure(f"models missing from /v1/models: {sorted(missing)}")


class CompletionsUser(LoopbackHttpUser):
    """Raw-prompt completions, streamed or not."""

    weight = 1

    def body(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": random.choice(COMPLETION_PROMPTS),
            "max_tokens": random.choice(MAX_TOKENS),
            "temperature": 0.7,
        }

    @task
    def completion(self) -> None:
        model = random.choice(MODELS)
        self.post_json("/v1/completions", self.body(model), f"completions {kind(model)}")

    @task
    def completion_stream(self) -> None:
        model = random.choice(MODELS)
        body = self.body(model) | {"stream": True, "stream_options": {"include_usage": True}}
        self.post_stream("/v1/completions", body, f"completions stream {kind(model)}", native=False)


class NativeUser(LoopbackHttpUser):
    """The native routes: /generate, /generate_stream (SSE) and a small /generate_batch."""

    weight = 2

    @task(4)
    def generate(self) -> None:
        model = random.choice(MODELS)
        data = self.post_json("/generate", chat_body(model), f"/generate {kind(model)}")
        if data is not None and not isinstance(data.get("text"), str):
            log.warning("/generate without text: %s", data)

    @task(4)
    def generate_stream(self) -> None:
        model = random.choice(MODELS)
        self.post_stream(
            "/generate_stream", chat_body(model), f"/generate_stream {kind(model)}", native=True
        )

    @task(1)
    def generate_batch(self) -> None:
        body = {"requests": [chat_body(model) | {"max_tokens": 32} for model in MODELS]}
        name = "/generate_batch"
        with self.client.post("/generate_batch", json=body, name=name, catch_response=True) as resp:
            try:
                results = resp.json()["results"]
            except (ValueError, KeyError, TypeError):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:300]!r}")
                return
            if errors := [r["error"] for r in results if "error" in r]:
                resp.failure(f"{len(errors)} of {len(results)} failed: {errors[0]}")
                return
            if len(results) != len(MODELS):
                resp.failure(f"{len(results)} results for {len(MODELS)} requests")
                return
            output_tokens[name] += sum(completion_tokens(r.get("usage")) or 0 for r in results)


class WebSocketUser(User):
    """``/ws/generate``: two requests in flight per turn on one connection (interleaved
    deltas), now and then cancelling one after its first delta."""

    weight = 1
    wait_time = between(0.5, 2)
    cancel_rate = 0.15
    ids = count()

    def ws_url(self) -> str:
        parts = urlsplit(self.host)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}/ws/generate"

    def fire(self, name: str, started: float, length: int = 0, exc: Exception | None = None):
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def on_start(self) -> None:
        stop_unless_loopback(self)
        self.ws: websocket.WebSocket | None = None
        self.finished_before_cancel: set[str] = set()  # their cancel may still draw an error

    def connect(self) -> websocket.WebSocket:
        if self.ws is None:
            key = getattr(self.environment.parsed_options, "api_key", "")
            header = [f"Authorization: Bearer {key}"] if key else None
            started = time.perf_counter()
            try:
                self.ws = websocket.create_connection(self.ws_url(), timeout=120, header=header)
            except Exception as exc:
                self.fire("ws connect", started, exc=exc)
                raise
            self.fire("ws connect", started)
        return self.ws

    def on_stop(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
            self.ws = None

    @task
    def turn(self) -> None:
        try:
            ws = self.connect()
        except Exception:
            return  # reported as a failed `ws connect`; retried next turn
        pending: dict[str, tuple[str, StreamTimer]] = {}
        for model in random.sample(MODELS, 2):
            rid = f"u{id(self) % 10_000}-{next(self.ids)}"
            ws.send(json.dumps({"id": rid, **chat_body(model)}))
            pending[rid] = (f"ws/generate {kind(model)}", StreamTimer())
        cancel = next(iter(pending)) if random.random() < self.cancel_rate else None
        try:
            while pending:
                message = json.loads(ws.recv())
                rid = message.get("id")
                if rid in self.finished_before_cancel:  # "no running request with that id"
                    self.finished_before_cancel.discard(rid)
                    continue
                if rid not in pending:
                    raise ValueError(f"message for an unknown id: {message}")
                name, timer = pending[rid]
                if "error" in message:
                    del pending[rid]
                    self.fire(name, timer.start, exc=RuntimeError(str(message["error"])))
                elif message.get("cancelled"):
                    del pending[rid]
                    error = None if rid == cancel else RuntimeError("cancelled unasked")
                    self.fire("ws/generate cancel", timer.start, exc=error)
                elif message.get("done"):
                    del pending[rid]
                    if rid == cancel and timer.deltas:  # finished before the cancel landed
                        self.finished_before_cancel.add(rid)
                    tokens = completion_tokens(message.get("usage"))
                    if timer.first is None:
                        self.fire(name, timer.start, exc=RuntimeError("done without any text"))
                    else:
                        self.fire(name, timer.start, length=tokens or 0)
                        timer.report(self.environment, name, tokens)
                else:
                    timer.delta(message.get("text"))
                    if rid == cancel and timer.deltas == 1:
                        ws.send(json.dumps({"cancel": rid}))
        except Exception as exc:  # connection lost or a protocol surprise: fail what is left
            for name, timer in pending.values():
                self.fire(name, timer.start, exc=exc)
            self.on_stop()  # reconnect next turn
