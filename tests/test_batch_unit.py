"""The Batch API without the engine: a fake pipeline behind the real runner, store and router."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pydantic
import pytest
from fastapi import FastAPI

from loraswap import errors
from loraswap.batches import BatchRunner, BatchStore, router
from loraswap.batches.protocol import Batch, BatchCreateRequest
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.pipeline import RequestPipeline
from loraswap.storage import Storage
from loraswap.tenants.principal import ANONYMOUS

DONE = ("completed", "failed", "cancelled", "expired")
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
BATCH_KEYS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "request_counts", "metadata",
}  # fmt: skip


class FakeResponse(pydantic.BaseModel):
    object: str = "text_completion"
    model: str
    text: str


class FakePipeline:
    """``RequestPipeline.run`` stand-in: ``model`` picks the outcome, ``gates`` hold lines."""

    def __init__(self, gates: dict[str, asyncio.Event] | None = None) -> None:
        self.calls: list[str] = []
        self.gates = gates or {}
        self.interactive = 0
        self.in_flight = self.peak = 0

    async def run(
        self, path: str, body: dict[str, Any], raw: Any = None, background: bool = False
    ) -> Any:
        assert background, "batch lines are background work"
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self._answer(body)
        finally:
            self.in_flight -= 1

    async def _answer(self, body: dict[str, Any]) -> Any:
        prompt = body["prompt"]
        self.calls.append(prompt)
        await asyncio.sleep(0.01)
        if prompt in self.gates:
            await self.gates[prompt].wait()
        if body["model"] == "bad":
            raise ApiError(400, "temperature must be >= 0", param="temperature")
        if body["model"] == "boom":
            raise RuntimeError("kaput")
        return FakeResponse(model=body["model"], text=f"echo {prompt}")


class LimitOnlyPipeline(RequestPipeline):
    """The real pipeline's admission (limits) with vLLM replaced by an echo."""

    async def call_vllm(self, path: str, body: dict[str, Any], raw: Any) -> Any:
        return FakeResponse(model=body["model"], text=body["prompt"])


def item(custom_id: str, model: str = "base", **body: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": custom_id, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def jsonl(*items: Any) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


async def start(runner: BatchRunner, data: bytes) -> Batch:
    uploaded = await runner.add_file("in.jsonl", "batch", data, "anonymous")
    request = BatchCreateRequest(input_file_id=uploaded.id, endpoint="/v1/completions")
    return await runner.create(request, ANONYMOUS)


async def wait_for(runner: BatchRunner, batch_id: str, done: Any = None) -> Batch:
    done = done or (lambda b: b.status in DONE)
    for _ in range(1000):
        batch = await runner.batch(batch_id)
        if done(batch):
            return batch
        await asyncio.sleep(0.005)
    raise AssertionError(f"batch {batch_id} stuck: {batch}")


async def lines_of(runner: BatchRunner, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in (await runner.content(file_id, None)).decode().splitlines()]


def counts(batch: Batch) -> tuple[int, int, int]:
    c = batch.request_counts
    assert c is not None
    return c.total, c.completed, c.failed


def test_invalid_lines_fail_the_job(tmp_path: Path) -> None:
    async def main() -> None:
        pipeline = FakePipeline()
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path)), 2)
        bad_method = {**item("a"), "method": "GET"}
        data = jsonl(bad_method, "not json", "", item("b"), item("b"), {**item("c"), "url": "/x"})
        batch = await wait_for(runner, (await start(runner, data)).id)
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data is not None
        found = [(e.line, e.code) for e in batch.errors.data]
        assert found == [(1, "invalid_request"), (2, "invalid_json"), (5, "invalid_request"),
                         (6, "invalid_request")]  # fmt: skip
        shape = batch.model_dump(mode="json", exclude_unset=True)
        assert set(shape) == BATCH_KEYS
        assert set(shape["errors"]["data"][0]) == {"code", "line", "message"}
        assert pipeline.calls == []

        empty = await wait_for(runner, (await start(runner, b"\n\n")).id)
        assert empty.status == "failed" and empty.errors and empty.errors.data
        assert [(e.code, e.line) for e in empty.errors.data] == [("empty_file", None)]
        await runner.close()

    asyncio.run(main())


