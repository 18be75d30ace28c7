"""Admission to adapter slots: requests share an in-flight adapter's slot, others wait in line
(first come, first served, grouped by adapter), and an interactive wait is bounded by a 429."""

from __future__ import annotations

import asyncio

import pytest

from loraswap import metrics
from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.slots import SlotGate
from loraswap.errors import ApiError

A, B, C, D = (AdapterKey(n, "v1") for n in "abcd")


def gate(capacity: int = 2, wait_s: float = 5.0, pinned: set | None = None) -> SlotGate:
    return SlotGate(lambda: capacity, wait_s, lambda: pinned or set(), retry_after_s=2)


def test_requests_for_an_adapter_in_flight_share_its_slot():
    async def scenario():
        g = gate(capacity=1)
        await g.acquire(A)
        await asyncio.wait_for(g.acquire(A), 0.1)  # no wait: same adapter
        assert g.in_flight == {A: 2}
        g.release(A)
        g.release(A)
        assert not g.in_flight

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_the_oldest_waiter_with_its_whole_group():
    async def scenario():
        g = gate(capacity=2)
        await g.acquire(A)
        await g.acquire(B)
        order: list[str] = []

        async def wait(key: AdapterKey, tag: str):
            await g.acquire(key)
            order.append(tag)

        tasks = [asyncio.create_task(wait(k, t)) for k, t in ((C, "c1"), (D, "d"), (C, "c2"))]
        await asyncio.sleep(0.01)
        assert order == [] and len(g.waiting) == 3
        g.release(A)  # C was first: both C requests go in on one slot
        await asyncio.sleep(0.01)
        assert sorted(order) == ["c1", "c2"] and g.in_flight[C] == 2
        g.release(B)
        await asyncio.sleep(0.01)
        assert order[-1] == "d" and not g.waiting
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_new_adapters_queue_behind_waiters_even_for_an_adapter_in_flight_only_sharing():
    """A request for a new adapter does not overtake the line when a slot frees later."""

    async def scenario():
        g = gate(capacity=1)
        await g.acquire(A)
        first = asyncio.create_task(g.acquire(B))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(g.acquire(C))
        await asyncio.sleep(0.01)
        g.release(A)
        await asyncio.sleep(0.01)
        assert first.done() and not second.done()
        g.release(B)
        await asyncio.wait_for(second, 1)

    asyncio.run(scenario())


def test_interactive_wait_is_bounded_by_a_429_with_retry_after_but_batch_lines_wait():
    async def scenario():
        g = gate(capacity=1, wait_s=0.05)
        await g.acquire(A)
        refused = metrics.SLOT_WAITS.labels("refused")._value.get()
        with pytest.raises(ApiError) as err:
            await g.acquire(B)
        assert err.value.status == 429 and err.value.headers == {"retry-after": "2"}
        assert "waited" in err.value.message and not g.waiting
        assert metrics.SLOT_WAITS.labels("refused")._value.get() == refused + 1
        background = asyncio.create_task(g.acquire(C, background=True))
        await asyncio.sleep(0.1)  # longer than wait_s: still waiting, not refused
        assert not background.done()
        g.release(A)
        await asyncio.wait_for(background, 1)
        assert g.in_flight == {C: 1}

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_line_and_pins_never_wait():
    async def scenario():
        g = gate(capacity=1, pinned={D})
        await g.acquire(A)
        await asyncio.wait_for(g.acquire(D), 0.1)  # pinned: its slot is its own
        waiter = asyncio.create_task(g.acquire(B))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert not g.waiting
        g.release(A)
        assert set(g.in_flight) == {D}

    asyncio.run(scenario())


def test_a_request_that_starts_waiting_has_its_adapter_prefetched():
    async def scenario():
        waited: list[AdapterKey] = []
        g = SlotGate(lambda: 1, 5.0, set, on_wait=waited.append)
        await g.acquire(A)
        await g.acquire(A)  # shares the slot: no wait, no prefetch
        task = asyncio.create_task(g.acquire(B))
        await asyncio.sleep(0.01)
        assert waited == [B]
        g.release(A)
        g.release(A)
        await asyncio.wait_for(task, 1)

    asyncio.run(scenario())
