"""Creates, runs, resumes and cancels batch jobs inside the server process.

Each line goes through the same :class:`~loraswap.pipeline.RequestPipeline` as an interactive
request (limits, adapter resolution and loading, per-adapter metrics), so a batch cannot do
what a client could not. A job runs in the background with bounded concurrency so interactive
traffic keeps most of the engine; one line's failure never fails the job. All store access
runs in a thread: SQLite and file I/O must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ApiError, EngineUnavailable, raise_if_cancelling
from ..routes import BATCH_ENDPOINTS
from ..tenants import CURRENT, Principal
from ..tenants.principal import ANONYMOUS
from .protocol import (
    CANCELLABLE,
    COMPLETION_WINDOW,
    Batch,
    BatchCreateRequest,
    BatchError,
    BatchErrors,
    BatchInputLine,
    BatchRequestCounts,
    FileDeleted,
    FileObject,
    new_batch,
    new_id,
    output_line,
    parse_input,
)
from .store import BatchStore

logger = logging.getLogger(__name__)


class LinePipeline(Protocol):
    """What the runner needs of :class:`~loraswap.pipeline.RequestPipeline`."""

    interactive: int  # client requests in flight: batch lines beyond the floor wait for 0

    async def run(
        self, path: str, body: dict[str, Any], raw: Any = None, background: bool = False
    ) -> Any: ...


@dataclass
class Job:
    """A job running in this process; ``cancelled`` stops it starting more lines."""

    task: asyncio.Task[None] | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def now() -> int:
    return int(time.time())


def move(batch: Batch, status: str) -> None:
    """Set ``status`` and its ``<status>_at`` time (each status a job moves to has one)."""
    batch.status = status  # type: ignore[assignment]
    setattr(batch, f"{status}_at", now())


def replica_id() -> str:
    """This process among the replicas: the pod's host name and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def scope_of(viewer: Principal) -> str | None:
    """Whose files and jobs ``viewer`` sees: a tenant only its own, unrestricted keys all."""
    return None if viewer.tenant is None else viewer.name


