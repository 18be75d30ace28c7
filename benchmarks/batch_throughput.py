"""A Batch API job's throughput: alone on an idle server, and beside interactive traffic.

    python benchmarks/batch_throughput.py [--lines 96] [--streams 16] [--tokens 64]

Starts loraswap (default settings) on a free loopback port and measures, one after another:
interactive throughput (``--streams`` concurrent chat requests, ``--tokens`` each, EOS ignored),
a batch job of ``--lines`` such requests alone, and the same job while the interactive load
runs (and that load's throughput meanwhile). Writes benchmarks/results/batch-<time>.json with
the CPU kind and the settings `auto` chose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from servers import measure_on_loraswap


def chat(i: int, tokens: int) -> dict:
    return {"model": "smollm2-135m-instruct", "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Write about the number {i}."}]}  # fmt: skip


async def interactive(url: str, streams: int, requests: int, tokens: int) -> dict:
    """``requests`` chat calls, ``streams`` at a time: output tokens per second."""
    queue = list(range(requests))
    produced = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal produced
        while queue:
            i = queue.pop()
            resp = await http.post(f"{url}/v1/chat/completions", json=chat(i, tokens))
            resp.raise_for_status()
            produced += resp.json()["usage"]["completion_tokens"]

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(streams)))
    seconds = time.monotonic() - started
    return {"requests": requests, "tokens": produced, "seconds": round(seconds, 2),
            "tok_per_s": round(produced / seconds, 1)}  # fmt: skip


async def batch_job(url: str, lines: int, tokens: int) -> dict:
    """Upload and run a job of ``lines`` chat requests; its output tokens per second."""
    body = "\n".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": chat(i, tokens)})
        for i in range(lines)
    ).encode()  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as http:
        upload = await http.post(f"{url}/v1/files", files={"file": ("in.jsonl", body)},
                                 data={"purpose": "batch"})  # fmt: skip
        started = time.monotonic()
        job = (await http.post(f"{url}/v1/batches", json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()  # fmt: skip
        moved_at = None
        while job["status"] not in ("completed", "failed", "cancelled"):
            await asyncio.sleep(0.5)
            job = (await http.get(f"{url}/v1/batches/{job['id']}")).json()
            if moved_at is None and job["request_counts"]["completed"] > 0:
                moved_at = time.monotonic() - started
        seconds = time.monotonic() - started
        out = (await http.get(f"{url}/v1/files/{job['output_file_id']}/content")).text
    produced = sum(
        json.loads(row)["response"]["body"]["usage"]["completion_tokens"]
        for row in out.splitlines()
    )
    return {"lines": lines, "status": job["status"], "counts": job["request_counts"],
            "first_count_after_s": round(moved_at or seconds, 2), "tokens": produced,
            "seconds": round(seconds, 2), "tok_per_s": round(produced / seconds, 1)}  # fmt: skip


async def measure(url: str, args: argparse.Namespace) -> dict:
    await interactive(url, 4, 8, 16)  # warm-up
    alone = await interactive(url, args.streams, args.streams * 4, args.tokens)
    job = await batch_job(url, args.lines, args.tokens)
    mixed_job, beside = await asyncio.gather(
        batch_job(url, args.lines, args.tokens),
        interactive(url, args.streams, args.streams * 4, args.tokens),
    )
    ratio = round(job["tok_per_s"] / alone["tok_per_s"], 2)
    return {"interactive_alone": alone, "batch_alone": job, "batch_beside_interactive": mixed_job,
            "interactive_beside_batch": beside, "batch_alone_vs_interactive": ratio}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=96)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    measure_on_loraswap("batch", measure, args)


if __name__ == "__main__":
    main()
