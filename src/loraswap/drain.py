"""SIGTERM as a drain, for rolling updates that drop nothing.

uvicorn's own SIGTERM handling stops accepting at once and waits for open connections; behind a
balancer that still sends to this replica for a moment, the requests of that moment hang or
fail. Here SIGTERM first turns readiness off (balancers and Kubernetes stop sending), keeps
serving what still arrives for ``drain_notice_s``, hands batch jobs back (another replica
resumes them from the shared database), waits up to ``drain_s`` for requests in flight,
streams included, and only then hands over to uvicorn's shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
UNTRACKED = ("/livez", "/readyz", "/metrics", "/health")


class Drain:
    """The replica's drain state: requests in flight and whether SIGTERM arrived."""

    def __init__(self, drain_s: float, notice_s: float) -> None:
        self.drain_s = drain_s
        self.notice_s = notice_s
        self.draining = False
        self.inflight = 0
        self._task: asyncio.Task[None] | None = None

    def install(self, before_wait: Hook) -> None:
        """Take SIGTERM over from uvicorn (called in the start hook, after uvicorn set its
        handler); ``before_wait`` runs once the drain starts (hands batch jobs back)."""
        loop = asyncio.get_running_loop()
        uvicorn_exit = signal.getsignal(signal.SIGTERM)

        def exit_now() -> None:
            if callable(uvicorn_exit):
                uvicorn_exit(signal.SIGTERM, None)
            else:  # no server loop to stop (a bare process): leave as the default would
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            if self._task is not None:  # a second SIGTERM: stop without waiting
                exit_now()
                return
            loop.call_soon_threadsafe(self._start, before_wait, exit_now)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start(self, before_wait: Hook, done: Callable[[], None]) -> None:
        self._task = asyncio.create_task(self.run(before_wait, done), name="drain")

    async def run(self, before_wait: Hook, done: Callable[[], None]) -> None:
        """Not ready at once; ``before_wait`` beside the wait for requests in flight; all of
        it within ``drain_s`` (after ``notice_s`` at least), then ``done``."""
        started = time.monotonic()
        self.draining = True
        logger.info("SIGTERM: draining (not ready; %d requests in flight)", self.inflight)
        handing = asyncio.create_task(before_wait())
        await asyncio.sleep(max(0.0, self.notice_s - (time.monotonic() - started)))
        while self.inflight and time.monotonic() - started < self.drain_s:
            await asyncio.sleep(0.05)
        left = max(0.0, self.drain_s - (time.monotonic() - started))
        try:
            await asyncio.wait_for(handing, timeout=max(left, 1.0))
        except Exception:  # a timeout too: the leases expire instead, and another replica resumes
            logger.exception("handing batch jobs back failed; their leases expire instead")
        if self.inflight:
            logger.warning("drain: %d requests still in flight after %.0f s; stopping",
                           self.inflight, self.drain_s)  # fmt: skip
        else:
            logger.info("drained in %.1f s", time.monotonic() - started)
        done()


class DrainMiddleware:
    """Counts the requests in flight (a stream until its last byte); health and metrics
    probes are not counted."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(UNTRACKED):
            await self.app(scope, receive, send)
            return
        self.drain.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1
