from __future__ import annotations

import pytest
from openai import OpenAI

from tests.server import Server

BASE_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The real server (vLLM CPU engine, default model), started once per test session."""
    srv = Server(tmp_path_factory.mktemp("server") / "serve.log").start()
    yield srv
    left = srv.stop()
    assert not left, f"processes left after SIGTERM: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
