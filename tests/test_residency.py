"""Adapter residency against a fake engine: LRU, pins, one shared first load, eviction."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.residency import Residency
from loraswap.errors import ApiError


class FakeEngine:
    """Records what residency asks of the engine; ``gate`` holds loads until released."""

    def __init__(self) -> None:
        self.exposed: dict[AdapterKey, int] = {}
        self.loaded: set[AdapterKey] = set()
        self.pinned: set[AdapterKey] = set()
        self.calls: list[tuple[str, AdapterKey]] = []
        self.gate: asyncio.Event | None = None
        self.fail: set[AdapterKey] = set()

    def expose(self, key: AdapterKey, lora_int_id: int, path: Path) -> None:
        self.exposed[key] = lora_int_id

    def withdraw(self, key: AdapterKey) -> None:
        self.exposed.pop(key, None)

    async def load(self, key: AdapterKey) -> None:
        self.calls.append(("load", key))
        if self.gate is not None:
            await self.gate.wait()
        if key in self.fail:
            raise RuntimeError("corrupt weights")
        self.loaded.add(key)

    async def unload(self, key: AdapterKey) -> None:
        self.calls.append(("unload", key))
        self.loaded.discard(key)
        self.pinned.discard(key)

    async def pin(self, key: AdapterKey) -> None:
        self.pinned.add(key)


KEYS = [AdapterKey(f"a{i}", "v1") for i in range(5)]


def make(capacity: int = 2, pins: set[AdapterKey] | None = None):
    engine = FakeEngine()
    pinned = pins if pins is not None else set()
    res = Residency(engine, capacity, lambda: pinned)
    for i, key in enumerate(KEYS):
        res.expose(key, i + 1, Path(f"/adapters/{key.name}"))
    return engine, res, pinned


def run(coro):
    return asyncio.run(coro)


def test_unknown_key_is_404():
    _, res, _ = make()
    with pytest.raises(ApiError) as err:
        run(res.ensure_loaded(AdapterKey("nope", "v1")))
    assert err.value.status == 404


def test_lru_evicts_least_recently_used():
    engine, res, _ = make(capacity=2)

    async def scenario():
        await res.ensure_loaded(KEYS[0])
        await res.ensure_loaded(KEYS[1])
        await res.ensure_loaded(KEYS[0])  # a0 is now the most recent
        await res.ensure_loaded(KEYS[2])  # evicts a1

    run(scenario())
    assert engine.loaded == {KEYS[0], KEYS[2]}
    assert list(res.lru) == [KEYS[0], KEYS[2]]
    assert res.status(KEYS[1]) == "registered" and res.status(KEYS[2]) == "loaded"


def test_concurrent_first_requests_share_one_load():
    engine, res, _ = make()

    async def scenario():
        engine.gate = asyncio.Event()
        waiters = [asyncio.create_task(res.ensure_loaded(KEYS[0])) for _ in range(8)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(*waiters)

    run(scenario())
    assert engine.calls == [("load", KEYS[0])]
    assert res.servable[KEYS[0]].load_seconds is not None


def test_pins_are_never_evicted():
    pins = {KEYS[0]}
    engine, res, _ = make(capacity=2, pins=pins)

    async def scenario():
        await res.pin(KEYS[0])
        for key in KEYS[1:4]:
            await res.ensure_loaded(key)

    run(scenario())
    assert KEYS[0] in engine.loaded and KEYS[0] in engine.pinned
    assert res.status(KEYS[0]) == "pinned"
    assert ("unload", KEYS[0]) not in engine.calls


def test_every_slot_pinned_is_503():
    pins = set(KEYS[:2])
    _, res, _ = make(capacity=2, pins=pins)

    async def scenario():
        await res.pin(KEYS[0])
        await res.pin(KEYS[1])
        await res.ensure_loaded(KEYS[2])

    with pytest.raises(ApiError) as err:
        run(scenario())
    assert err.value.status == 503 and "pinned" in err.value.message


def test_failed_load_is_503_and_retried_next_time():
    engine, res, _ = make()
    engine.fail.add(KEYS[0])
    with pytest.raises(ApiError) as err:
        run(res.ensure_loaded(KEYS[0]))
    assert err.value.status == 503 and not res.is_loaded(KEYS[0])
    engine.fail.clear()
    run(res.ensure_loaded(KEYS[0]))
    assert res.is_loaded(KEYS[0])


def test_forget_unloads_and_withdraws():
    engine, res, _ = make()
    run(res.ensure_loaded(KEYS[0]))
    run(res.forget(KEYS[0]))
    assert KEYS[0] not in engine.exposed and KEYS[0] not in engine.loaded
    assert not res.is_servable(KEYS[0])


def test_evict_keeps_servable_and_counts_requests():
    _, res, _ = make()
    run(res.ensure_loaded(KEYS[0]))
    run(res.evict(KEYS[0]))
    assert res.is_servable(KEYS[0]) and not res.is_loaded(KEYS[0])
    res.record(KEYS[0], ok=True)
    res.record(KEYS[0], ok=False)
    facts = res.facts(KEYS[0])
    assert (facts["requests"], facts["errors"], facts["status"]) == (2, 1, "registered")


def test_broken_versions_show_their_reason():
    _, res, _ = make()
    res.mark_broken(KEYS[1], "rank 64 > max_lora_rank 16")
    assert res.facts(KEYS[1])["status"] == "broken"
    assert "rank" in res.facts(KEYS[1])["error"]


def test_metric_labels_are_bounded(monkeypatch):
    """The first N versions keep their own series; the rest share `other`, whose resident gauge
    counts how many of them are loaded."""
    from loraswap import metrics

    labels = metrics.AdapterLabels(limit=2)
    monkeypatch.setattr(metrics, "labels_of", labels)
    keys = [AdapterKey(f"bounded-{i}", "v1") for i in range(4)]
    assert [labels(k) for k in keys] == [("bounded-0", "v1"), ("bounded-1", "v1"),
                                         metrics.OTHER, metrics.OTHER]  # fmt: skip
    assert labels(keys[0]) == ("bounded-0", "v1")  # still its own
    other = metrics.RESIDENT.labels(*metrics.OTHER)
    start = other._value.get()
    metrics.set_resident(keys[2], True)
    metrics.set_resident(keys[3], True)
    metrics.set_resident(keys[2], False)
    assert other._value.get() == start + 1
    metrics.set_resident(keys[0], True)
    metrics.set_resident(keys[0], True)
    assert metrics.RESIDENT.labels("bounded-0", "v1")._value.get() == 1


def test_host_tier_is_bounded_in_bytes_and_pins_stay():
    """With a byte budget, loaded adapters leave least recently used first once their bytes
    would pass it; the count capacity still applies; pins stay even over the budget."""
    sizes = {"a0": 40, "a1": 30, "a2": 50, "a3": 20, "a4": 100}
    engine = FakeEngine()
    pins: set[AdapterKey] = set()
    res = Residency(engine, 10, lambda: pins, host_bytes=100, size_of=lambda p: sizes[p.name])
    for i, key in enumerate(KEYS):
        res.expose(key, i + 1, Path(f"/adapters/{key.name}"))

    async def scenario():
        for key in KEYS[:3]:  # 40 + 30 = 70, then 50 more would be 120: a0 leaves
            await res.ensure_loaded(key)
        assert list(res.lru) == [KEYS[1], KEYS[2]] and res.loaded_bytes == 80
        await res.ensure_loaded(KEYS[3])  # 100 exactly: fits
        assert res.loaded_bytes == 100 and len(res.lru) == 3
        assert res.facts(KEYS[3])["bytes"] == 20 and res.facts(KEYS[0])["bytes"] is None
        pins.add(KEYS[3])
        await res.ensure_loaded(KEYS[4])  # 100 bytes: everything unpinned leaves
        assert set(res.lru) == {KEYS[3], KEYS[4]} and res.loaded_bytes == 120
        await res.forget(KEYS[4])
        assert res.loaded_bytes == 20

    run(scenario())
    assert engine.loaded == {KEYS[3]}


def test_eviction_weighs_frequency_among_the_least_recently_used():
    """Of the least recently used versions, the one with fewer requests leaves first: an
    adapter in steady use that sat idle a moment outlives a one-off."""
    engine, res, _ = make(capacity=3)

    async def scenario():
        await res.ensure_loaded(KEYS[0])
        for _ in range(5):
            res.record(KEYS[0], ok=True)  # a0: in steady use, but now the least recent
        await res.ensure_loaded(KEYS[1])
        res.record(KEYS[1], ok=True)
        await res.ensure_loaded(KEYS[2])
        res.record(KEYS[2], ok=True)
        await res.ensure_loaded(KEYS[3])  # full: a1 (1 request) leaves, not a0 (5)

    run(scenario())
    assert KEYS[0] in res.lru and KEYS[1] not in res.lru
    assert engine.loaded == {KEYS[0], KEYS[2], KEYS[3]}


def test_versions_with_requests_in_flight_are_not_evicted():
    """Unloading a version under a running request would make vLLM load it again behind the
    residency's back (and evict another in its own cache): busy versions stay."""
    engine = FakeEngine()
    busy = {KEYS[0]}
    res = Residency(engine, 2, set, busy=lambda: busy)
    for i, key in enumerate(KEYS):
        res.expose(key, i + 1, Path(f"/adapters/{key.name}"))

    async def scenario():
        await res.ensure_loaded(KEYS[0])
        await res.ensure_loaded(KEYS[1])
        await res.ensure_loaded(KEYS[2])  # a0 is the least recent but busy: a1 leaves

    run(scenario())
    assert ("unload", KEYS[0]) not in engine.calls
    assert engine.loaded == {KEYS[0], KEYS[2]}