class BatchRunner:
    """The Files and Batch APIs' operations; jobs run as tasks on the caller's event loop.

    Files and jobs belong to the principal that created them; a job's lines run as its owner
    (its adapters, its usage, its batch token budget)."""

    def __init__(
        self,
        pipeline: LinePipeline,
        store: BatchStore,
        concurrency: int,
        idle_concurrency: int = 0,
        principal_of: Callable[[str | None], Principal] = lambda _: ANONYMOUS,
        replica: str | None = None,
        lease_s: float = 30.0,
        poll_s: float = 5.0,
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.principal_of = principal_of
        self.concurrency = max(1, concurrency)  # lines in flight whatever else runs
        self.idle_concurrency = max(self.concurrency, idle_concurrency)  # while clients are idle
        self.replica = replica or replica_id()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.jobs: dict[str, Job] = {}
        self._poller: asyncio.Task[None] | None = None
        self.handed_back = False  # draining: jobs are left to other replicas

    # ----- files ---------------------------------------------------------------------------
    async def add_file(self, filename: str, purpose: str, data: bytes, owner: str) -> FileObject:
        return await asyncio.to_thread(self.store.add_file, filename, purpose, data, owner)

    async def files(self, scope: str | None) -> list[FileObject]:
        return await asyncio.to_thread(self.store.files, scope)

    async def _visible(self, object_id: str, scope: str | None) -> bool:
        return scope is None or await asyncio.to_thread(self.store.owner, object_id) == scope

    async def file(self, file_id: str, scope: str | None, param: str = "file_id") -> FileObject:
        found = await asyncio.to_thread(self.store.file, file_id)
        if found is None or not await self._visible(file_id, scope):
            raise ApiError(404, f"no file {file_id!r}", param=param)
        return found

    async def content(self, file_id: str, scope: str | None) -> bytes:
        await self.file(file_id, scope)
        data = await asyncio.to_thread(self.store.content, file_id)
        if data is None:
            raise ApiError(404, f"no file {file_id!r}", param="file_id")
        return data

    async def delete_file(self, file_id: str, scope: str | None) -> FileDeleted:
        await self.file(file_id, scope)
        if not await asyncio.to_thread(self.store.delete_file, file_id):
            raise ApiError(404, f"no file {file_id!r}", param="file_id")
        return FileDeleted(id=file_id, object="file", deleted=True)

    # ----- batches -------------------------------------------------------------------------
    async def batches(self, scope: str | None = None) -> list[Batch]:
        return await asyncio.to_thread(self.store.batches, scope)

    async def batch(self, batch_id: str, scope: str | None = None) -> Batch:
        found = await asyncio.to_thread(self.store.batch, batch_id)
        if found is None or not await self._visible(batch_id, scope):
            raise ApiError(404, f"no batch {batch_id!r}", param="batch_id")
        return found

    async def create(self, request: BatchCreateRequest, owner: Principal) -> Batch:
        """Check and store a new job, then start it in the background."""
        if request.endpoint not in BATCH_ENDPOINTS:
            raise ApiError(
                400, f"endpoint must be one of {list(BATCH_ENDPOINTS)}", param="endpoint"
            )
        if request.completion_window != COMPLETION_WINDOW:
            raise ApiError(
                400, f"completion_window must be {COMPLETION_WINDOW}", param="completion_window"
            )
        input_file = await self.file(request.input_file_id, scope_of(owner), param="input_file_id")
        if input_file.purpose != "batch":
            raise ApiError(400, "the input file's purpose must be batch", param="input_file_id")
        batch = new_batch(request.endpoint, input_file.id, now(), request.metadata)
        lease = None if self.handed_back else (self.replica, self.lease_s)
        await asyncio.to_thread(self.store.add_batch, batch, owner.name, lease)
        if lease is not None:  # a draining replica stores it for another to take
            self._start(batch.id)
        return batch

    async def cancel(self, batch_id: str, scope: str | None = None) -> Batch:
        """Stop starting lines; lines in flight finish and are kept in the output. Works from
        any replica: the one running the job sees the status at its next heartbeat."""
        await self.batch(batch_id, scope)

        def cancelling(batch: Batch) -> None:
            if batch.status in CANCELLABLE:
                move(batch, "cancelling")

        batch = await asyncio.to_thread(self.store.update, batch_id, cancelling)
        if batch is None:
            raise ApiError(404, f"no batch {batch_id!r}", param="batch_id")
        job = self.jobs.get(batch_id)
        if job is not None and batch.status == "cancelling":
            job.cancelled.set()
        return batch

    async def resume(self) -> None:
        """Take and start the unfinished jobs nobody holds: left by a stopped process, handed
        back, or held by a replica that stopped renewing its lease."""
        for batch_id in await asyncio.to_thread(self.store.claimable):
            if batch_id in self.jobs:
                continue
            if await asyncio.to_thread(self.store.claim, batch_id, self.replica, self.lease_s):
                logger.info("batch %s taken by replica %s", batch_id, self.replica)
                self._start(batch_id)

    def start_polling(self) -> None:
        """Resume now, then look for jobs nobody holds every ``poll_s`` seconds."""
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="batch poller")

    async def _poll(self) -> None:
        while True:
            try:
                await self.resume()
            except Exception:  # the database away for a moment: try again at the next poll
                logger.exception("looking for batch jobs failed")
            await asyncio.sleep(self.poll_s)

    async def hand_back(self) -> None:
        """Stop every job where it is, release its lease and take no more: any replica
        resumes it (a draining replica's lines finished so far stay recorded, once)."""
        self.handed_back = True
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        if self._poller is not None:
            tasks.append(self._poller)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Hand every job back and close the store."""
        await self.hand_back()
        await asyncio.to_thread(self.store.close)

    # ----- running -------------------------------------------------------------------------
    def _start(self, batch_id: str) -> None:
        job = Job()
        self.jobs[batch_id] = job
        job.task = asyncio.create_task(self._run(batch_id, job), name=f"batch {batch_id}")
        job.task.add_done_callback(lambda _: self.jobs.pop(batch_id, None))

    async def _run(self, batch_id: str, job: Job) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(batch_id, job))
        try:
            await self._execute(batch_id, job)
        except asyncio.CancelledError:
            raise
        except EngineUnavailable:
            logger.info("batch %s paused: the engine is unavailable; it resumes with it", batch_id)
        except Exception:
            logger.exception("batch %s failed", batch_id)
            await asyncio.to_thread(self.store.update, batch_id, lambda b: move(b, "failed"))
        finally:
            heartbeat.cancel()
            await asyncio.shield(asyncio.to_thread(self.store.release, batch_id, self.replica))

    async def _heartbeat(self, batch_id: str, job: Job) -> None:
        """Renew the lease; stop the job when it was lost (another replica runs it now) and
        stop starting lines when another replica cancelled it."""
        while True:
            await asyncio.sleep(min(self.lease_s / 3, 5.0))
            try:
                status = await asyncio.to_thread(
                    self.store.renew, batch_id, self.replica, self.lease_s
                )
            except Exception:
                logger.warning("batch %s: renewing the lease failed", batch_id, exc_info=True)
                continue
            if status is None:
                logger.warning("batch %s: lease lost, another replica runs it", batch_id)
                job.cancelled.set()
                if job.task is not None:
                    job.task.cancel()
                return
            if status == "cancelling":
                job.cancelled.set()

    def _read_input(self, batch: Batch) -> tuple[list[BatchInputLine], list[BatchError]]:
        data = self.store.content(batch.input_file_id)
        if data is None:
            raise FileNotFoundError(f"input file {batch.input_file_id} is gone")
        return parse_input(data, batch.endpoint)

    async def _execute(self, batch_id: str, job: Job) -> None:
        owner = await asyncio.to_thread(self.store.owner, batch_id)
        CURRENT.set(self.principal_of(owner))  # this task's lines run as the job's owner
        batch = await self.batch(batch_id)
        lines, errors = await asyncio.to_thread(self._read_input, batch)
        if errors:

            def invalid(batch: Batch) -> None:
                move(batch, "failed")
                batch.errors = BatchErrors(object="list", data=errors)

            await asyncio.to_thread(self.store.update, batch_id, invalid)
            return
        done = await asyncio.to_thread(self.store.done_lines, batch_id)

        def started(batch: Batch) -> None:
            if batch.status == "validating":
                move(batch, "in_progress")
            completed = sum(done.values())
            batch.request_counts = BatchRequestCounts(
                total=len(lines), completed=completed, failed=len(done) - completed
            )

        batch = await asyncio.to_thread(self.store.update, batch_id, started)
        if batch is None:
            return
        if batch.status == "cancelling":
            job.cancelled.set()
        pending = collections.deque(i for i in range(len(lines)) if i not in done)

        async def worker(spare: bool) -> None:
            """``spare`` workers take a line only while no client request is in flight."""
            try:
                while True:
                    while spare and self.pipeline.interactive > 0 and pending:
                        if job.cancelled.is_set():
                            return
                        await asyncio.sleep(0.2)
                    if job.cancelled.is_set() or not pending:
                        return
                    index = pending.popleft()  # shared: each index goes to exactly one worker
                    ok, output = await self._line(batch_id, batch.endpoint, lines[index])
                    await asyncio.to_thread(self.store.record, batch_id, index, ok, output)
            except BaseException:
                job.cancelled.set()  # the job is failing: the other workers stop too
                raise

        await asyncio.gather(*(worker(i >= self.concurrency) for i in range(self.idle_concurrency)))
        await self._finish(batch_id)

    async def _line(self, batch_id: str, endpoint: str, item: BatchInputLine) -> tuple[bool, str]:
        """Run one line; its output line, and whether it succeeded."""
        request_id = new_id("batch_req")
        try:
            if item.body.get("stream"):
                raise ApiError(400, "stream is not supported in a batch", param="stream")
            result = await self.pipeline.run(endpoint, dict(item.body), background=True)
            status, body, ok = 200, result.model_dump(mode="json"), True
        except EngineUnavailable:
            raise  # not the line's fault: it stays pending and runs when the engine is back
        except ApiError as exc:
            raise_if_cancelling()  # handed back or its lease lost: the line stays pending
            status, body, ok = exc.status, exc.body(), False
        except Exception as exc:  # one line's failure never fails the job
            logger.error("batch %s line %r failed: %r", batch_id, item.custom_id, exc)
            error = ApiError(500, f"internal error: {exc}")
            status, body, ok = error.status, error.body(), False
        return ok, output_line(request_id, item.custom_id, status, body)

    async def _finish(self, batch_id: str) -> None:
        was_cancelling = False

        def finalizing(batch: Batch) -> None:
            nonlocal was_cancelling
            was_cancelling = batch.status == "cancelling"
            move(batch, "finalizing")

        await asyncio.to_thread(self.store.update, batch_id, finalizing)
        output, error = await asyncio.to_thread(self.store.write_results, batch_id)

        def finished(batch: Batch) -> None:
            batch.output_file_id = output.id if output else None
            batch.error_file_id = error.id if error else None
            move(batch, "cancelled" if was_cancelling else "completed")

        await asyncio.to_thread(self.store.update, batch_id, finished)
