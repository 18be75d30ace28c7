"""Tenant limits that hold across replicas: the same behaviours on ``memory://`` and on a real
Redis, then two limiters ("replicas") sharing one Redis, a crashed replica's leases, a Redis
killed mid-way (fail open, fail closed, logged once, recovery) and the pipeline's use of it.

Minutes pass on a fake clock (the library's and the limiter's ``time.time``), so no test waits;
on Redis the token counters' windows run on the server's clock (their TTLs), so :func:`later`
also shortens those TTLs by the time that passes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import limits.aio.storage.memory
import limits.aio.storage.redis.redispy
import pytest

import loraswap.tenants.limits
from loraswap import metrics
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.pipeline import EngineRun, RequestPipeline
from loraswap.tenants import Limits, Principal, Tenant
from loraswap.tenants.limits import TenantLimiter
from loraswap.tenants.principal import CURRENT, DEFAULT_USER
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 (redis_server)

LOGGER = "loraswap.tenants.limits"


def tenant(**limits: int) -> Principal:
    """A tenant of its own (a fresh name: tests share one Redis)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    return Principal(name, Tenant(name=name, limits=Limits(**limits)), admin=False)


class FakeTime:
    """``time`` with a settable ``time()``; the rest (monotonic, sleep) is the real one. It
    starts on a minute, where ``memory://``'s token windows start (on Redis they start at the
    tenant's first tokens): the same test gives the same numbers on both."""

    def __init__(self) -> None:
        self.now = float(math.ceil(time.time() / 60) * 60)

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    for module in (limits.aio.storage.memory, limits.aio.storage.redis.redispy,
                   loraswap.tenants.limits):  # fmt: skip
        monkeypatch.setattr(module, "time", fake)
    return fake


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Callable[..., TenantLimiter]:
    uri = "memory://"
    if request.param == "redis":
        uri = request.getfixturevalue("redis_server").uri
    return lambda **kw: TenantLimiter(uri, **kw)


async def later(clock: FakeTime | None, limiter: TenantLimiter, who: Principal, s: float) -> None:
    """``s`` seconds pass: on the fake clock, and for ``who``'s token counters on Redis (their
    TTLs, which the sliding window counter reads as the time left in its minutes)."""
    if clock is not None:
        clock.now += s
    if limiter.redis is None:
        return
    async for key in limiter.redis.scan_iter(match=f"LIMITS:{{loraswap/tokens/{who.name}}}*"):
        left = await limiter.redis.pttl(key) - int(s * 1000)
        await (limiter.redis.pexpire(key, left) if left > 0 else limiter.redis.delete(key))


def refused(coro: Any) -> ApiError:
    async def run() -> ApiError:
        with pytest.raises(ApiError) as err:
            await coro
        return err.value

    return run()


# ----- the same behaviours on memory:// and Redis ---------------------------------------------
def test_in_flight_limit_and_release(make_limiter):
    async def scenario() -> None:
        limiter, acme = make_limiter(), tenant(max_concurrent=2)
        assert await limiter.acquire(acme) and await limiter.acquire(acme)
        busy = await refused(limiter.acquire(acme))
        assert busy.status == 429 and busy.headers == {"retry-after": "1"}
        assert busy.message == f"tenant {acme.name!r} has 2 requests in flight (its limit)"
        await limiter.release(acme)
        assert await limiter.acquire(acme)
        await limiter.close()

    asyncio.run(scenario())


def test_requests_per_minute_retry_after_and_window(make_limiter, clock):
    async def scenario() -> None:
        limiter, acme = make_limiter(), tenant(requests_per_minute=3)
        assert await limiter.acquire(acme) is False  # no in-flight limit: nothing to release
        await limiter.acquire(acme)
        clock.now += 10
        await limiter.acquire(acme)
        rpm = await refused(limiter.acquire(acme))
        assert rpm.message == f"tenant {acme.name!r} reached 3 requests per minute"
        assert rpm.headers["retry-after"] == "50"  # the first one leaves the window at +60 s
        clock.now += 51
        await limiter.acquire(acme)  # two left the window
        await limiter.acquire(acme)
        assert (await refused(limiter.acquire(acme))).headers[
            "retry-after"
        ] == "9"  # t+10 leaves at t+70
        await limiter.close()

    asyncio.run(scenario())


