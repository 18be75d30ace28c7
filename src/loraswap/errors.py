"""One client-visible error type, rendered as vLLM's ``ErrorResponse`` (the OpenAI error shape).

Every route raises :class:`ApiError`; FastAPI routes get it rendered by :func:`install`, raw ASGI
code (middlewares, WebSocket) sends it with :func:`send_http`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A failure the client sees: status, message, OpenAI error type and the offending param."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or ERROR_TYPES.get(status, "BadRequestError")
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ApiError:
        """From an OpenAI-shaped error body (vLLM's ``ErrorResponse.model_dump()``)."""
        err = body.get("error") or {}
        return cls(
            int(err.get("code") or 500),
            str(err.get("message", "")),
            err.get("type"),
            err.get("param"),
        )

    @classmethod
    def engine_starting(cls, message: str = "the engine is still starting") -> ApiError:
        return EngineUnavailable(message)


class EngineUnavailable(ApiError):
    """503: the engine is starting, or restarting after a failure. Retryable: batch lines that
    meet it are not recorded, and their job resumes with the engine."""

    def __init__(self, message: str = "the engine is restarting after a failure") -> None:
        super().__init__(503, message, headers={"retry-after": "5"})


def raise_if_cancelling() -> None:
    """Raise CancelledError when this task is being cancelled. vLLM answers a cancelled request
    with an error ("Client disconnected") instead of raising the cancellation: for background
    work stopped on purpose (a shadow preempted, a batch job handed back) that error is the
    cancellation, not the work's failure."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from None


async def send_http(send: Any, exc: ApiError) -> None:
    """Answer a raw ASGI HTTP request with ``exc``."""
    body = exc.to_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in exc.headers.items()),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _render(_: Any, exc: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install(app: Any) -> None:
    """Render :class:`ApiError` raised by any FastAPI route of ``app`` (no vLLM import: the
    BentoML CLI imports the service too, and vLLM costs it ~12 s)."""
    app.add_exception_handler(ApiError, _render)


def install_vllm(app: Any) -> None:
    """vLLM's own exception handlers, then ours over them: a dead engine (vLLM's
    ``EngineDeadError``, whose own handler expects vLLM's server object) is a 503. Called when
    the engine first attaches; the middleware stack is rebuilt if a request already built it."""
    from . import vllm_compat

    async def engine_dead(request: Any, _: Exception) -> Any:
        return await _render(request, EngineUnavailable())

    vllm_compat.init_exception_handler(app)
    app.add_exception_handler(ApiError, _render)
    app.add_exception_handler(vllm_compat.EngineDeadError, engine_dead)
    app.middleware_stack = None  # Starlette copies the handlers when it builds the stack
