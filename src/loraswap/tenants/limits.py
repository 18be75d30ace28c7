"""Per-tenant admission that holds across replicas: requests in flight, requests and tokens per
minute, counted in the storage ``limits_uri`` names (``memory://`` per process, ``redis://`` for
the fleet).

The per-minute limits are the ``limits`` library's moving windows (``limits.aio``: the limiter
runs on the event loop). Tokens are known only when the engine finishes a request, so they are
recorded then, and a request is refused while its tenant's window holds its budget or more (a
tenant gets at most its budget plus what its admitted requests use). In flight: a Redis sorted
set of leases (see :class:`TenantLimiter`). A storage outage never answers 500: it serves
unlimited (``limits_fail_open``) or refuses tenant requests with 503, logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.limits import safe_string
from limits.storage import storage_from_string
from redis.exceptions import RedisError

from ..errors import ApiError
from .principal import Principal

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..config import Settings
    from .model import Tenant

logger = logging.getLogger(__name__)

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


class _Window(RateLimitItemPerMinute):
    """A one-minute window keyed by namespace and tenant only, not by its amount: the token
    check (amount = the budget) and the token recording (a larger amount) share one window, and
    a tenant whose limit changes keeps its window."""

    def key_for(self, *identifiers: bytes | str | int | float) -> str:
        return "/".join([self.namespace, *(safe_string(i) for i in identifiers)])


def async_uri(uri: str) -> str:
    """``redis://…`` / ``memory://`` as the library's async scheme (``async+redis://…``)."""
    return uri if uri.startswith("async+") else f"async+{uri}"