def test_tokens_per_minute_refuse_at_the_budget(make_limiter, clock):
    """The sliding window counter: last minute's count weighted by the share of it still in the
    sliding minute, plus this minute's; refused at the budget until it falls below."""

    async def scenario() -> None:
        limiter, acme = make_limiter(), tenant(tokens_per_minute=100)
        await limiter.acquire(acme)
        await limiter.add_tokens(acme, 60)  # t=0: the minute [0, 60) starts
        await later(clock, limiter, acme, 5)
        await limiter.acquire(acme)  # 60 < 100: admitted, though it may take the window over
        await limiter.add_tokens(acme, 60)
        tpm = await refused(limiter.acquire(acme))
        assert tpm.status == 429
        assert tpm.message == f"tenant {acme.name!r} used 120 of 100 tokens per minute"
        # at t=70 the 120 of [0, 60) weigh 120 * 50/60 = 100, below it from then on
        assert tpm.headers["retry-after"] == "65"
        await later(clock, limiter, acme, 64)  # t=69: 120 * 51/60 = 102
        assert (await refused(limiter.acquire(acme))).headers["retry-after"] == "1"
        await later(clock, limiter, acme, 2)  # t=71: 120 * 49/60 = 98
        await limiter.acquire(acme)
        await limiter.add_tokens(acme, 1)  # 99: still room
        await limiter.acquire(acme)
        await limiter.add_tokens(acme, 5)  # 104
        tpm = await refused(limiter.acquire(acme))
        assert tpm.headers["retry-after"] == "2"  # 120 * 47/60 + 6 = 100 at t=73
        await later(clock, limiter, acme, 61)  # t=132: [60, 120)'s 6 weigh 6 * 48/60 = 4.8
        await limiter.acquire(acme)
        await limiter.add_tokens(acme, 10_000)  # one request over the whole budget: all counted
        tpm = await refused(limiter.acquire(acme))
        assert tpm.message == f"tenant {acme.name!r} used 10004 of 100 tokens per minute"
        # 48 s to this minute's end, then 10_000 * (60 - s)/60 < 100 after s = 59.4 s
        assert tpm.headers["retry-after"] == "108"
        await limiter.close()

    asyncio.run(scenario())


def test_a_refused_request_leaks_no_in_flight_count(make_limiter):
    """In flight is checked first: a count left behind would turn the next 429s into
    "in flight" ones."""

    async def scenario() -> None:
        limiter = make_limiter()
        by_minute = tenant(max_concurrent=1, requests_per_minute=1)
        by_tokens = tenant(max_concurrent=1, tokens_per_minute=10)
        for acme in (by_minute, by_tokens):
            assert await limiter.acquire(acme)
            await limiter.add_tokens(acme, 20)
            await limiter.release(acme)
        for _ in range(3):
            assert "requests per minute" in (await refused(limiter.acquire(by_minute))).message
            assert "tokens per minute" in (await refused(limiter.acquire(by_tokens))).message
        assert not limiter.inflight.held
        await limiter.close()

    asyncio.run(scenario())


def test_principals_without_limits_are_not_counted(make_limiter):
    async def scenario() -> None:
        limiter = make_limiter()
        assert await limiter.acquire(DEFAULT_USER) is False  # not a tenant
        assert await limiter.acquire(tenant()) is False  # a tenant without limits
        await limiter.add_tokens(DEFAULT_USER, 10)
        await limiter.close()

    asyncio.run(scenario())


# ----- two replicas sharing one Redis ---------------------------------------------------------
def replicas(server: RedisServer, **kw: Any) -> tuple[TenantLimiter, TenantLimiter]:
    return TenantLimiter(server.uri, **kw), TenantLimiter(server.uri, **kw)


async def outcome(coro: Any) -> str:
    try:
        return "counted" if await coro else "served"
    except ApiError as exc:
        return str(exc.status)


