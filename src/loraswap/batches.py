"""OpenAI Batch API (``/v1/files``, ``/v1/batches``) for large offline work.

Jobs and files are stored durably (SQLite + files under ``state_dir``); each finished line is
committed as it completes, so a restarted server resumes a job where it stopped. A job runs in
the background with bounded concurrency so interactive traffic keeps most of the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from .atomic import write_atomic
from .native.serving import NativeError, NativeServing
from .registry import dumps_error

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_FILE_BYTES = 100 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT, purpose TEXT, bytes INTEGER, created_at INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT, line INTEGER, ok INTEGER, output TEXT, PRIMARY KEY (batch_id, line)
);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class BatchError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class BatchStore:
    """Files and batch jobs on disk."""

    def __init__(self, state_dir: Path) -> None:
        self.files_dir = state_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(state_dir / "batches.sqlite", check_same_thread=False)
        self.db.executescript(SCHEMA)
        self.db.commit()

    # files
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = new_id("file")
        write_atomic(self.files_dir / file_id, data)
        row = (file_id, filename, purpose, len(data), int(time.time()))
        with self.db:
            self.db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", row)
        return self.file(file_id)

    def file(self, file_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise BatchError(404, f"no file {file_id!r}", "file_id")
        fid, filename, purpose, size, created = row
        return {"id": fid, "object": "file", "bytes": size, "created_at": created,
                "filename": filename, "purpose": purpose, "status": "processed"}  # fmt: skip

    def files(self) -> list[dict[str, Any]]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM files ORDER BY created_at DESC")]
        return [self.file(i) for i in ids]

    def content(self, file_id: str) -> bytes:
        self.file(file_id)
        return (self.files_dir / file_id).read_bytes()

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        with self.db:
            self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        (self.files_dir / file_id).unlink(missing_ok=True)

    # batches
    def save(self, batch: dict[str, Any]) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?)", (batch["id"], json.dumps(batch))
            )

    def batch(self, batch_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT body FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise BatchError(404, f"no batch {batch_id!r}", "batch_id")
        return json.loads(row[0])

    def batches(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT body FROM batches").fetchall()
        return sorted((json.loads(r[0]) for r in rows), key=lambda b: -b["created_at"])

    def done_lines(self, batch_id: str) -> dict[int, tuple[bool, str]]:
        rows = self.db.execute(
            "SELECT line, ok, output FROM results WHERE batch_id = ?", (batch_id,)
        )
        return {line: (bool(ok), output) for line, ok, output in rows}

    def record(self, batch_id: str, line: int, ok: bool, output: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), output),
            )


def parse_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input lines, and errors in the OpenAI batch ``errors.data`` shape."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            errors.append({"code": "invalid_json", "line": number, "message": "not JSON"})
            continue
        problem = None
        if not isinstance(item, dict):
            problem = "each line must be a JSON object"
        elif not isinstance(item.get("custom_id"), str) or item["custom_id"] in seen:
            problem = "custom_id must be a unique string"
        elif item.get("method") != "POST":
            problem = "method must be POST"
        elif item.get("url") != endpoint:
            problem = f"url must be the batch endpoint {endpoint}"
        elif not isinstance(item.get("body"), dict):
            problem = "body must be a JSON object"
        if problem:
            errors.append({"code": "invalid_request", "line": number, "message": problem})
            continue
        seen.add(item["custom_id"])
        lines.append(item)
    if not lines and not errors:
        errors.append({"code": "empty_file", "line": None, "message": "the input file is empty"})
    return lines, errors


class BatchRunner:
    """Creates, runs, resumes and cancels batch jobs inside the server process."""

    def __init__(self, state: Any, state_dir: Path, concurrency: int) -> None:
        self.state = state
        self.store = BatchStore(state_dir)
        self.concurrency = concurrency
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def resume(self) -> None:
        for batch in self.store.batches():
            if batch["status"] in ACTIVE:
                logger.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._start(batch["id"])

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BatchError(400, f"endpoint must be one of {list(ENDPOINTS)}", "endpoint")
        if body.get("completion_window", "24h") != "24h":
            raise BatchError(400, "completion_window must be 24h", "completion_window")
        input_file = self.store.file(str(body.get("input_file_id")))
        if input_file["purpose"] != "batch":
            raise BatchError(400, "the input file's purpose must be batch", "input_file_id")
        now = int(time.time())
        batch = {
            "id": new_id("batch"), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file["id"], "completion_window": "24h",
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }  # fmt: skip
        self.store.save(batch)
        self._start(batch["id"])
        return batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.batch(batch_id)
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            self.store.save(batch)
        return batch

    def _start(self, batch_id: str) -> None:
        task = asyncio.create_task(self._run(batch_id))
        self.tasks[batch_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(batch_id, None))

    async def _run(self, batch_id: str) -> None:
        try:
            await self._execute(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch %s failed", batch_id)
            batch = self.store.batch(batch_id)
            batch.update(status="failed", failed_at=int(time.time()))
            self.store.save(batch)

    async def _execute(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)
        lines, errors = parse_input(self.store.content(batch["input_file_id"]), batch["endpoint"])
        if errors:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": errors})  # fmt: skip
            self.store.save(batch)
            return
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(lines)
        self.store.save(batch)

        done = self.store.done_lines(batch_id)
        pending = [i for i in range(len(lines)) if i not in done]
        gate = asyncio.Semaphore(self.concurrency)
        serving = NativeServing(self.state)

        async def one(index: int) -> None:
            async with gate:
                if self.store.batch(batch_id)["status"] == "cancelling":
                    return
                ok, output = await self._call(serving, batch["endpoint"], lines[index])
                self.store.record(batch_id, index, ok, output)

        await asyncio.gather(*(one(i) for i in pending))
        self._finish(batch_id)

    async def _call(self, serving: NativeServing, endpoint: str, item: dict) -> tuple[bool, str]:
        body = dict(item["body"])
        request_id = new_id("batch_req")
        key = None
        try:
            if body.get("stream"):
                raise NativeError.of(400, "stream is not supported in a batch", param="stream")
            model, key = await serving.route_model(str(body.get("model", "")))
            body["model"] = model
            result = await serving.openai(endpoint, body)
            serving.record(key, ok=True)
            response = {"status_code": 200, "request_id": request_id, "body": result.model_dump()}
            line = {"id": request_id, "custom_id": item["custom_id"], "response": response,
                    "error": None}  # fmt: skip
            return True, json.dumps(line)
        except Exception as exc:  # one line's failure never fails the job
            serving.record(key, ok=False)
            if not isinstance(exc, NativeError):
                logger.exception("batch line %s failed", item["custom_id"])
                exc = NativeError.of(500, f"internal error: {exc}", "InternalServerError")
            error = exc.result.model_dump()
            response = {"status_code": error["error"]["code"], "request_id": request_id,
                        "body": error}  # fmt: skip
            line = {"id": request_id, "custom_id": item["custom_id"], "response": response,
                    "error": None}  # fmt: skip
            return False, json.dumps(line)

    def _finish(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)
        cancelled = batch["status"] == "cancelling"
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        self.store.save(batch)
        done = self.store.done_lines(batch_id)
        good = [done[i][1] for i in sorted(done) if done[i][0]]
        bad = [done[i][1] for i in sorted(done) if not done[i][0]]
        if good:
            data = ("\n".join(good) + "\n").encode()
            batch["output_file_id"] = self.store.add_file(
                f"{batch_id}_output.jsonl", "batch_output", data
            )["id"]
        if bad:
            data = ("\n".join(bad) + "\n").encode()
            batch["error_file_id"] = self.store.add_file(
                f"{batch_id}_error.jsonl", "batch_output", data
            )["id"]
        batch["request_counts"].update(completed=len(good), failed=len(bad))
        now = int(time.time())
        if cancelled:
            batch.update(status="cancelled", cancelled_at=now)
        else:
            batch.update(status="completed", completed_at=now)
        self.store.save(batch)


def runner_of(request: Request) -> BatchRunner:
    runner = getattr(request.app.state, "batches", None)
    if runner is None:
        raise BatchError(503, "the engine is still starting")
    return runner


ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}


async def batch_error_handler(_: Request, exc: BatchError) -> JSONResponse:
    body = dumps_error(exc.status, exc.message, ERROR_TYPES[exc.status], exc.param)
    return JSONResponse(json.loads(body), status_code=exc.status)


router = APIRouter(tags=["Batch API (OpenAI)"])


def install(app: FastAPI) -> None:
    """Add the Files and Batches routes and their OpenAI-shaped error handler to ``app``."""
    app.include_router(router)
    app.add_exception_handler(BatchError, batch_error_handler)


@router.post("/v1/files")
async def upload_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
):
    """Upload a JSONL batch input (``purpose=batch``), OpenAI Files API shape."""
    runner = runner_of(request)
    if purpose != "batch":
        raise BatchError(400, "only purpose=batch is supported", "purpose")
    data = await file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BatchError(400, f"files are limited to {MAX_FILE_BYTES} bytes", "file")
    return runner.store.add_file(file.filename or "upload.jsonl", purpose, data)


@router.get("/v1/files")
async def list_files(request: Request):
    return {"object": "list", "data": runner_of(request).store.files(), "has_more": False}


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request):
    return runner_of(request).store.file(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    data = runner_of(request).store.content(file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    runner_of(request).store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/v1/batches")
async def create_batch(request: Request):
    """Create a batch job from an uploaded file (OpenAI Batch API shape)."""
    try:
        body = await request.json()
    except ValueError:
        raise BatchError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise BatchError(400, "the body must be a JSON object")
    return runner_of(request).create(body)


@router.get("/v1/batches")
async def list_batches(request: Request):
    return {"object": "list", "data": runner_of(request).store.batches(), "has_more": False}


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request):
    return runner_of(request).store.batch(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    return runner_of(request).cancel(batch_id)