def test_pin_loads_again_a_version_the_engine_dropped():
    """vLLM answers pin_lora for a LoRA it no longer holds with an error (a 500 before): the
    residency loads it again and pins."""
    pins = {KEYS[0]}
    engine, res, _ = make(capacity=2, pins=pins)
    dropped = {KEYS[0]}
    plain_pin = engine.pin

    async def strict_pin(key):
        if key not in engine.loaded or key in dropped:
            dropped.discard(key)
            raise RuntimeError(f"Pinning failed. LoRA {key} is not registered.")
        await plain_pin(key)

    engine.pin = strict_pin

    async def scenario():
        await res.ensure_loaded(KEYS[0])
        await res.pin(KEYS[0])

    run(scenario())
    assert KEYS[0] in engine.pinned
    assert engine.calls.count(("load", KEYS[0])) == 2


def test_prefetch_loads_meanwhile_and_the_request_shares_that_load():
    """A request waiting for a slot has its adapter loaded meanwhile; when it gets the slot,
    ensure_loaded finds the load done (or joins it), never loading twice."""
    engine, res, _ = make()

    async def scenario():
        engine.gate = asyncio.Event()
        res.prefetch(KEYS[0])
        res.prefetch(KEYS[0])  # a second waiter for the same adapter: still one load
        await asyncio.sleep(0.01)
        assert engine.calls == [("load", KEYS[0])] and not res.is_loaded(KEYS[0])
        engine.gate.set()
        await res.ensure_loaded(KEYS[0])
        res.prefetch(KEYS[0])  # loaded already: nothing to do

    run(scenario())
    assert engine.calls == [("load", KEYS[0])] and res.is_loaded(KEYS[0])


