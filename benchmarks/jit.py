"""The cost of a just-in-time adapter load, measured under steady base-model traffic.

Phase A runs ``streams`` concurrent base-model requests for a while (their TTFT is the
reference). Phase B keeps the same traffic and, one after another, registers a fresh adapter
(not loaded), sends it a request (cold: the registry and engine load it on the way) and then a
second one (warm). The JIT cost is cold TTFT minus warm TTFT; base requests whose time to first
token overlaps a load show whether loading stalls everyone else.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx
from servers import sse_lines

PROMPT = "Write two sentences about the sea and the wind, and say why sailors watch the sky."


async def ttft(client: httpx.AsyncClient, model: str, max_tokens: int = 16) -> tuple[float, float]:
    """Send one streamed completion; return (start time, seconds to the first token)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code} {await response.aread()!r}")
        async for line in sse_lines(response):
            if first is None and line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                first = time.perf_counter() - start
    return start, first if first is not None else float("nan")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(
    url: str,
    base_model: str,
    adapter_root: Path,
    template: Path,
    streams: int = 8,
    loads: int = 3,
    reference_s: float = 15.0,
) -> dict:
    timings: list[tuple[float, float]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def base_worker() -> None:
            while not stop.is_set():
                timings.append(await ttft(client, base_model, max_tokens=32))

        workers = [asyncio.create_task(base_worker()) for _ in range(streams)]
        await asyncio.sleep(reference_s)
        reference = [t for _, t in timings]
        windows, cold, warm = [], [], []
        for i in range(loads):
            name = f"jit{i}-{int(time.time())}"
            shutil.copytree(template, adapter_root / name)
            register = await client.post(
                "/admin/adapters", json={"name": name, "source": str(adapter_root / name)}
            )
            register.raise_for_status()
            start, first = await ttft(client, name)
            windows.append((start, start + first))
            cold.append(first)
            warm.append((await ttft(client, name))[1])
            await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*workers)

    def overlaps(start: float, first: float) -> bool:
        return any(start < end and start + first > begin for begin, end in windows)

    during = [t for s, t in timings[len(reference) :] if overlaps(s, t)]
    ms = 1000.0
    return {
        "streams": streams,
        "loads": loads,
        "jit_ttft_ms": [c * ms for c in cold],
        "warm_ttft_ms": [w * ms for w in warm],
        "jit_added_ms_median": statistics.median(c - w for c, w in zip(cold, warm, strict=True))
        * ms,
        "base_ttft_p50_ms_reference": pct(reference, 50) * ms,
        "base_ttft_p99_ms_reference": pct(reference, 99) * ms,
        "base_requests_overlapping_loads": len(during),
        "base_ttft_p99_ms_during_loads": (pct(during, 99) or 0.0) * ms,
        "base_ttft_max_ms_during_loads": max(during, default=0.0) * ms,
    }
