"""Start, readiness, engine death and shutdown of a real server: nothing may be left running."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.server import Server

pytestmark = pytest.mark.engine


def wait_status(url: str, status: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    code = -1
    while time.monotonic() < deadline:
        try:
            code = httpx.get(url, timeout=5).status_code
        except httpx.HTTPError:
            code = -1
        if code == status:
            break
        time.sleep(1)
    return code


def test_dead_engine_is_not_ready_and_sigterm_leaves_nothing(tmp_path):
    srv = Server(tmp_path / "serve.log").start()
    try:
        engine = srv.engine_core()
        engine.kill()
        assert wait_status(f"{srv.url}/readyz", 503) == 503, srv.log_tail()
        assert wait_status(f"{srv.url}/livez", 503) == 503, srv.log_tail()
        srv.signal(signal.SIGTERM)
        left = srv.wait_gone()
        assert not left, f"left after SIGTERM: {[(p.pid, p.name()) for p in left]}"
    finally:
        srv.stop()


def test_ctrl_c_stops_the_engine_and_leaves_nothing(tmp_path):
    srv = Server(tmp_path / "serve.log").start()
    try:
        assert len(srv.known) >= 3, "expected the server, its worker and the engine core"
        srv.signal(signal.SIGINT, group=True)  # what a terminal's Ctrl-C does
        left = srv.wait_gone()
        assert not left, f"left after Ctrl-C: {[(p.pid, p.name()) for p in left]}"
        assert "stopping vLLM engine" in srv.log_path.read_text(errors="replace")
    finally:
        srv.stop()