def test_failed_prefetch_is_reported_by_the_request_that_loads_again():
    engine, res, _ = make()
    engine.fail.add(KEYS[0])

    async def scenario():
        res.prefetch(KEYS[0])
        await asyncio.sleep(0.01)
        assert not res.is_loaded(KEYS[0]) and res.servable[KEYS[0]].loading is None
        with pytest.raises(ApiError) as err:
            await res.ensure_loaded(KEYS[0])
        return err.value

    assert run(scenario()).status == 503
    assert engine.calls == [("load", KEYS[0])] * 2
    res.prefetch(AdapterKey("unknown", "v1"))  # not servable: ignored


def test_vllm_engine_loads_into_host_memory_through_the_worker_extension():
    """With loraswap's worker extension a load is a collective_rpc that fills the host tier
    only; without it, vLLM's add_lora (which also takes a slot)."""
    from loraswap.adapters.residency import VllmAdapterEngine
    from loraswap.vllm_plugin import staging

    class Client:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        async def collective_rpc(self, method, args=()):
            self.calls.append(("rpc", method, args[0]["lora_name"]))

        async def add_lora(self, request):
            self.calls.append(("add_lora", request.lora_name))

    for staged, expected in (
        (True, ("rpc", staging.METHOD, "a0@v1")),
        (False, ("add_lora", "a0@v1")),
    ):
        client = Client()
        engine = VllmAdapterEngine(
            client, type("Models", (), {"lora_requests": {}})(), "base", staged
        )
        engine.expose(KEYS[0], 1, Path("/adapters/a0"))
        run(engine.load(KEYS[0]))
        assert client.calls == [expected]
