"""API keys and the inference concurrency limit, as one ASGI middleware on the whole server.

It wraps BentoML's app, so it also guards ``/metrics`` and the health routes when configured.
BentoML's own ``max_concurrency`` stays as an outer safety valve; this limit adds what it lacks:
the OpenAI error shape, ``Retry-After``, and counting only inference traffic.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from .config import Settings

INFERENCE_PREFIXES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/generate",
                      "/ws/generate")  # fmt: skip
ADMIN_PREFIXES = ("/admin/", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
OPEN_PATHS = ("/docs", "/docs.json", "/v1/docs", "/v1/openapi.json", "/")


def error_body(status: int, message: str, err_type: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    ).encode()


class AccessMiddleware:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.inflight = 0

    def _required_keys(self, path: str) -> list[str] | None:
        """The keys that open ``path``; None when it is open."""
        s = self.settings
        if path.startswith(ADMIN_PREFIXES) or path == "/admin":
            return s.admin_api_keys or s.api_keys or None
        if path in HEALTH_PATHS:
            return s.api_keys if s.auth_health_routes else None
        if path == "/metrics":
            return s.api_keys if s.auth_metrics_route else None
        if path in OPEN_PATHS:
            return None
        return [*s.api_keys, *s.admin_api_keys] if s.api_keys else None

    @staticmethod
    def _presented_key(scope: dict) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return token.strip()
        if scope["type"] == "websocket":  # browsers cannot set headers on a WebSocket
            query = parse_qs(scope.get("query_string", b"").decode())
            return (query.get("api_key") or [None])[0]
        return None

    async def _reject(self, scope, receive, send, status, message, err_type, headers=()):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008 if status == 401 else 1013,
                        "reason": message[:120]})  # fmt: skip
            return
        body = error_body(status, message, err_type)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers],
            }
        )  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        keys = self._required_keys(path)
        if keys:
            presented = self._presented_key(scope)
            if presented is None or not any(
                hmac.compare_digest(presented.encode(), k.encode()) for k in keys
            ):
                await self._reject(
                    scope, receive, send, 401,
                    "missing or invalid API key (send `Authorization: Bearer <key>`)",
                    "AuthenticationError", [(b"www-authenticate", b"Bearer")],
                )  # fmt: skip
                return
        if not path.startswith(INFERENCE_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.settings.max_concurrent_requests:
            await self._reject(
                scope, receive, send, 429,
                f"too many concurrent requests (limit {self.settings.max_concurrent_requests})",
                "RateLimitError",
                [(b"retry-after", str(self.settings.retry_after_s).encode())],
            )  # fmt: skip
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