def test_mixed_job_completes_with_counts_and_files(tmp_path: Path, caplog) -> None:
    async def main() -> None:
        runner = BatchRunner(FakePipeline(), BatchStore(Storage.local(tmp_path)), 3)
        data = jsonl(item("ok-1"), item("bad", "bad"), item("boom", "boom"), item("ok-2"),
                     item("streamed", stream=True))  # fmt: skip
        batch = await wait_for(runner, (await start(runner, data)).id)
        assert batch.status == "completed" and batch.completed_at is not None
        assert counts(batch) == (5, 2, 3)
        outputs = await lines_of(runner, batch.output_file_id)
        assert [o["custom_id"] for o in outputs] == ["ok-1", "ok-2"]
        assert outputs[0]["response"]["status_code"] == 200
        assert outputs[0]["response"]["body"]["text"] == "echo ok-1"
        assert outputs[0]["id"] == outputs[0]["response"]["request_id"]
        failures = {
            o["custom_id"]: o["response"] for o in await lines_of(runner, batch.error_file_id)
        }
        assert {k: v["status_code"] for k, v in failures.items()} == {
            "bad": 400, "boom": 500, "streamed": 400}  # fmt: skip
        assert failures["bad"]["body"]["error"] == {
            "message": "temperature must be >= 0", "type": "BadRequestError",
            "param": "temperature", "code": 400}  # fmt: skip
        assert failures["boom"]["body"]["error"]["type"] == "InternalServerError"
        assert failures["streamed"]["body"]["error"]["param"] == "stream"
        output_file = await runner.file(batch.output_file_id or "", None)
        assert output_file.purpose == "batch_output"
        await runner.close()

    with caplog.at_level(logging.INFO, logger="loraswap.batches"):
        asyncio.run(main())
    logged = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None and "kaput" in logged[0].getMessage()


def test_lines_go_through_the_pipeline_limits(tmp_path: Path) -> None:
    async def main() -> None:
        pipeline = LimitOnlyPipeline(Settings(max_tokens_limit=16))
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path)), 2)
        data = jsonl(item("small", max_tokens=8), item("huge", max_tokens=10_000))
        batch = await wait_for(runner, (await start(runner, data)).id)
        assert batch.status == "completed" and counts(batch) == (2, 1, 1)
        (error,) = await lines_of(runner, batch.error_file_id)
        assert error["custom_id"] == "huge" and error["response"]["status_code"] == 400
        assert error["response"]["body"]["error"]["param"] == "max_tokens"
        await runner.close()

    asyncio.run(main())


def test_counts_move_while_the_job_runs(tmp_path: Path) -> None:
    async def main() -> None:
        gates = {name: asyncio.Event() for name in ("a", "b", "c")}
        runner = BatchRunner(FakePipeline(gates), BatchStore(Storage.local(tmp_path)), 3)
        batch_id = (await start(runner, jsonl(item("a"), item("b", "bad"), item("c")))).id
        gates["a"].set()
        batch = await wait_for(runner, batch_id, lambda b: counts(b)[1] == 1)
        assert batch.status == "in_progress" and counts(batch) == (3, 1, 0)
        gates["b"].set()
        batch = await wait_for(runner, batch_id, lambda b: counts(b)[2] == 1)
        assert batch.status == "in_progress" and counts(batch) == (3, 1, 1)
        gates["c"].set()
        batch = await wait_for(runner, batch_id)
        assert batch.status == "completed" and counts(batch) == (3, 2, 1)
        await runner.close()

    asyncio.run(main())


