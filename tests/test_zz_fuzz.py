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
import xml.etree.ElementTree as ET

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
        bounds = ["--max-examples", os.environ.get("FUZZ_EXAMPLES", "25"),
                  "--phases", "examples,coverage,fuzzing"]  # fmt: skip
    report = tmp_path / "junit.xml"
    config = tmp_path / "schemathesis.toml"
    # The coverage phase makes every case the schema defines, bounded by nothing: for vLLM's
    # Responses request that is ~4,700 requests (12 min on 2 cores). Its examples and bounded
    # fuzzing still run; every other operation gets all three phases.
    config.write_text(
        '[[operations]]\ninclude-path = "/v1/responses"\nphases.coverage.enabled = false\n'
    )
    run = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{fuzzed.url}/docs.json",
         *bounds,
         "--checks", "not_a_server_error", "--workers", "1",
         "--request-timeout", "120", "--generation-deterministic",
         "--report", "junit", "--report-junit-path", str(report),
         # adapter deletion would remove the shipped adapters the run's other cases use
         "--exclude-method", "DELETE"],
        capture_output=True, text=True, timeout=int(budget or 1800) + 600, cwd=tmp_path,
    )  # fmt: skip
    summary = run.stdout[-4000:]
    print(summary)
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    errors = {
        c.get("name"): c.find("error").text or "" for c in cases if c.find("error") is not None
    }
    # "Schema Error": schemathesis cannot generate positive cases for some rich schemas (vLLM's
    # chat and Responses requests, ours with all-optional fields); not a server fault, and
    # their negative cases still run. Any other error, and any 5xx, fails.
    unexpected = {name: text for name, text in errors.items() if "Schema Error" not in text}
    print("operations schemathesis could not generate positive cases for:", sorted(errors))
    assert not failed and not unexpected, summary
    assert len(cases) >= 40, f"only {len(cases)} operations were fuzzed"
    assert httpx.get(f"{fuzzed.url}/readyz", timeout=30).status_code == 200
