"""Adapter slots on the real server (4 slots): while every slot serves a long generation of its
own adapter, a request for one of those adapters goes straight in (it shares the slot), and one
for a fifth adapter is refused with a 429 and Retry-After once it waited
``LORASWAP_ADAPTER_SLOT_WAIT_S`` (10 s), instead of waiting without bound, its adapter loaded
into host memory meanwhile; once the slots free, that adapter is served."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server import Server
from tests.test_isolation import register_copies

WAIT_S = 10.0  # the default LORASWAP_ADAPTER_SLOT_WAIT_S


async def _hold(http: httpx.AsyncClient, model: str, started: asyncio.Event, stop: asyncio.Event):
    """A long streamed generation that keeps ``model``'s slot busy until ``stop``."""
    body = {"model": model, "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count."}]}  # fmt: skip
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for chunk in resp.aiter_raw():
            if b'"content"' in chunk:
                started.set()
            if stop.is_set():
                return  # closing the stream aborts the request in vLLM


async def _status(http: httpx.AsyncClient, name: str) -> str:
    versions = (await http.get(f"/admin/adapters/{name}")).json()["versions"]
    return versions[0]["status"]


async def _scenario(url: str, adapters: list[str], slots: int) -> dict:
    holders, extra = adapters[:slots], adapters[slots]
    stop = asyncio.Event()
    started = [asyncio.Event() for _ in holders]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        tasks = [
            asyncio.create_task(_hold(http, m, e, stop))
            for m, e in zip(holders, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        t0 = time.monotonic()
        shared = await client.chat.completions.create(
            model=holders[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        shared_s = time.monotonic() - t0
        assert await _status(http, extra) == "registered"
        t0 = time.monotonic()
        waiting = asyncio.create_task(
            client.chat.completions.create(
                model=extra, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        )
        status_while_waiting = "registered"
        while not waiting.done() and status_while_waiting == "registered":
            await asyncio.sleep(0.5)
            status_while_waiting = await _status(http, extra)
        with pytest.raises(openai.RateLimitError) as refused:
            await waiting
        refused_s = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*tasks)
        served = await client.chat.completions.create(
            model=extra, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        await client.close()
    return {"shared": shared, "shared_s": shared_s, "refused": refused.value,
            "refused_s": refused_s, "served": served,
            "status_while_waiting": status_while_waiting}  # fmt: skip


def test_full_slots_share_in_flight_adapters_and_bound_the_wait_of_others(
    server: Server, adapter_root
):
    listing = httpx.get(f"{server.url}/admin/adapters", timeout=30).json()["data"]
    pinned = sum(1 for a in listing for v in a["versions"] if v.get("status") == "pinned")
    slots = 4 - pinned  # the session server runs LORASWAP_MAX_LORAS=4
    adapters = register_copies(server.url, adapter_root, prefix="slots")
    assert len(adapters) > slots
    out = asyncio.run(_scenario(server.url, adapters, slots))
    assert out["shared"].model == f"{adapters[0]}@v1" and out["shared_s"] < WAIT_S
    err = out["refused"]
    assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
    body = err.response.json()["error"]
    assert "every adapter slot" in body["message"] and adapters[slots] in body["message"]
    assert WAIT_S - 1 <= out["refused_s"] < WAIT_S + 5
    assert out["served"].model == f"{adapters[slots]}@v1"
    # its adapter was loaded into host memory while it waited (prefetch from the queue)
    assert out["status_while_waiting"] == "loaded"
