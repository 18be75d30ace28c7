"""Per-tenant admission that holds across replicas: requests in flight, requests and tokens per
minute, counted in the storage ``limits_uri`` names (``memory://`` per process, ``redis://`` for
the fleet), with the ``limits`` library's async API (``limits.aio``: it runs on the event loop).

Requests per minute: the library's moving window (one entry per request, at most the limit).
Tokens per minute: its sliding window counter, two counters per tenant (this minute's and the
last one's) whatever the budget, so a 10-million-token budget costs Redis two small strings, not
an entry per token. Tokens are known only when the engine finishes a request, so they are
recorded then, never refused, even past the budget. A request is admitted while the tenant's
weighted count (last minute's tokens times the share of that minute the sliding minute still
covers, plus this minute's) is below the budget, else refused with 429 until it falls below.

The weighting assumes last minute's tokens were spread evenly over it, so the bound is
approximate: in each counter minute (on Redis, minutes from the tenant's first recorded tokens,
timed by the server; on ``memory://``, clock minutes) a tenant gets at most its budget plus
what its admitted requests use (one request's worth per request in flight), as with an exact
window; over an arbitrary 60 s span up to about twice that when the previous minute's tokens
came at its very end (and it is refused below its budget when they came at its start).

In flight: Redis leases (:mod:`.inflight`). A storage outage never answers 500: it serves
unlimited (``limits_fail_open``) or refuses tenant requests with 503, logged once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.limits import safe_string
from limits.storage import storage_from_string

from ..errors import ApiError
from .inflight import STORAGE_ERRORS, Leases, LocalCount
from .principal import Principal

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..config import Settings
    from .model import Tenant

logger = logging.getLogger(__name__)

MINUTE = 60  # s: the windows' length
REQUESTS, TOKENS = "loraswap/requests", "loraswap/tokens"  # the windows' namespaces
UNCAPPED = 2**53 - 1  # a token window no recording fills (exact in Lua's doubles)


class _Window(RateLimitItemPerMinute):
    """A one-minute window keyed by namespace and tenant only, not by its amount: the token
    recording (a window no count fills) and the check read the same counters, and a tenant
    whose limit changes keeps its window."""

    def key_for(self, *identifiers: bytes | str | int | float) -> str:
        return "/".join([self.namespace, *(safe_string(i) for i in identifiers)])


class TokenWindow(NamedTuple):
    """A tenant's token counters as the storage's ``get_sliding_window`` reads them: last
    minute's count and the seconds until it stops counting (this minute's end), this minute's
    count and the seconds until it expires (its end plus a minute)."""

    previous: int
    previous_ttl: float
    current: int
    current_ttl: float

    @property
    def used(self) -> float:
        """The weighted count, as the library's sliding window counter computes it."""
        return self.previous * self.previous_ttl / MINUTE + self.current

    def below_in(self, budget: int) -> float:
        """Seconds until :attr:`used` falls below ``budget`` if no more tokens are recorded.

        Last minute's share falls linearly to 0 at this minute's end, then this minute's count
        becomes last minute's and falls the same way. (The library's own reset time is when one
        more token fits: microseconds away for millions of last minute's tokens, else this
        minute's end, while a count over the budget keeps weighing after it.)
        """
        if self.current < budget:
            if not self.previous:
                return 0.0
            return self.previous_ttl - (budget - self.current) * MINUTE / self.previous
        to_minute_end = max(0.0, self.current_ttl - MINUTE)
        return to_minute_end + MINUTE * (1 - budget / self.current)


def async_uri(uri: str) -> str:
    """``redis://…`` / ``memory://`` as the library's async scheme (``async+redis://…``)."""
    return uri if uri.startswith("async+") else f"async+{uri}"


