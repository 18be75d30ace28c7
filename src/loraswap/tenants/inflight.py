"""Requests in flight per tenant, for :class:`~loraswap.tenants.limits.TenantLimiter`: on Redis,
leases every replica sees (:class:`Leases`); on ``memory://``, a count in this process
(:class:`LocalCount`). Both answer ``take`` (False: the tenant holds its limit), ``leave`` (the
lease to drop from the storage, if any) and ``drop``; storage errors are raised to the limiter,
which owns the outage handling (its ``skipping`` and ``failed`` are passed in for the renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from limits.errors import StorageError
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis.asyncio import Redis

STORAGE_ERRORS = (StorageError, RedisError, OSError, asyncio.TimeoutError)
PREFIX = "LIMITS:loraswap"  # the library's own prefix, so its reset() clears ours too

# Takes one lease for a request in flight unless the tenant already holds its limit; leases
# past their expiry (a crashed replica's) are dropped first. Times are the server's (TIME), so
# replicas' clocks do not matter. KEYS[1]: the tenant's set; ARGV: limit, lease id, lease ms.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Extends this replica's live leases (XX: a lease already dropped stays dropped).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""


def inflight_key(name: str) -> str:
    return f"{PREFIX}/inflight/{name}"


class LocalCount:
    """``memory://``: each tenant's requests in flight in this process (``held``)."""

    def __init__(self) -> None:
        self.held: dict[str, int] = defaultdict(int)

    async def take(self, name: str, limit: int) -> bool:
        if self.held.get(name, 0) >= limit:
            return False
        self.held[name] += 1
        return True

    def leave(self, name: str) -> None:
        """One of the tenant's requests left (nothing to drop from a storage)."""
        self.held[name] = max(0, self.held[name] - 1)
        if not self.held[name]:
            del self.held[name]

    async def drop(self, name: str, lease: str) -> None:
        """Never called: :meth:`leave` returns no lease."""

    async def close(self) -> None:
        """Nothing to hand back."""


class Leases:
    """Redis: one sorted set per tenant of leases (member: replica id and request number,
    score: expiry in ms), taken atomically by a script that first drops expired leases.

    A live replica renews its own leases (``held``) every ``lease_s / 3`` s, so a request may
    run for any time, while a crashed replica's leases (it can no longer release them) vanish
    within ``lease_s``. Chosen over per-replica INCR/DECR counters, which need a registry of
    live replicas to know which counters to sum.
    """

    def __init__(
        self,
        redis: Redis,
        lease_s: float,
        skipping: Callable[[], bool],
        failed: Callable[[BaseException], None],
    ) -> None:
        self.redis, self.lease_s = redis, lease_s
        self.skipping, self.failed = skipping, failed
        self.held: dict[str, list[str]] = defaultdict(list)  # this replica's live leases
        self.replica = uuid.uuid4().hex[:12]
        self.numbers = itertools.count()
        self.renewer: asyncio.Task[None] | None = None
        self.acquire_script = redis.register_script(ACQUIRE)
        self.renew_script = redis.register_script(RENEW)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    async def take(self, name: str, limit: int) -> bool:
        """One lease for a request of ``name``'s, unless it holds ``limit`` already (storage
        errors raised)."""
        lease = f"{self.replica}:{next(self.numbers)}"
        if not await self.acquire_script(
            keys=[inflight_key(name)], args=[limit, lease, self.lease_ms]
        ):
            return False
        self.held[name].append(lease)
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return True

    def leave(self, name: str) -> str | None:
        """One of the tenant's requests left (which one does not matter: they are alike): its
        lease, no longer renewed, to :meth:`drop` from the storage."""
        leases = self.held.get(name)
        if not leases:
            return None
        lease = leases.pop()
        if not leases:
            del self.held[name]
        return lease

    async def drop(self, name: str, lease: str) -> None:
        await self.redis.zrem(inflight_key(name), lease)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if self.skipping():
                continue
            try:
                for name, leases in list(self.held.items()):
                    if leases:
                        await self.renew_script(
                            keys=[inflight_key(name)], args=[self.lease_ms, *leases]
                        )
            except STORAGE_ERRORS as exc:
                self.failed(exc)

    async def close(self) -> None:
        """Stop renewing and drop this replica's leases (its requests are over); a storage
        error is ignored (the leases expire by themselves)."""
        if self.renewer is not None:
            self.renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.renewer
            self.renewer = None
        held, self.held = self.held, defaultdict(list)
        with contextlib.suppress(*STORAGE_ERRORS):
            for name, mine in held.items():
                if mine:
                    await self.redis.zrem(inflight_key(name), *mine)
