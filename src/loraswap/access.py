"""API keys and the inference concurrency limit, as one ASGI middleware on the whole server.

It wraps BentoML's app, so it also guards ``/metrics`` and the health routes when configured.
``/metrics`` names every tenant's adapters: where keys (or a metrics token) are set, it answers
only to the metrics token or a key that sees every adapter on every route anyway (a global admin
key, a ``LORASWAP_API_KEYS`` user key), never to a tenant's, user or admin.
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
from .tenants import CURRENT, Principal, Tenancy
from .tenants.principal import ANONYMOUS

METRICS_PATH = "/metrics"


class AccessMiddleware:
    def __init__(self, app: Any, settings: Settings, tenancy: Tenancy | None = None) -> None:
        self.app = app
        self.settings = settings
        self.directory = (tenancy or Tenancy(settings)).directory
        self.inflight = 0

    def _scraper(self, presented: str | None) -> bool:
        """``presented`` is the metrics token (compared in constant time)."""
        token = self.settings.metrics_token
        return bool(token and presented and hmac.compare_digest(presented.encode(), token.encode()))

    def _metrics_allowed(self, principal: Principal | None, presented: str | None) -> bool:
        s = self.settings
        if not s.auth_metrics_route or not (self.directory.auth_required or s.metrics_token):
            return True
        if self._scraper(presented):
            return True
        return principal is not None and principal is not ANONYMOUS and principal.tenant is None

    def _allowed(self, access: str, principal: Principal | None, presented: str | None) -> bool:
        s = self.settings
        if access == "metrics":
            return self._metrics_allowed(principal, presented)
        if access == "open" or not self.directory.auth_required:
            return True
        if access == "health" and not s.auth_health_routes:
            return True
        if principal is None:
            return False
        if access == "operator":
            return principal.global_admin
        if access == "admin":
            return principal.admin
        return True

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
            code = 1008 if exc.status in (401, 403) else 1013
            await send({"type": "websocket.close", "code": code, "reason": exc.message[:120]})
            return
        await send_http(send, exc)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        self.directory.refresh_if_due()
        presented = self._presented_key(scope)
        if path.startswith(METRICS_PATH + "/"):  # the token in the path, for header-less scrapers
            presented = path[len(METRICS_PATH) + 1 :]
            if not self._scraper(presented):
                bad = ApiError(401, "not a metrics token", headers={"www-authenticate": "Bearer"})
                await self._reject(scope, receive, send, bad)
                return
            path = METRICS_PATH
            scope = {**scope, "path": path, "raw_path": path.encode()}
        principal = self.directory.authenticate(presented)
        access = access_of(path)
        if not self._allowed(access, principal, presented):
            if principal is None:
                error = ApiError(
                    401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                    headers={"www-authenticate": "Bearer"},
                )  # fmt: skip
            else:
                error = ApiError(403, "this key may not use this route")
            await self._reject(scope, receive, send, error)
            return
        token = CURRENT.set(principal or ANONYMOUS)
        try:
            await self._limited(scope, receive, send, path)
        finally:
            CURRENT.reset(token)

    async def _limited(self, scope: dict, receive: Any, send: Any, path: str) -> None:
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