def test_cancel_keeps_finished_lines_and_starts_no_more(tmp_path: Path) -> None:
    async def main() -> None:
        names = [f"r{i}" for i in range(6)]
        gates = {name: asyncio.Event() for name in names}
        pipeline = FakePipeline(gates)
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path)), 1)
        batch_id = (await start(runner, jsonl(*map(item, names)))).id
        gates["r0"].set()
        await wait_for(runner, batch_id, lambda b: counts(b)[1] == 1)
        cancelling = await runner.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        gates["r1"].set()  # in flight when cancelled: it finishes and is kept
        batch = await wait_for(runner, batch_id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert counts(batch) == (6, 2, 0) and pipeline.calls == ["r0", "r1"]
        assert [o["custom_id"] for o in await lines_of(runner, batch.output_file_id)] == names[:2]
        assert (await runner.cancel(batch_id)).status == "cancelled"  # no-op once done
        with pytest.raises(ApiError) as missing:
            await runner.cancel("batch_missing")
        assert missing.value.status == 404
        await runner.close()

    asyncio.run(main())


def test_resume_after_restart_runs_only_the_remaining_lines(tmp_path: Path) -> None:
    names = [f"r{i}" for i in range(6)]

    async def first_life() -> str:
        gates = {name: asyncio.Event() for name in names[3:]}  # never opened
        runner = BatchRunner(FakePipeline(gates), BatchStore(Storage.local(tmp_path)), 2)
        batch_id = (await start(runner, jsonl(*map(item, names)))).id
        await wait_for(runner, batch_id, lambda b: counts(b)[1] == 3)
        await runner.close()  # the process stops with r3, r4 in flight
        return batch_id

    async def second_life(batch_id: str) -> None:
        pipeline = FakePipeline()
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path)), 2)
        assert (await runner.batch(batch_id)).status == "in_progress"
        await runner.resume()
        batch = await wait_for(runner, batch_id)
        assert batch.status == "completed" and counts(batch) == (6, 6, 0)
        assert sorted(pipeline.calls) == names[3:]
        assert [o["custom_id"] for o in await lines_of(runner, batch.output_file_id)] == names
        await runner.close()

    asyncio.run(second_life(asyncio.run(first_life())))


class DisconnectingPipeline(FakePipeline):
    """vLLM's way with a cancelled request: its serving layer catches the cancellation and
    answers an error ("Client disconnected") instead of raising it."""

    async def _answer(self, body: dict[str, Any]) -> Any:
        try:
            return await super()._answer(body)
        except asyncio.CancelledError:
            raise ApiError(400, "Client disconnected") from None


def test_a_handed_back_job_keeps_its_lines_in_flight_pending(tmp_path: Path) -> None:
    """A draining replica hands its job back with lines in flight: vLLM answers them
    "Client disconnected", and they must stay pending for the next replica, not fail."""
    names = [f"r{i}" for i in range(6)]

    async def first_life() -> str:
        gates = {name: asyncio.Event() for name in names[3:]}  # never opened
        pipeline = DisconnectingPipeline(gates)
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path)), 2)
        batch_id = (await start(runner, jsonl(*map(item, names)))).id
        await wait_for(runner, batch_id, lambda b: counts(b)[1] == 3)
        while pipeline.in_flight < 2:
            await asyncio.sleep(0.005)
        # r3, r4 in flight; a hand-back that took their error answers for results would go
        # on to r5, which never ends
        await asyncio.wait_for(runner.hand_back(), 10)
        await runner.close()
        return batch_id

    async def second_life(batch_id: str) -> None:
        runner = BatchRunner(FakePipeline(), BatchStore(Storage.local(tmp_path)), 2)
        await runner.resume()
        batch = await wait_for(runner, batch_id)
        assert batch.status == "completed" and counts(batch) == (6, 6, 0)
        await runner.close()

    asyncio.run(second_life(asyncio.run(first_life())))


class ThreadRecordingStore(BatchStore):
    """Records the thread of every public store call."""

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            object.__getattribute__(self, "threads").add(threading.get_ident())
            return attr(*args, **kwargs)

        return recorded


