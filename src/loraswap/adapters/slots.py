"""Admission to the engine's adapter slots: at most ``capacity`` distinct adapters in flight.

vLLM holds a request whose adapter finds every slot taken in its waiting queue, behind no
bound: under many adapters a cold one can wait for as long as hot ones keep their slots. Here
a request for an adapter already in flight goes straight in (it shares that adapter's slot:
waiting requests are grouped by adapter); one for another adapter waits in line, first come
first served, and a freed slot goes to the oldest waiting adapter together with every other
request waiting for the same one. An interactive request that waited ``wait_s`` gets a 429
with ``Retry-After`` instead of an unbounded time to first token; background work (batch
lines) waits without a limit. The adapter of a waiting request is loaded into host memory
meanwhile (``on_wait``), so a freed slot serves it without a load in between.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import metrics
from ..errors import ApiError
from .keys import AdapterKey


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Waiter:
    key: AdapterKey
    granted: asyncio.Future[None] = field(default_factory=_future)


class SlotGate:
    def __init__(
        self,
        capacity: Callable[[], int],
        wait_s: float,
        pinned: Callable[[], set[AdapterKey]],
        retry_after_s: int = 1,
        on_wait: Callable[[AdapterKey], None] = lambda key: None,
    ) -> None:
        self.capacity = capacity
        self.on_wait = on_wait  # a request starts waiting for ``key``: prefetch its adapter
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.pinned = pinned
        self.in_flight: Counter[AdapterKey] = Counter()
        self.waiting: deque[_Waiter] = deque()

    def _free(self) -> bool:
        pinned = self.pinned()
        unpinned = sum(1 for key in self.in_flight if key not in pinned)
        return unpinned < self.capacity()

    async def acquire(self, key: AdapterKey, background: bool = False) -> None:
        """Wait for ``key`` to have a slot; every acquire is matched by one :meth:`release`."""
        if key in self.in_flight or key in self.pinned() or (not self.waiting and self._free()):
            self.in_flight[key] += 1
            return
        waiter = _Waiter(key)
        self.waiting.append(waiter)
        self.on_wait(key)
        metrics.SLOT_WAITING.set(len(self.waiting))
        started = time.monotonic()
        try:
            limit = None if background else self.wait_s
            await asyncio.wait_for(asyncio.shield(waiter.granted), limit)
        except TimeoutError:
            if waiter.granted.done():  # granted just as the wait ran out: keep it
                return
            self.waiting.remove(waiter)
            metrics.SLOT_WAITS.labels("refused").inc()
            raise ApiError(
                429,
                f"every adapter slot ({self.capacity()}) is serving other adapters; "
                f"{str(key)!r} waited {self.wait_s:g} s",
                headers={"retry-after": str(self.retry_after_s)},
            ) from None
        except asyncio.CancelledError:
            if waiter.granted.done():
                self.release(key)
            elif waiter in self.waiting:
                self.waiting.remove(waiter)
            raise
        finally:
            metrics.SLOT_WAITING.set(len(self.waiting))
        metrics.SLOT_WAITS.labels("admitted").inc()
        metrics.SLOT_WAIT_SECONDS.observe(time.monotonic() - started)

    def release(self, key: AdapterKey) -> None:
        self.in_flight[key] -= 1
        if self.in_flight[key] > 0:
            return
        del self.in_flight[key]
        while self.waiting and self._free():
            first = self.waiting.popleft()
            self._grant(first)
            for other in [w for w in self.waiting if w.key == first.key]:
                self.waiting.remove(other)
                self._grant(other)

    def _grant(self, waiter: _Waiter) -> None:
        if not waiter.granted.done():
            self.in_flight[waiter.key] += 1
            waiter.granted.set_result(None)
