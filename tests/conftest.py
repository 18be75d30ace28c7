from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from openai import OpenAI

from loraswap.adapters.validation import BaseModelShapes
from tests.server import ROOT, Server, free_port

BASE_MODEL = "smollm2-135m-instruct"
SHIPPED = ROOT / "adapters"
# Fixtures that start a real server (or build Bentos): their tests carry the `engine` marker, so
# `pytest -m "not engine"` runs the fast tests alone, starting no server.
ENGINE_FIXTURES = {"server", "client", "locked", "fp32_server", "built", "tenanted", "fuzzed",
                   "console"}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    return Path(bentoml.models.get(f"{BASE_MODEL}:latest").path)


@pytest.fixture(scope="session")
def base_shapes(base_model_dir: Path) -> BaseModelShapes:
    return BaseModelShapes.from_checkpoint(base_model_dir)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A local S3-compatible server (moto) on loopback, with one bucket."""
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint}}
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("loraswap-test")
    yield {"endpoint": endpoint, "options": options, "fs": fs, "bucket": "loraswap-test"}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the session (PostgreSQL's own initdb/pg_ctl)."""
    from tests import postgres_server

    if not postgres_server.available():
        pytest.fail("PostgreSQL's initdb/pg_ctl are missing: `make servers` installs them")
    with postgres_server.postgres() as url:
        yield url


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An extra adapter root for adapters the tests write."""
    return tmp_path_factory.mktemp("adapter-root")


def server_env(adapter_root: Path, state_dir: Path, s3: dict, **extra: str) -> dict[str, str]:
    """A test server's settings. Four engine slots unless a test asks otherwise: the slot count
    is part of vLLM's compile key, so every server with the default model shares one compile
    (a fresh machine compiles once, ~3 min, instead of once per slot count)."""
    return {
        "LORASWAP_MAX_LORAS": "4",
        "LORASWAP_ADAPTER_ROOTS": json.dumps([str(SHIPPED), str(adapter_root)]),
        "LORASWAP_REGISTRY_URI": str(state_dir / "registry.json"),
        "LORASWAP_ADAPTER_CACHE_DIR": str(state_dir / "cache"),
        "LORASWAP_STATE_DIR": str(state_dir / "state"),
        "LORASWAP_FSSPEC_STORAGE_OPTIONS": json.dumps(s3["options"]),
        **extra,
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path, s3: dict):
    """The real server (vLLM CPU engine, default model), started once per test session."""
    state = tmp_path_factory.mktemp("server")
    # Few engine slots, so the adapter tests reuse slots (where the vLLM CPU index bug showed)
    # and pins meet the slot limit; a count-bounded host tier (the default is bounded in bytes,
    # see test_residency), so the LRU test evicts.
    env = server_env(adapter_root, state, s3, LORASWAP_MAX_CPU_LORAS="8")
    srv = Server(state / "serve.log", env=env).start()
    yield srv
    left = srv.stop()
    assert not left, f"processes left after SIGTERM: {[p.pid for p in left]}"


ROOT_KEY = "root-key-1"
METRICS_TOKEN = "scrape-token-1"


@pytest.fixture(scope="module")
def tenanted(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path, s3: dict):
    """A real server with a global admin key (tenants, the console's admin actions); one per
    module: each `bentoml serve` empties BentoML's shared Prometheus directory at start, so a
    server kept across modules loses its series when a later module starts another."""
    state = tmp_path_factory.mktemp("tenanted")
    env = server_env(adapter_root, state, s3, LORASWAP_ADMIN_API_KEYS=ROOT_KEY,
                     LORASWAP_METRICS_TOKEN=METRICS_TOKEN)  # fmt: skip
    srv = Server(state / "serve.log", env=env).start()
    srv.state = state
    yield srv
    assert not srv.stop(), "processes left after SIGTERM"


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