def test_store_calls_run_off_the_event_loop(tmp_path: Path) -> None:
    store = ThreadRecordingStore(Storage.local(tmp_path / "state"))
    store.threads = set()
    assert not (tmp_path / "state").exists()  # building the store does no I/O

    async def main() -> int:
        runner = BatchRunner(FakePipeline(), store, 2)
        batch = await wait_for(runner, (await start(runner, jsonl(item("a"), item("b")))).id)
        await runner.cancel(batch.id)
        await runner.batches()
        await runner.files(None)
        await runner.content(batch.output_file_id or "", None)
        await runner.delete_file(batch.output_file_id or "", None)
        await runner.resume()
        await runner.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert store.threads and loop_thread not in store.threads


def sdk_app(runner: BatchRunner | None) -> tuple[FastAPI, openai.AsyncOpenAI]:
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.runtime = SimpleNamespace(batches=runner)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return app, openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http)


def test_routes_through_the_openai_sdk(tmp_path: Path) -> None:
    async def main() -> None:
        runner = BatchRunner(FakePipeline(), BatchStore(Storage.local(tmp_path)), 2)
        app, client = sdk_app(runner)
        path = tmp_path / "in.jsonl"
        path.write_bytes(jsonl(item("ok"), item("bad", "bad")))
        uploaded = await client.files.create(file=path.open("rb"), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/completions",
            completion_window="24h",
            metadata={"job": "t"},
        )
        assert batch.status == "validating" and batch.metadata == {"job": "t"}
        batch = await wait_for(runner, batch.id)
        got = await client.batches.retrieve(batch.id)
        assert got.status == "completed" and counts(got) == (2, 1, 1)
        content = await client.files.content(got.output_file_id or "")
        assert json.loads(content.text)["custom_id"] == "ok"
        assert batch.id in [b.id for b in (await client.batches.list()).data]
        assert uploaded.id in [f.id for f in (await client.files.list()).data]
        assert (await client.files.retrieve(uploaded.id)).filename == "in.jsonl"
        assert (await client.files.delete(uploaded.id)).deleted

        raw = client._client
        assert set((await raw.get(f"/v1/batches/{batch.id}")).json()) == BATCH_KEYS
        listed = (await raw.get("/v1/files")).json()
        assert set(listed) == {"object", "data", "has_more"} and set(listed["data"][0]) == FILE_KEYS

        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_missing")
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file_missing", endpoint="/v1/completions",
                                        completion_window="24h")  # fmt: skip
        kept = await client.files.create(file=path.open("rb"), purpose="batch")
        for endpoint, window in (("/v1/embeddings", "24h"), ("/v1/completions", "48h")):
            with pytest.raises(openai.BadRequestError):
                await client.batches.create(
                    input_file_id=kept.id, endpoint=endpoint, completion_window=window
                )  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=path.open("rb"), purpose="fine-tune")
        for body in (b"not json", b"[]", b'{"endpoint": "/v1/completions"}'):
            assert (await raw.post("/v1/batches", content=body)).status_code == 400

        app.state.runtime = SimpleNamespace(batches=None)
        starting = await raw.get("/v1/batches")
        assert starting.status_code == 503 and starting.json()["error"]["code"] == 503
        app.state.runtime = None
        assert (await raw.get("/v1/files")).status_code == 503
        await runner.close()

    asyncio.run(main())


def test_idle_engine_runs_more_lines_and_gives_way_to_clients(tmp_path: Path):
    """While no client request is in flight a job runs up to ``idle_concurrency`` lines; with
    interactive traffic it falls back to ``concurrency``."""

    async def scenario(interactive: int) -> int:
        pipeline = FakePipeline()
        pipeline.interactive = interactive
        runner = BatchRunner(pipeline, BatchStore(Storage.local(tmp_path / str(interactive))), 2, 8)
        lines = jsonl(*(item(f"l{i}") for i in range(40)))
        upload = await runner.add_file("in.jsonl", "batch", lines, "anonymous")
        request = BatchCreateRequest(input_file_id=upload.id, endpoint="/v1/completions")
        batch = await runner.create(request, ANONYMOUS)
        for _ in range(500):
            if (await runner.batch(batch.id)).status in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
        assert (await runner.batch(batch.id)).status == "completed"
        await runner.close()
        return pipeline.peak

    assert asyncio.run(scenario(0)) == 8
    assert asyncio.run(scenario(1)) == 2
