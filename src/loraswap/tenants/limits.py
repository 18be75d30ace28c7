"""Per-tenant admission: requests in flight, requests and tokens per minute (sliding window).

Checked when a request is admitted (every inference route and WebSocket message, through the
pipeline); tokens are counted when the engine finishes a request, so a tenant over its token
budget is refused from its next request until the window has room again.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable

from ..errors import ApiError
from .principal import Principal

WINDOW_S = 60.0


class TenantLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.inflight: dict[str, int] = defaultdict(int)
        self.requests: dict[str, deque[float]] = defaultdict(deque)
        self.tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def _expire(self, name: str, now: float) -> None:
        requests, tokens = self.requests[name], self.tokens[name]
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW_S:
            tokens.popleft()

    @staticmethod
    def _refuse(message: str, retry_after: float) -> ApiError:
        return ApiError(429, message, headers={"retry-after": str(max(1, math.ceil(retry_after)))})

    def acquire(self, principal: Principal) -> bool:
        """Count one request in; raise a 429 (with ``Retry-After``) when a limit is reached.
        Returns whether :meth:`release` must be called."""
        tenant = principal.tenant
        if tenant is None:
            return False
        limits, name, now = tenant.limits, tenant.name, self.clock()
        self._expire(name, now)
        if limits.max_concurrent is not None and self.inflight[name] >= limits.max_concurrent:
            raise self._refuse(
                f"tenant {name!r} has {limits.max_concurrent} requests in flight (its limit)", 1
            )
        requests = self.requests[name]
        if limits.requests_per_minute is not None and len(requests) >= limits.requests_per_minute:
            raise self._refuse(
                f"tenant {name!r} reached {limits.requests_per_minute} requests per minute",
                requests[0] + WINDOW_S - now,
            )
        if limits.tokens_per_minute is not None:
            used = sum(n for _, n in self.tokens[name])
            if used >= limits.tokens_per_minute:
                raise self._refuse(
                    f"tenant {name!r} used {used} of {limits.tokens_per_minute} tokens per minute",
                    self._tokens_free_at(name, used - limits.tokens_per_minute + 1) - now,
                )
        requests.append(now)
        self.inflight[name] += 1
        return True

    def _tokens_free_at(self, name: str, needed: int) -> float:
        freed = 0
        for at, n in self.tokens[name]:
            freed += n
            if freed >= needed:
                return at + WINDOW_S
        return self.clock() + WINDOW_S

    def release(self, principal: Principal) -> None:
        if principal.tenant is not None:
            self.inflight[principal.tenant.name] -= 1

    def add_tokens(self, principal: Principal, count: int) -> None:
        if principal.tenant is not None and count > 0:
            self.tokens[principal.tenant.name].append((self.clock(), count))
