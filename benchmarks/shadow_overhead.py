"""What a shadow version costs the primary: TTFT and throughput with and without a 100 % shadow.

    python benchmarks/shadow_overhead.py [--concurrency 1,8] [--requests 48] [--tokens 32]

Starts loraswap (default settings) on a free loopback port, registers ``uppercase@v2`` (the
json adapter's weights, so the shadow really computes another answer), and drives streamed chat
requests to the ``uppercase`` alias (``--tokens`` each, EOS ignored) at each concurrency, in
alternating rounds: no shadow, 100 % shadow, no shadow, 100 % shadow. Reports the primary's
TTFT p50/p99 and output tokens/s per round, and how many shadow runs were done or dropped.
Writes benchmarks/results/shadow-<time>.json with the CPU kind.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time

import httpx
from servers import ROOT, measure_on_loraswap


def chat(tokens: int, i: int) -> dict:
    messages = [{"role": "user", "content": f"Tell me fact {i}."}]
    return {"model": "uppercase", "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "messages": messages}  # fmt: skip


async def one(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    started, ttft, chunks = time.monotonic(), None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and '"content"' in line:
                ttft = ttft if ttft is not None else time.monotonic() - started
                chunks += 1
    return ttft or time.monotonic() - started, chunks


async def round_(url: str, concurrency: int, requests: int, tokens: int) -> dict:
    queue = list(range(requests))
    ttfts: list[float] = []
    produced = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal produced
        while queue:
            ttft, chunks = await one(http, url, chat(tokens, queue.pop()))
            ttfts.append(ttft)
            produced += chunks

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.monotonic() - started
    ttfts.sort()
    return {
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4),
        "tokens_per_s": round(produced / wall, 1),
    }


def shadow_runs(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = r'^loraswap_shadow_runs_total\{outcome="(\w+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


async def drain(url: str) -> None:
    """Wait until queued shadow runs are done, so the next round starts on an idle engine."""
    for _ in range(600):
        text = httpx.get(f"{url}/metrics", timeout=30).text
        running = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith(("vllm:num_requests_running{",
                                          "vllm:num_requests_waiting{")))  # fmt: skip
        if running == 0:
            await asyncio.sleep(1.0)
            return
        await asyncio.sleep(0.5)


async def measure(url: str, args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        resp = await http.post(f"{url}/admin/adapters", json={
            "name": "uppercase", "version": "v2", "promote": False,
            "source": str(ROOT / "adapters" / "json")})  # fmt: skip
        resp.raise_for_status()
        await one(http, url, chat(4, 0))  # warm up both versions
        await one(http, url, {**chat(4, 0), "model": "uppercase@v2"})
    rows = []
    for concurrency in args.concurrency:
        for rate in (0.0, 1.0, 0.0, 1.0):
            async with httpx.AsyncClient(timeout=60) as http:
                alias = {"version": "v1", "shadow_version": "v2" if rate else None,
                         "shadow_rate": rate}  # fmt: skip
                (
                    await http.put(f"{url}/admin/adapters/uppercase/alias", json=alias)
                ).raise_for_status()
            before = shadow_runs(url)
            figures = await round_(url, concurrency, args.requests, args.tokens)
            after = shadow_runs(url)
            await drain(url)
            done = shadow_runs(url)

            def delta(a: dict, b: dict, outcome: str) -> float:
                return a.get(outcome, 0) - b.get(outcome, 0)

            row = {"concurrency": concurrency, "shadow_rate": rate, **figures,
                   "shadows_done_during": delta(after, before, "done"),
                   "shadows_done_after": delta(done, after, "done"),
                   "shadows_dropped": delta(done, before, "dropped")}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    return {"rounds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8])  # fmt: skip
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    measure_on_loraswap("shadow", measure, parser.parse_args())


if __name__ == "__main__":
    main()
