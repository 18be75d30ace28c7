"""The OpenAI Batch API through the real ``openai`` SDK against the real server."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai import OpenAI

from tests.conftest import BASE_MODEL


def line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def wait_done(client: OpenAI, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(1)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def test_sdk_batch_round_trip_with_one_bad_request(client: OpenAI, tmp_path):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    lines = [
        line(
            "ok-1", {"model": BASE_MODEL, "messages": question, "max_tokens": 16, "temperature": 0}
        ),
        line("bad-model", {"model": "no-such-model", "messages": question}),
        line(
            "ok-adapter",
            {"model": "json", "messages": question, "max_tokens": 24, "temperature": 0},
        ),
        line("bad-params", {"model": BASE_MODEL, "messages": question, "max_tokens": -5}),
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size

    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "test"},
    )  # fmt: skip
    assert batch.status in ("validating", "in_progress")
    batch = wait_done(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (4, 2, 2)  # fmt: skip

    outputs = {
        row["custom_id"]: row
        for row in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())
    }
    assert set(outputs) == {"ok-1", "ok-adapter"}
    answer = outputs["ok-1"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in answer
    adapter_body = outputs["ok-adapter"]["response"]["body"]
    assert adapter_body["model"] == "json@v1"
    assert isinstance(json.loads(adapter_body["choices"][0]["message"]["content"]), dict)
    errors = {
        row["custom_id"]: row["response"]
        for row in map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
    }
    assert errors["bad-model"]["status_code"] == 404
    assert errors["bad-params"]["status_code"] == 400
    assert batch.id in [b.id for b in client.batches.list().data]


def test_invalid_input_file_fails_the_batch_with_line_errors(client: OpenAI, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\nnot json\n'
    )
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = wait_done(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip
    assert batch.status == "failed"
    assert sorted(e.line for e in batch.errors.data) == [1, 2]


def test_bad_batch_requests_are_4xx(client: OpenAI, tmp_path):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file_missing", endpoint="/v1/chat/completions",
                              completion_window="24h")  # fmt: skip
    path = tmp_path / "x.jsonl"
    path.write_text(line("a", {"model": BASE_MODEL, "messages": []}) + "\n")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                              completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=path.open("rb"), purpose="fine-tune")


def test_cancel_keeps_finished_lines(client: OpenAI, tmp_path):
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 200, "temperature": 0}  # fmt: skip
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(line(f"r{i}", body) for i in range(40)) + "\n")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_done(client, batch.id)
    assert batch.status == "cancelled"
    assert batch.request_counts.completed < 40
