"""The drain's logic with stand-ins (the fleet test's rolling update runs it for real)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from loraswap.drain import Drain, DrainMiddleware


def test_sigterm_drains_then_hands_over_to_the_server_s_own_exit():
    exits, handed_back = [], []

    async def main() -> None:
        drain = Drain(drain_s=5, notice_s=0.2)

        async def before_wait() -> None:
            handed_back.append(drain.draining)

        previous = signal.signal(signal.SIGTERM, lambda sig, frame: exits.append(time.monotonic()))
        try:
            drain.install(before_wait)
            drain.inflight = 1  # a stream in flight
            sent = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert drain.draining and not exits  # not ready at once; the stream still runs
            drain.inflight = 0
            await asyncio.sleep(0.2)
            assert len(exits) == 1 and exits[0] - sent >= 0.5
        finally:
            signal.signal(signal.SIGTERM, previous)

    asyncio.run(main())
    assert handed_back == [True]


def test_the_drain_waits_no_longer_than_drain_s():
    done = []

    async def main() -> None:
        drain = Drain(drain_s=0.3, notice_s=0)
        drain.inflight = 2

        async def nothing() -> None:
            return None

        started = time.monotonic()
        await drain.run(nothing, lambda: done.append(time.monotonic() - started))

    asyncio.run(main())
    assert len(done) == 1 and 0.3 <= done[0] < 1.0


def test_requests_are_counted_until_their_last_byte_and_probes_not_at_all():
    seen = []
    drain = Drain(drain_s=1, notice_s=0)

    async def app(scope, receive, send) -> None:
        seen.append((scope["path"], drain.inflight))

    async def main() -> None:
        middleware = DrainMiddleware(app, drain)
        for path in ("/v1/chat/completions", "/readyz", "/livez", "/metrics", "/generate_stream"):
            await middleware({"type": "http", "path": path}, None, None)

    asyncio.run(main())
    assert seen == [("/v1/chat/completions", 1), ("/readyz", 0), ("/livez", 0), ("/metrics", 0),
                    ("/generate_stream", 1)]  # fmt: skip
    assert drain.inflight == 0


def test_a_hand_back_that_hangs_does_not_hold_the_stop():
    done = []

    async def main() -> None:
        drain = Drain(drain_s=0.3, notice_s=0)

        async def stuck() -> None:
            await asyncio.sleep(3600)

        started = time.monotonic()
        await drain.run(stuck, lambda: done.append(time.monotonic() - started))

    asyncio.run(main())
    assert len(done) == 1 and done[0] < 2.0