def test_requests_per_minute_hold_across_replicas(redis_server):
    async def scenario() -> None:
        a, b = replicas(redis_server)
        acme = tenant(requests_per_minute=7)
        got = await asyncio.gather(*(outcome((a, b)[i % 2].acquire(acme)) for i in range(20)))
        assert got.count("served") == 7 and got.count("429") == 13, got
        for limiter in (a, b):  # both refuse from now on, with the same window
            err = await refused(limiter.acquire(acme))
            assert "7 requests per minute" in err.message and err.headers["retry-after"] == "60"
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_tokens_per_minute_hold_across_replicas(redis_server):
    async def scenario() -> None:
        a, b = replicas(redis_server)
        acme = tenant(tokens_per_minute=100)

        async def serve() -> int:
            accepted = 0
            for i in range(10):  # requests of 30 tokens, alternately on each replica
                try:
                    await (a, b)[i % 2].acquire(acme)
                except ApiError as exc:
                    assert "tokens per minute" in exc.message
                    continue
                accepted += 1
                await (b, a)[i % 2].add_tokens(acme, 30)  # whichever replica served it
            return accepted

        accepted = await serve()
        assert accepted * 30 <= 100 + 30 and accepted == 4  # 0, 30, 60, 90 were under 100
        await later(None, a, acme, 90)  # half-way through the next minute: 120 weigh 60
        assert await serve() == 2  # at 60 and 90; 120 refused
        for limiter in (a, b):  # both refuse, with the same wait: 120 * 20/60 + 60 = 100
            err = await refused(limiter.acquire(acme))
            assert err.message.endswith("of 100 tokens per minute")  # 120 less a few ms' worth
            assert err.headers["retry-after"] == "10"
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_in_flight_limit_holds_across_replicas(redis_server):
    async def scenario() -> None:
        a, b = replicas(redis_server)
        acme = tenant(max_concurrent=4)
        got = await asyncio.gather(*(outcome((a, b)[i % 2].acquire(acme)) for i in range(10)))
        assert got.count("counted") == 4 and got.count("429") == 6, got
        holder = a if a.inflight.held else b
        other = b if holder is a else a
        await holder.release(acme)
        assert await other.acquire(acme)  # the freed place, taken on the other replica
        assert (await outcome(holder.acquire(acme))) == "429"
        for limiter in (a, b):
            while limiter.inflight.held:
                await limiter.release(acme)
        got = await asyncio.gather(*(outcome(b.acquire(acme)) for _ in range(5)))
        assert got.count("counted") == 4
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_crashed_replicas_leases_expire_and_live_ones_are_renewed(redis_server):
    async def scenario() -> None:
        a, b = replicas(redis_server, lease_s=0.6)
        acme = tenant(max_concurrent=2)
        assert await a.acquire(acme) and await a.acquire(acme)
        a.inflight.renewer.cancel()  # a crashes: no release, no renewal
        assert (await outcome(b.acquire(acme))) == "429"
        await asyncio.sleep(0.7)
        assert await b.acquire(acme)  # a's leases are gone; b's own is renewed from now on
        await asyncio.sleep(1.5)  # > 2 leases
        assert await b.acquire(acme)
        assert (await outcome(b.acquire(acme))) == "429"  # both of b's still count
        a.inflight.held.clear()
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_large_token_count_takes_constant_space(make_limiter, clock):
    """Millions of tokens are two counters, not an entry per token (a moving window's)."""

    async def scenario() -> None:
        a = make_limiter()
        b = make_limiter() if a.redis is not None else a  # two replicas on Redis
        acme = tenant(tokens_per_minute=10_000_000)
        await a.acquire(acme)
        await a.add_tokens(acme, 5_000_000)
        assert await b.acquire(acme) is False  # 5M < 10M
        for _ in range(10):
            await b.add_tokens(acme, 600_000)
        for limiter in {a, b}:
            err = await refused(limiter.acquire(acme))
            assert err.message == (
                f"tenant {acme.name!r} used 11000000 of 10000000 tokens per minute"
            )
            assert err.headers["retry-after"] == "66"  # 60 s + 60 * (1 - 10/11) = 65.5 s
        if b.redis is not None:
            redis = b.redis
            keys = [k async for k in redis.scan_iter(match=f"*{acme.name}*")]
            assert keys == [f"LIMITS:{{loraswap/tokens/{acme.name}}}".encode()]
            assert await redis.type(keys[0]) == b"string"  # a counter: INCRBY, GET
            assert await redis.get(keys[0]) == b"11000000"
            assert await redis.memory_usage(keys[0]) < 200  # bytes
        else:
            storage = b.storage
            assert not storage.events  # the moving windows' per-entry lists
            assert [v for k, v in storage.storage.items() if acme.name in k] == [11_000_000]
        for limiter in {a, b}:
            await limiter.close()

    asyncio.run(scenario())


