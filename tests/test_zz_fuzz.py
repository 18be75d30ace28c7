"""Fuzz every operation of the served OpenAPI document with schemathesis: no input may get a 5xx.

Runs with `make fuzz` (which sets ``FUZZ_TIME``, seconds), last (the name), against the session's
real server; plain `make test` skips it (a time-bounded fuzz run is not the same set of cases on
every machine). Allowed answers are every 2xx-4xx; any 5xx fails.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from tests.server import ROOT, Server

SCHEMATHESIS = ROOT / ".venv-fuzz" / "bin" / "schemathesis"


def test_no_operation_answers_5xx(server: Server, tmp_path):
    budget = os.environ.get("FUZZ_TIME")
    if not budget:
        pytest.skip("fuzzing runs with `make fuzz`")
    assert SCHEMATHESIS.exists(), "`make fuzz` installs schemathesis into .venv-fuzz"
    bounds = ["--max-time", budget]
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server.url}/docs.json", *bounds,
         "--checks", "not_a_server_error", "--workers", "1",
         "--request-timeout", "120", "--generation-deterministic",
         # adapter deletion would remove the shipped adapters other tests rely on
         "--exclude-method", "DELETE"],
        capture_output=True, text=True, timeout=int(budget or 600) + 600, cwd=tmp_path,
    )  # fmt: skip
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, summary
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
