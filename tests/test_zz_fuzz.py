"""Fuzz every operation of the served OpenAPI document with schemathesis: no input may get a 5xx.

`make test` runs a bounded, deterministic profile (``FUZZ_EXAMPLES`` cases per operation, seeded
generation: the same cases on every machine); `make fuzz` runs a longer one bounded by
``FUZZ_TIME`` seconds. Both hit a server of their own whose output bounds are tiny (every
generating case costs a few tokens, so the run's length does not depend on the CPU) and which
nothing else uses. Allowed answers are every 2xx-4xx; any 5xx fails.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from tests.conftest import server_env
from tests.server import ROOT, Server

SCHEMATHESIS = ROOT / ".venv-fuzz" / "bin" / "schemathesis"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, adapter_root, s3):
    state = tmp_path_factory.mktemp("fuzzed")
    env = server_env(
        adapter_root, state, s3, LORASWAP_DEFAULT_MAX_TOKENS="4", LORASWAP_MAX_TOKENS_LIMIT="8"
    )
    srv = Server(state / "serve.log", env=env).start()
    yield srv
    assert not srv.stop(), "processes left after SIGTERM"


def test_no_operation_answers_5xx(fuzzed: Server, tmp_path):
    if not SCHEMATHESIS.exists():
        pytest.skip("schemathesis is installed into .venv-fuzz by `make test` and `make fuzz`")
    budget = os.environ.get("FUZZ_TIME")
    if budget:
        bounds = ["--max-time", budget]
    else:
        bounds = ["--max-examples", os.environ.get("FUZZ_EXAMPLES", "5"),
                  "--phases", "examples,fuzzing"]  # fmt: skip
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{fuzzed.url}/docs.json", *bounds,
         "--checks", "not_a_server_error", "--workers", "1",
         "--request-timeout", "120", "--generation-deterministic",
         # adapter deletion would remove the shipped adapters the run's other cases use
         "--exclude-method", "DELETE"],
        capture_output=True, text=True, timeout=int(budget or 1800) + 600, cwd=tmp_path,
    )  # fmt: skip
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, summary
    assert httpx.get(f"{fuzzed.url}/readyz", timeout=30).status_code == 200