def _redacted(uri: str) -> str:
    """Without its password, for the log."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


class TenantLimiter:
    """Counts each tenant's requests and tokens in one storage shared by every replica.

    In flight: :class:`~.inflight.Leases` on Redis (renewed by their replica, a crashed
    replica's expire within ``lease_s``), :class:`~.inflight.LocalCount` on ``memory://``.

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
        self.windows = MovingWindowRateLimiter(self.storage)  # requests
        self.counters = SlidingWindowCounterRateLimiter(self.storage)  # tokens
        self.inflight: LocalCount | Leases = (
            LocalCount()
            if self.redis is None
            else Leases(self.redis, lease_s, skipping=self._skipping, failed=self._failed)
        )
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.retry_at = 0.0
        self.pending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantLimiter:
        return cls(settings.limits_uri, fail_open=settings.limits_fail_open)

    # ----- admission -----------------------------------------------------------------------
    async def acquire(self, principal: Principal) -> bool:
        """Count one request in; raise a 429 (with ``Retry-After``) when a limit is reached, or
        a 503 when the storage is down and the limiter fails closed. Returns whether
        :meth:`release` must be called.

        Tokens per minute: a 429 while the tenant's weighted count (an approximation of the
        last 60 s, see the module) is at its budget or more, ``Retry-After`` the seconds until
        it falls below if no more tokens are recorded (at least 1)."""
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
            if not await self.inflight.take(name, limits.max_concurrent):
                raise _busy(name, limits.max_concurrent)
            counted = True
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
        last request). Tokens are only read here: :meth:`add_tokens` counts them."""
        limits, name = tenant.limits, tenant.name
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = _Window(rpm, namespace=REQUESTS) if rpm is not None else None
        reads: list[Coroutine[Any, Any, Any]] = []
        if requests is not None:
            reads.append(self.windows.get_window_stats(requests, name))
        if tpm is not None:
            reads.append(self._tokens(name))
        stats = await asyncio.gather(*reads)
        now = time.time()
        if requests is not None:
            reset, remaining = stats[0]
            if remaining <= 0:
                raise _refuse(f"tenant {name!r} reached {rpm} requests per minute", reset - now)
        if tpm is not None:
            tokens: TokenWindow = stats[-1]
            if tokens.used >= tpm:
                raise _refuse(
                    f"tenant {name!r} used {math.floor(tokens.used)} of {tpm} tokens per minute",
                    tokens.below_in(tpm),
                )
        if requests is not None and not await self.windows.hit(requests, name):
            reset, _ = await self.windows.get_window_stats(requests, name)
            raise _refuse(f"tenant {name!r} reached {rpm} requests per minute", reset - now)

    async def _tokens(self, name: str) -> TokenWindow:
        key = _Window(1, namespace=TOKENS).key_for(name)
        return TokenWindow(*await self.storage.get_sliding_window(key, MINUTE))

    async def _drop(self, name: str, lease: str) -> None:
        if self._skipping():
            return  # not renewed any more: it expires in the storage by itself
        try:
            await self.inflight.drop(name, lease)
        except STORAGE_ERRORS as exc:
            self._failed(exc)
        else:
            self._recovered()

    async def _count_out(self, name: str) -> None:
        lease = self.inflight.leave(name)
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
        lease = self.inflight.leave(name)
        if lease is not None:
            self._later(self._drop(name, lease))

    # ----- tokens --------------------------------------------------------------------------
    async def add_tokens(self, principal: Principal, count: int) -> None:
        """Record a finished request's tokens in its tenant's window, all of them even past the
        budget: a hit on a window no count fills (one INCRBY of this minute's counter)."""
        tenant = principal.tenant
        if tenant is None or count <= 0 or tenant.limits.tokens_per_minute is None:
            return
        if self._skipping():
            return
        try:
            if not await self.counters.hit(
                _Window(UNCAPPED, namespace=TOKENS), tenant.name, cost=min(count, UNCAPPED)
            ):
                logger.warning("tenant %r: %d tokens not counted", tenant.name, count)
        except STORAGE_ERRORS as exc:
            self._failed(exc)
        else:
            self._recovered()

    def add_tokens_soon(self, principal: Principal, count: int) -> None:
        """:meth:`add_tokens` for synchronous code on the event loop (the engine's callback)."""
        if principal.tenant is not None and count > 0:
            self._later(self.add_tokens(principal, count))

    # ----- outages, shutdown ---------------------------------------------------------------
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
        await self.inflight.close()
        if self.redis is not None:
            await self.redis.connection_pool.disconnect()


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
