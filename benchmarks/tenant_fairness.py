"""Fairness between tenants: tenant B's time to first token while tenant A floods the server.

    python benchmarks/tenant_fairness.py [--flood 64] [--cap 16] [--requests 16] [--tokens 32]

Starts loraswap (default settings plus a global admin key) on a free loopback port, creates two
tenants, and measures B's streamed chat requests (one at a time, ``--tokens`` each, EOS ignored):
alone; while A keeps ``--flood`` concurrent streams going with a per-tenant cap of ``--cap``
requests in flight; and while A floods with no per-tenant cap. A client refused with a 429 waits
its ``Retry-After`` and tries again; B's figure includes that wait. Writes
benchmarks/results/fairness-<time>.json with the CPU kind.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from servers import measure_on_loraswap, sse_lines

ROOT_KEY = "bench-root-key"


def chat(tokens: int, text: str) -> dict:
    return {"model": "smollm2-135m-instruct", "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": text}]}  # fmt: skip


async def first_token(
    http: httpx.AsyncClient, url: str, key: str, body: dict, refusals: list | None = None
) -> tuple[float, int]:
    """Seconds to the first content chunk (429 waits included) and how many 429s it took;
    each 429 is also appended to ``refusals`` as it happens."""
    started, refused = time.monotonic(), 0
    while True:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            if resp.status_code == 429:
                refused += 1
                if refusals is not None:
                    refusals.append(time.monotonic())
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                continue
            resp.raise_for_status()
            ttft = None
            async for line in sse_lines(resp):
                if ttft is None and line.startswith("data:") and '"content"' in line:
                    ttft = time.monotonic() - started
            return ttft or time.monotonic() - started, refused


async def quiet_tenant(url: str, key: str, requests: int, tokens: int) -> dict:
    ttfts, refused = [], 0
    async with httpx.AsyncClient(timeout=600) as http:
        for i in range(requests):
            ttft, no = await first_token(http, url, key, chat(tokens, f"Say a fact about {i}."))
            ttfts.append(ttft)
            refused += no
    ttfts.sort()
    return {"requests": requests, "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_max_s": round(ttfts[-1], 3), "refused_429": refused}  # fmt: skip


async def flood(url: str, key: str, streams: int, tokens: int, stop: asyncio.Event) -> dict:
    done, refusals = 0, []

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done
        while not stop.is_set():
            await first_token(http, url, key, chat(tokens, "Write a long story."), refusals)
            done += 1

    async with httpx.AsyncClient(timeout=600) as http:
        tasks = [asyncio.create_task(worker(http)) for _ in range(streams)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": streams, "completed": done, "refused_429": len(refusals)}


async def beside_flood(url: str, keys: dict, args: argparse.Namespace) -> dict:
    stop = asyncio.Event()
    flooding = asyncio.create_task(flood(url, keys["a"], args.flood, args.tokens * 4, stop))
    await asyncio.sleep(5)  # let the flood fill the engine
    quiet = await quiet_tenant(url, keys["b"], args.requests, args.tokens)
    stop.set()
    return {"tenant_b": quiet, "tenant_a": await flooding}


async def measure(url: str, args: argparse.Namespace) -> dict:
    admin = {"Authorization": f"Bearer {ROOT_KEY}"}
    keys = {}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=60) as http:
        for name in ("a", "b"):
            limits = {"max_concurrent": args.cap} if name == "a" else {}
            (
                await http.post("/admin/tenants", json={"name": f"tenant-{name}", "limits": limits})
            ).raise_for_status()
            made = await http.post(f"/admin/tenants/tenant-{name}/keys", json={})
            keys[name] = made.json()["key"]
        await quiet_tenant(url, keys["b"], 4, 8)  # warm-up
        alone = await quiet_tenant(url, keys["b"], args.requests, args.tokens)
        capped = await beside_flood(url, keys, args)
        await asyncio.sleep(2)  # the capped flood's streams drain
        (await http.patch("/admin/tenants/tenant-a", json={"limits": {}})).raise_for_status()
        uncapped = await beside_flood(url, keys, args)
    base = alone["ttft_p50_s"]
    return {
        "tenant_b_alone": alone,
        f"tenant_a_flooding_capped_at_{args.cap}": capped,
        "tenant_a_flooding_uncapped": uncapped,
        "b_ttft_p50_ratio_capped": round(capped["tenant_b"]["ttft_p50_s"] / base, 2),
        "b_ttft_p50_ratio_uncapped": round(uncapped["tenant_b"]["ttft_p50_s"] / base, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flood", type=int, default=64, help="tenant A's concurrent streams")
    parser.add_argument("--cap", type=int, default=16, help="tenant A's max_concurrent")
    parser.add_argument("--requests", type=int, default=16, help="tenant B's requests")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    admin = {"LORASWAP_ADMIN_API_KEYS": ROOT_KEY}
    measure_on_loraswap("fairness", measure, args, env=admin, key=ROOT_KEY)


if __name__ == "__main__":
    main()
