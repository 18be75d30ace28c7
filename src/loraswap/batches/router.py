"""The OpenAI Files and Batch API routes (``/v1/files``, ``/v1/batches``).

Handlers are thin: they check the HTTP input and call the :class:`BatchRunner` of the app's
runtime. Every client error is an :class:`~loraswap.errors.ApiError`, rendered in the OpenAI
error shape by ``errors.install(app)``. Responses are the ``openai`` SDK's types with only the
fields we set (``response_model_exclude_unset``), so their JSON keys stay stable.
"""

from __future__ import annotations

from typing import Annotated

import pydantic
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from ..errors import ApiError
from ..pipeline import validation_message
from ..runtime import runtime_of
from ..tenants import current
from .protocol import (
    MAX_FILE_BYTES,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
)
from .runner import BatchRunner, scope_of

router = APIRouter(tags=["Batch API (OpenAI)"])


def runner_of(request: Request) -> BatchRunner:
    runner = runtime_of(request).batches
    if runner is None:
        raise ApiError.engine_starting()
    return runner


@router.post("/v1/files", response_model=FileObject, response_model_exclude_unset=True)
async def upload_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> FileObject:
    """Upload a JSONL batch input (``purpose=batch``), OpenAI Files API shape."""
    runner = runner_of(request)
    if purpose != "batch":
        raise ApiError(400, "only purpose=batch is supported", param="purpose")
    data = await file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ApiError(400, f"files are limited to {MAX_FILE_BYTES} bytes", param="file")
    return await runner.add_file(file.filename or "upload.jsonl", purpose, data, current().name)


@router.get("/v1/files", response_model=FileList, response_model_exclude_unset=True)
async def list_files(request: Request) -> FileList:
    return FileList.of(await runner_of(request).files(scope_of(current())))


@router.get("/v1/files/{file_id}", response_model=FileObject, response_model_exclude_unset=True)
async def retrieve_file(file_id: str, request: Request) -> FileObject:
    return await runner_of(request).file(file_id, scope_of(current()))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    data = await runner_of(request).content(file_id, scope_of(current()))
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, response_model_exclude_unset=True)
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    return await runner_of(request).delete_file(file_id, scope_of(current()))


@router.post("/v1/batches", response_model=Batch, response_model_exclude_unset=True)
async def create_batch(request: Request) -> Batch:
    """Create a batch job from an uploaded file (OpenAI Batch API shape)."""
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        create = BatchCreateRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        param = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise ApiError(400, validation_message(exc), param=param) from None
    return await runner_of(request).create(create, current())


@router.get("/v1/batches", response_model=BatchList, response_model_exclude_unset=True)
async def list_batches(request: Request) -> BatchList:
    return BatchList.of(await runner_of(request).batches(scope_of(current())))


@router.get("/v1/batches/{batch_id}", response_model=Batch, response_model_exclude_unset=True)
async def retrieve_batch(batch_id: str, request: Request) -> Batch:
    return await runner_of(request).batch(batch_id, scope_of(current()))


@router.post(
    "/v1/batches/{batch_id}/cancel", response_model=Batch, response_model_exclude_unset=True
)
async def cancel_batch(batch_id: str, request: Request) -> Batch:
    return await runner_of(request).cancel(batch_id, scope_of(current()))
