"""Typed objects of the Files and Batch APIs, and the JSONL line format.

Objects we return are the ``openai`` SDK's own types, so the SDK parses exactly what we send.
Input and output lines have the fields of vLLM's ``BatchRequestInput`` / ``BatchRequestOutput`` /
``BatchResponseData`` (``vllm.entrypoints.launchers.run_batch``) but keep ``body`` a plain dict:
vLLM's models validate the body by url (chat only) and accept neither completion nor error
bodies, while a line's bad body must become that line's 4xx error, not fail the job. Not
subclassing them also keeps vLLM out of import time.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Generic, Literal, TypeVar

from openai.types import Batch, BatchError, FileDeleted, FileObject
from openai.types.batch import Errors as BatchErrors
from openai.types.batch_request_counts import BatchRequestCounts
from pydantic import BaseModel, ConfigDict

T = TypeVar("T")

__all__ = [
    "Batch",
    "BatchCreateRequest",
    "BatchError",
    "BatchErrors",
    "BatchInputLine",
    "BatchList",
    "BatchOutputLine",
    "BatchRequestCounts",
    "BatchResponseData",
    "FileDeleted",
    "FileList",
    "FileObject",
]

MAX_FILE_BYTES = 100 << 20
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
# Statuses whose job still has work to do: resumed after a restart.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches`` body (the SDK's ``BatchCreateParams``); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str = COMPLETION_WINDOW
    metadata: dict[str, str] | None = None


class BatchInputLine(BaseModel):
    """One line of an input file (vLLM's ``BatchRequestInput`` with an unvalidated body)."""

    custom_id: str
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class BatchResponseData(BaseModel):
    """vLLM's ``BatchResponseData``; ``body`` is the response or the OpenAI error body."""

    status_code: int = 200
    request_id: str
    body: dict[str, Any] | None = None


class BatchOutputLine(BaseModel):
    """One line of an output or error file (vLLM's ``BatchRequestOutput``)."""

    id: str
    custom_id: str
    response: BatchResponseData | None
    error: Any | None = None


class Page(BaseModel, Generic[T]):
    """An OpenAI list object (one page: loraswap does not page these lists)."""

    object: Literal["list"]
    data: list[T]
    has_more: bool

    @classmethod
    def of(cls, data: list[T]) -> Page[T]:
        return cls(object="list", data=data, has_more=False)


FileList = Page[FileObject]
BatchList = Page[Batch]


def new_batch(
    endpoint: str, input_file_id: str, created: int, metadata: dict[str, str] | None
) -> Batch:
    """A new job; every field is set, so its JSON has all of today's keys (``null`` or not)."""
    return Batch(
        id=new_id("batch"), object="batch", endpoint=endpoint, errors=None,
        input_file_id=input_file_id, completion_window=COMPLETION_WINDOW,
        status="validating", output_file_id=None, error_file_id=None,
        created_at=created, in_progress_at=None, expires_at=created + WINDOW_SECONDS,
        finalizing_at=None, completed_at=None, failed_at=None, expired_at=None,
        cancelling_at=None, cancelled_at=None,
        request_counts=BatchRequestCounts(total=0, completed=0, failed=0),
        metadata=metadata,
    )  # fmt: skip


def output_line(request_id: str, custom_id: str, status: int, body: dict[str, Any]) -> str:
    """One JSONL line of an output (2xx) or error (4xx/5xx, OpenAI error ``body``) file."""
    response = BatchResponseData(status_code=status, request_id=request_id, body=body)
    return BatchOutputLine(id=request_id, custom_id=custom_id, response=response).model_dump_json()


def _line_problem(item: Any, endpoint: str, seen: set[str]) -> str | None:
    if not isinstance(item, dict):
        return "each line must be a JSON object"
    if not isinstance(item.get("custom_id"), str) or item["custom_id"] in seen:
        return "custom_id must be a unique string"
    if item.get("method") != "POST":
        return "method must be POST"
    if item.get("url") != endpoint:
        return f"url must be the batch endpoint {endpoint}"
    if not isinstance(item.get("body"), dict):
        return "body must be a JSON object"
    return None


def parse_input(data: bytes, endpoint: str) -> tuple[list[BatchInputLine], list[BatchError]]:
    """The lines of an input file, and its errors in the OpenAI ``errors.data`` shape.

    Only the line's envelope is checked here; its body is checked when the line runs, so a bad
    body fails that line alone.
    """
    lines: list[BatchInputLine] = []
    errors: list[BatchError] = []
    seen: set[str] = set()
    text = data.decode("utf-8", errors="replace")
    for number, raw in enumerate(text.split("\n"), 1):  # JSONL: only \n ends a line
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            errors.append(BatchError(code="invalid_json", line=number, message="not JSON"))
            continue
        problem = _line_problem(item, endpoint, seen)
        if problem:
            errors.append(BatchError(code="invalid_request", line=number, message=problem))
            continue
        seen.add(item["custom_id"])
        lines.append(BatchInputLine.model_validate(item))
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", line=None, message="the input file is empty"))
    return lines, errors