# ----- Redis down mid-way ---------------------------------------------------------------------
@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_outage_fails_open_or_closed_logged_once_and_recovers(
    throwaway_redis, caplog, fail_open
):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def logged(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    async def scenario() -> None:
        limiter = TenantLimiter(throwaway_redis.uri, fail_open=fail_open, probe_s=0.1)
        acme = tenant(max_concurrent=2, requests_per_minute=1000, tokens_per_minute=10**6)
        assert await limiter.acquire(acme)
        throwaway_redis.stop(kill=True)
        started = time.monotonic()
        for _ in range(20):  # more than the in-flight limit: nothing is counted now
            if fail_open:
                assert await limiter.acquire(acme) is False  # served, unlimited
            else:
                err = await refused(limiter.acquire(acme))
                assert err.status == 503 and err.headers == {"retry-after": "1"}
                assert err.body()["error"]["type"] == "ServiceUnavailableError"
            await limiter.add_tokens(acme, 50)  # dropped, never raised
            await asyncio.sleep(0.01)
        await limiter.release(acme)  # its lease went with the server
        assert time.monotonic() - started < 3  # no request waited long on the dead server
        (down,) = logged("unreachable")
        assert down.levelno == logging.ERROR
        expected = "serving tenants unlimited" if fail_open else "refusing tenant requests (503)"
        assert expected in down.getMessage() and not logged("reachable again")

        throwaway_redis.start()  # the same port, empty
        await asyncio.sleep(0.15)  # past the probe interval
        assert await limiter.acquire(acme) and await limiter.acquire(acme)
        assert (await outcome(limiter.acquire(acme))) == "429"
        assert len(logged("reachable again")) == 1 and len(logged("unreachable")) == 1
        await limiter.close()

    asyncio.run(scenario())


# ----- the pipeline -----------------------------------------------------------------------------
def test_pipeline_counts_in_admit_and_out_at_finish_and_tokens_at_the_engine(clock, monkeypatch):
    monkeypatch.setattr(metrics.TRAFFIC, "record", lambda *a: None)
    settings = Settings()
    limiter = TenantLimiter()
    pipe = RequestPipeline(settings, tenancy=SimpleNamespace(limiter=limiter))
    acme = tenant(max_concurrent=1, tokens_per_minute=50)
    body = {"model": settings.served_model_name, "messages": [{"role": "user", "content": "hi"}]}

    async def scenario() -> None:
        CURRENT.set(acme)
        admission = await pipe.admit("/v1/chat/completions", dict(body))
        assert admission.limited
        assert (
            "in flight" in (await refused(pipe.admit("/v1/chat/completions", dict(body)))).message
        )
        pipe.tenancy.usage = SimpleNamespace(record=lambda *a, **k: None)
        pipe.engine_done(EngineRun(prompt_tokens=40, completion_tokens=20, latency_s=0.1))
        pipe.finish(admission, ok=True)
        await asyncio.sleep(0)  # the scheduled token count
        await asyncio.gather(*limiter.pending)
        assert (
            "tokens per minute" in (await refused(pipe.admit("/v1/chat/completions", body))).message
        )
        await limiter.close()

    asyncio.run(scenario())
