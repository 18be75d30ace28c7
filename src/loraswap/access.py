"""API keys and the inference concurrency limit, as one ASGI middleware on the whole server.

It wraps BentoML's app, so it also guards ``/metrics`` and the health routes when configured.
BentoML's own ``max_concurrency`` stays as an outer safety valve; this limit adds what it lacks:
the OpenAI error shape, ``Retry-After``, and counting only generating traffic.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs

from .config import Settings
from .errors import ApiError, send_http
from .routes import access_of, inference_route


class AccessMiddleware:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.inflight = 0

    def _required_keys(self, path: str) -> list[str] | None:
        """The keys that open ``path``; None when it is open."""
        s = self.settings
        access = access_of(path)
        if access == "admin":
            return s.admin_api_keys or s.api_keys or None
        if access == "health":
            return s.api_keys if s.auth_health_routes else None
        if access == "metrics":
            return s.api_keys if s.auth_metrics_route else None
        if access == "open":
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

    @staticmethod
    async def _reject(scope: dict, receive: Any, send: Any, exc: ApiError) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            code = 1008 if exc.status == 401 else 1013
            await send({"type": "websocket.close", "code": code, "reason": exc.message[:120]})
            return
        await send_http(send, exc)

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
                await self._reject(scope, receive, send, ApiError(
                    401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                    headers={"www-authenticate": "Bearer"},
                ))  # fmt: skip
                return
        route = inference_route(path)
        if route is None or not route.generates:
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_concurrent_requests
        if self.inflight >= limit:
            await self._reject(scope, receive, send, ApiError(
                429, f"too many concurrent requests (limit {limit})",
                headers={"retry-after": str(self.settings.retry_after_s)},
            ))  # fmt: skip
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
