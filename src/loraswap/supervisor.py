"""Keeps an engine serving: starts it, builds the runtime on it, and when the engine dies
answers 503 "restarting" on every route, logs one line, and starts it again in-process.

vLLM's own server exits when its engine dies and leaves the restart to a supervisor; inside
BentoML nothing would restart it, so this does. Batch jobs pause on the 503 and resume on the
new engine; the adapter registry is rebuilt from its persisted document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import SimpleNamespace
from typing import Any

from .assembly import build_runtime
from .config import Settings
from .engine import Engine
from .info import ready_banner
from .runtime import Runtime
from .startup import StartPhases

logger = logging.getLogger(__name__)

RESTARTING = "the engine is restarting after a failure"


class EngineSupervisor:
    def __init__(
        self,
        app: Any,
        settings: Settings,
        engine: Engine,
        check_every_s: float = 1.0,
        max_failed_starts: int = 3,
    ) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine
        self.check_every_s = check_every_s
        self.max_failed_starts = max_failed_starts
        self.runtime: Runtime | None = None
        self.restarts = 0
        self.failed = False  # gave up: liveness turns false so the orchestrator takes over
        self._watch: asyncio.Task[None] | None = None

    @property
    def restarting(self) -> bool:
        return self.runtime is None and not self.failed

    async def start(self) -> None:
        phases = StartPhases()
        phases.begin()
        # The schema migrated and an older release's state imported before anything reads it.
        await asyncio.to_thread(self.app.state.tenancy.prepare)
        phases.mark("database")
        await self._bring_up(phases)
        logger.info(ready_banner(self.runtime, phases))
        self._watch = asyncio.create_task(self._watch_engine(), name="engine supervisor")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._take_down()
        await self.app.state.tenancy.limiter.close()  # hands this replica's in-flight leases back
        await asyncio.to_thread(self.app.state.tenancy.storage.close)

    async def hand_back_jobs(self) -> None:
        """A draining replica's batch jobs, released for another replica to resume."""
        if self.runtime is not None and self.runtime.batches is not None:
            await self.runtime.batches.hand_back()

    async def _bring_up(self, phases: StartPhases | None = None) -> None:
        await self.engine.start(phases)
        # vLLM's engine-error handler reads app.state.server (its uvicorn server, which it tells
        # to exit); here the supervisor restarts the engine, so a stand-in is enough.
        self.app.state.server = SimpleNamespace(should_exit=False)
        self.runtime = await build_runtime(self.app, self.settings, self.engine)
        self.app.state.runtime = self.runtime
        if phases is not None:
            phases.mark("routes and adapters")

    async def _take_down(self) -> None:
        runtime, self.runtime = self.runtime, None
        self.app.state.runtime = None
        if runtime is not None:
            await runtime.close()
        with contextlib.suppress(Exception):
            await self.engine.stop()

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(self.check_every_s)
            if self.runtime is not None and self.engine.dead:
                await self._restart()

    async def _restart(self) -> None:
        started = time.monotonic()
        logger.error("engine died; restarting it (requests get 503 until it is back)")
        self.app.state.unavailable = RESTARTING
        await self._take_down()
        for attempt in range(1, self.max_failed_starts + 1):
            try:
                await self._bring_up()
            except Exception as exc:
                logger.error("engine restart %d/%d failed: %s", attempt, self.max_failed_starts,
                             exc)  # fmt: skip
                with contextlib.suppress(Exception):
                    await self.engine.stop()
                await asyncio.sleep(min(30, 2**attempt))
                continue
            self.restarts += 1
            self.app.state.unavailable = None
            logger.info("engine restarted in %.1f s", time.monotonic() - started)
            return
        self.failed = True
        logger.error("engine could not be restarted; reporting not alive")