def _redacted(uri: str) -> str:
    """Without its password, for the log."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


class TenantLimiter:
    """Counts each tenant's requests and tokens in one storage shared by every replica.

    In flight on Redis: one sorted set per tenant of leases (member: replica id and request
    number, score: expiry in ms), taken atomically by a script that first drops expired leases.
    A live replica renews its own leases every ``lease_s / 3`` s, so a request may run for any
    time, while a crashed replica's leases (it can no longer release them) vanish within
    ``lease_s``. Chosen over per-replica INCR/DECR counters, which need a registry of live
    replicas to know which counters to sum. On ``memory://`` an in-process counter.

    When Redis fails, the limiter stops asking it for ``probe_s`` s (requests do not each wait
    for a dead server), then the next request tries again; short socket timeouts bound a try.
    """

    def __init__(
        self,
        uri: str = "memory://",
        fail_open: bool = True,
        lease_s: float = 30.0,
        probe_s: float = 1.0,
        timeout_s: float = 0.5,
    ) -> None:
        self.uri, self.fail_open, self.lease_s, self.probe_s = uri, fail_open, lease_s, probe_s
        self.redis: Redis | None = None
        options: dict[str, Any] = {}
        if uri.split("://", 1)[0].removeprefix("async+") != "memory":
            self.redis = _redis_client(uri, timeout_s)
            options = {"implementation": "redispy", "connection_pool": self.redis.connection_pool}
        self.storage = storage_from_string(async_uri(uri), wrap_exceptions=True, **options)
        self.windows = MovingWindowRateLimiter(self.storage)
        self.inflight: dict[str, int] = defaultdict(int)  # memory:// only
        self.leases: dict[str, list[str]] = defaultdict(list)  # Redis: this replica's live ones
        self.replica = uuid.uuid4().hex[:12]
        self.numbers = itertools.count()
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.retry_at = 0.0
        self.renewer: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Task[None]] = set()
        if self.redis is not None:
            self.acquire_script = self.redis.register_script(ACQUIRE)
            self.renew_script = self.redis.register_script(RENEW)

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantLimiter:
        return cls(settings.limits_uri, fail_open=settings.limits_fail_open)

    # ----- admission -----------------------------------------------------------------------
    async def acquire(self, principal: Principal) -> bool:
        """Count one request in; raise a 429 (with ``Retry-After``) when a limit is reached, or
        a 503 when the storage is down and the limiter fails closed. Returns whether
        :meth:`release` must be called."""
        tenant = principal.tenant
        if tenant is None:
            return False
        limits = tenant.limits
        if {limits.max_concurrent, limits.requests_per_minute, limits.tokens_per_minute} == {None}:
            return False
        if self._skipping():
            return self._unavailable()
        try:
            counted = await self._admit(tenant)
        except STORAGE_ERRORS as exc:
            self._failed(exc)
            return self._unavailable()
        self._recovered()
        return counted

    async def _admit(self, tenant: Tenant) -> bool:
        limits, name = tenant.limits, tenant.name
        counted = False
        if limits.max_concurrent is not None:
            counted = await self._count_in(name, limits.max_concurrent)
        try:
            await self._check_windows(tenant)
        except ApiError:
            if counted:
                await self._count_out(name)
            raise
        except BaseException:
            if counted:
                self._count_out_soon(name)
            raise
        return counted

    async def _check_windows(self, tenant: Tenant) -> None:
        """Refuse when either window is full; else count the request in its minute (the check
        and the count are one atomic step in the library: two replicas cannot both take the
        last request)."""
        limits, name = tenant.limits, tenant.name
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = _Window(rpm, namespace="loraswap/requests") if rpm is not None else None
        tokens = _Window(tpm, namespace="loraswap/tokens") if tpm is not None else None
        stats = await asyncio.gather(
            *(self.windows.get_window_stats(item, name) for item in (requests, tokens) if item)
        )
        now = time.time()
        if requests is not None:
            reset, remaining = stats[0]
            if remaining <= 0:
                raise _refuse(f"tenant {name!r} reached {rpm} requests per minute", reset - now)
        if tokens is not None:
            reset, remaining = stats[-1]
            if remaining <= 0:
                used = tpm - remaining
                raise _refuse(
                    f"tenant {name!r} used {used} of {tpm} tokens per minute", reset - now
                )
        if requests is not None and not await self.windows.hit(requests, name):
            reset, _ = await self.windows.get_window_stats(requests, name)
            raise _refuse(f"tenant {name!r} reached {rpm} requests per minute", reset - now)

    async def _count_in(self, name: str, limit: int) -> bool:
        if self.redis is None:
            if self.inflight[name] >= limit:
                raise _busy(name, limit)
            self.inflight[name] += 1
            return True
        lease = f"{self.replica}:{next(self.numbers)}"
        if not await self.acquire_script(
            keys=[_inflight_key(name)], args=[limit, lease, int(self.lease_s * 1000)]
        ):
            raise _busy(name, limit)
        self.leases[name].append(lease)
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return True

    def _leave(self, name: str) -> str | None:
        """One of the tenant's requests left, in process (which one does not matter: they are
        alike). On Redis, the lease to remove from the storage."""
        if self.redis is None:
            self.inflight[name] = max(0, self.inflight[name] - 1)
            if not self.inflight[name]:
                del self.inflight[name]
            return None
        leases = self.leases.get(name)
        if not leases:
            return None
        lease = leases.pop()
        if not leases:
            del self.leases[name]
        return lease

    async def _drop(self, name: str, lease: str) -> None:
        if self._skipping():
            return  # not renewed any more: it expires in the storage by itself
        try:
            await self.redis.zrem(_inflight_key(name), lease)
        except STORAGE_ERRORS as exc:
            self._failed(exc)
        else:
            self._recovered()

    async def _count_out(self, name: str) -> None:
        lease = self._leave(name)
        if lease is not None:
            await self._drop(name, lease)

    async def release(self, principal: Principal) -> None:
        if principal.tenant is not None:
            await self._count_out(principal.tenant.name)

    def release_soon(self, principal: Principal) -> None:
        """:meth:`release` for synchronous code on the event loop (the pipeline's finish): the
        in-process count now, the storage's in a task."""
        if principal.tenant is not None:
            self._count_out_soon(principal.tenant.name)

    def _count_out_soon(self, name: str) -> None:
        lease = self._leave(name)
        if lease is not None:
            self._later(self._drop(name, lease))

    # ----- tokens --------------------------------------------------------------------------
    async def add_tokens(self, principal: Principal, count: int) -> None:
        """Record a finished request's tokens in its tenant's window. Only the newest ``budget``
        entries decide admission and its Retry-After, so at most ``budget`` are stored; the
        recording's larger amount lets it in even when concurrent requests already filled the
        window (a moving window refuses a hit over its amount), retried larger if needed."""
        tenant = principal.tenant
        if tenant is None or count <= 0 or tenant.limits.tokens_per_minute is None:
            return
        if self._skipping():
            return
        budget = tenant.limits.tokens_per_minute
        cost = min(count, budget)
        try:
            for factor in (2, 4, 8):
                if await self.windows.hit(
                    _Window(budget * factor, namespace="loraswap/tokens"), tenant.name, cost=cost
                ):
                    break
            else:
                logger.warning("tenant %r: %d tokens not counted (window full)", tenant.name, count)
        except STORAGE_ERRORS as exc:
            self._failed(exc)
        else:
            self._recovered()

    def add_tokens_soon(self, principal: Principal, count: int) -> None:
        """:meth:`add_tokens` for synchronous code on the event loop (the engine's callback)."""
        if principal.tenant is not None and count > 0:
            self._later(self.add_tokens(principal, count))

    # ----- outages, leases, shutdown -------------------------------------------------------
    def _skipping(self) -> bool:
        """In an outage and not yet time to try the storage again."""
        return self.down_since is not None and time.monotonic() < self.retry_at

    def _unavailable(self) -> bool:
        if self.fail_open:
            return False  # served unlimited: nothing to release
        raise ApiError(
            503,
            "tenant limits cannot be checked now (their storage is unreachable)",
            headers={"retry-after": str(max(1, math.ceil(self.probe_s)))},
        )

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.retry_at = now + self.probe_s
        if self.down_since is None:
            self.down_since = now
            logger.error(
                "tenant limits: storage %s unreachable (%s: %s); %s until it is back",
                _redacted(self.uri),
                type(exc).__name__,
                exc,
                "serving tenants unlimited" if self.fail_open else "refusing tenant requests (503)",
            )

    def _recovered(self) -> None:
        if self.down_since is not None:
            logger.warning(
                "tenant limits: storage %s reachable again after %.1f s",
                _redacted(self.uri),
                time.monotonic() - self.down_since,
            )
            self.down_since = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if self._skipping():
                continue
            try:
                for name, leases in list(self.leases.items()):
                    if leases:
                        ms = int(self.lease_s * 1000)
                        await self.renew_script(keys=[_inflight_key(name)], args=[ms, *leases])
            except STORAGE_ERRORS as exc:
                self._failed(exc)

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task kept until done (:meth:`close` waits for them)."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a generator finalised at exit): nothing left to count
            coro.close()
            return
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("tenant limits: %r", task.exception())

    async def close(self) -> None:
        """Finish scheduled counts, drop this replica's leases (its requests are over) and close
        the connections. The limiter stays usable: it reconnects on its next use."""
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self.renewer is not None:
            self.renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.renewer
            self.renewer = None
        if self.redis is None:
            return
        leases, self.leases = self.leases, defaultdict(list)
        with contextlib.suppress(*STORAGE_ERRORS):
            for name, mine in leases.items():
                if mine:
                    await self.redis.zrem(_inflight_key(name), *mine)
        await self.redis.connection_pool.disconnect()


def _inflight_key(name: str) -> str:
    return f"{PREFIX}/inflight/{name}"


def _redis_client(uri: str, timeout_s: float) -> Redis:
    """One client (and pool) for the library's windows and our leases: short timeouts, one
    immediate retry (a pooled connection broken by a Redis restart reconnects)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    url = uri.removeprefix("async+")
    scheme = url.split("://", 1)[0]
    if scheme not in ("redis", "rediss", "redis+unix"):
        raise ValueError(
            f"limits_uri: memory://, redis://, rediss:// or redis+unix://, not {scheme}://"
        )
    return Redis.from_url(
        url.replace("redis+unix://", "unix://", 1),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def _refuse(message: str, retry_after: float) -> ApiError:
    """A 429 with whole seconds to wait (less 1 ms: the library's Lua returns times to 14
    digits, ~0.1 ms, which must not add a second)."""
    seconds = max(1, math.ceil(retry_after - 0.001))
    return ApiError(429, message, headers={"retry-after": str(seconds)})


def _busy(name: str, limit: int) -> ApiError:
    return _refuse(f"tenant {name!r} has {limit} requests in flight (its limit)", 1)
