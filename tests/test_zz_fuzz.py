"""Fuzz every operation of the served OpenAPI document with schemathesis: no input may get a 5xx.

Runs last (the name), against the session's real server, for ``FUZZ_TIME`` seconds (short in
`make test`, longer with `make fuzz`). Allowed answers are every 2xx-4xx; any 5xx fails.
"""

from __future__ import annotations

import os
import subprocess

import httpx

from tests.server import ROOT, Server

SCHEMATHESIS = ROOT / ".venv-fuzz" / "bin" / "schemathesis"


def test_no_operation_answers_5xx(server: Server, tmp_path):
    assert SCHEMATHESIS.exists(), "`make test` installs schemathesis into .venv-fuzz"
    budget = int(os.environ.get("FUZZ_TIME", "90"))
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server.url}/docs.json",
         "--checks", "not_a_server_error", "--max-time", str(budget), "--workers", "1",
         "--request-timeout", "120", "--generation-deterministic",
         # adapter deletion would remove the shipped adapters other tests rely on
         "--exclude-method", "DELETE"],
        capture_output=True, text=True, timeout=budget + 600, cwd=tmp_path,
    )  # fmt: skip
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, summary
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
