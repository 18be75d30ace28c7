"""What a shadow version costs the primary: TTFT and throughput with and without a 100 % shadow.

    python benchmarks/shadow_overhead.py [--concurrency 1,8] [--requests 48] [--tokens 32]
                                         [--open-gap 2.0] [--open-requests 24]

Starts loraswap (default settings) on a free loopback port, registers ``uppercase@v2`` (the
json adapter's weights, so the shadow really computes another answer), and drives streamed chat
requests to the ``uppercase`` alias (``--tokens`` each, EOS ignored) in ``--pairs`` alternating
pairs of rounds: no shadow, then a 100 % shadow. Loads: closed loops of each ``--concurrency``
(clients sending back to back: no idle engine), and an open loop (Poisson arrivals, mean gap
``--open-gap`` seconds: the engine idles between requests, as most real traffic lets it).
Reports per round the primary's TTFT p50/p99 and output tokens/s, and the shadow runs done
during the round, after it (queued ones, once clients stopped), dropped or preempted.
Writes benchmarks/results/shadow-<time>.json with the CPU kind.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time

import httpx
from servers import ROOT, measure_on_loraswap, sse_lines


def chat(tokens: int, i: int) -> dict:
    messages = [{"role": "user", "content": f"Tell me fact {i}."}]
    return {"model": "uppercase", "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "messages": messages}  # fmt: skip


async def one(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    started, ttft, chunks = time.monotonic(), None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in sse_lines(resp):
            if line.startswith("data:") and '"content"' in line:
                ttft = ttft if ttft is not None else time.monotonic() - started
                chunks += 1
    return ttft or time.monotonic() - started, chunks


async def round_(url: str, concurrency: int, requests: int, tokens: int, gap: float) -> dict:
    """``concurrency`` closed-loop clients, or (``gap`` > 0) one request every ~``gap`` s."""
    queue = list(range(requests))
    ttfts: list[float] = []
    produced = 0

    async def send(http: httpx.AsyncClient, i: int) -> None:
        nonlocal produced
        ttft, chunks = await one(http, url, chat(tokens, i))
        ttfts.append(ttft)
        produced += chunks

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            await send(http, queue.pop())

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        if gap > 0:
            arrivals = random.Random(7)
            sent = []
            for i in queue:
                sent.append(asyncio.create_task(send(http, i)))
                await asyncio.sleep(arrivals.expovariate(1 / gap))
            await asyncio.gather(*sent)
        else:
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.monotonic() - started
    ttfts.sort()
    return {
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4),
        "tokens_per_s": round(produced / wall, 1),
    }


def series(url: str) -> dict[str, float]:
    """Shadow outcomes, shadows pending, and vLLM's requests running or waiting (BentoML adds
    a ``pid`` label to every series)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[str, float] = {"pending": 0.0, "engine": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("loraswap_shadow_runs_total{"):
            outcome = re.search(r'outcome="(\w+)"', name)[1]
            found[outcome] = found.get(outcome, 0.0) + float(value)
        elif name.startswith("loraswap_shadow_pending{"):
            found["pending"] += float(value)
        elif name.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            found["engine"] += float(value)
    return found


async def drain(url: str) -> dict[str, float]:
    """Wait until every queued shadow ran and the engine is idle; the series then."""
    while True:
        now = series(url)
        if now["pending"] == 0 and now["engine"] == 0:
            return now
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
    loads = [(c, 0.0, args.requests) for c in args.concurrency]
    loads += [(1, args.open_gap, args.open_requests)] if args.open_gap > 0 else []
    for concurrency, gap, requests in loads:
        for rate in (0.0, 1.0) * args.pairs:
            async with httpx.AsyncClient(timeout=60) as http:
                alias = {"version": "v1", "shadow_version": "v2" if rate else None,
                         "shadow_rate": rate}  # fmt: skip
                resp = await http.put(f"{url}/admin/adapters/uppercase/alias", json=alias)
                resp.raise_for_status()
            before = await drain(url)
            figures = await round_(url, concurrency, requests, args.tokens, gap)
            during = series(url)
            after = await drain(url)

            def delta(a: dict, b: dict, outcome: str) -> float:
                return a.get(outcome, 0) - b.get(outcome, 0)

            load = f"open loop, mean gap {gap} s" if gap else f"closed loop x{concurrency}"
            row = {"load": load, "requests": requests, "shadow_rate": rate, **figures,
                   "shadows_done_during": delta(during, before, "done"),
                   "shadows_done_after": delta(after, during, "done"),
                   "shadows_dropped": delta(after, before, "dropped"),
                   "shadows_preempted": delta(after, before, "preempted")}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    from loraswap.config import Settings  # the server's settings: the same environment

    return {"shadow_concurrency": Settings().shadow_concurrency, "rounds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[1, 8])  # fmt: skip
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--open-gap", type=float, default=2.0, help="0: no open-loop rounds")
    parser.add_argument("--open-requests", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=2, help="rounds without, then with a shadow")
    measure_on_loraswap("shadow", measure, parser.parse_args())


if __name__ == "__main__":
    main()
