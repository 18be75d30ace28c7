"""The locustfile's loopback guard (pure logic, no server).

Importing locust monkey-patches the whole process with gevent, so the locustfile is only ever
imported in a subprocess, never in the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = [
    "http://127.0.0.1:3000",
    "http://localhost:3000",
    "http://LOCALHOST:3000/",
    "http://[::1]:3000",
    "https://127.0.0.1",
]
REFUSED = [
    None,
    "",
    "http://example.com",
    "http://10.0.0.1:3000",
    "http://0.0.0.0:3000",
    "http://localhost.example.com:3000",
    "http://127.0.0.1@example.com:3000",
    "http://127.0.0.1:notaport",
    "ftp://127.0.0.1",
    "127.0.0.1:3000",
]


def test_is_loopback_url() -> None:
    code = (
        "import json, sys, locustfile; "
        "print(json.dumps([locustfile.is_loopback_url(h) for h in json.loads(sys.argv[1])]))"
    )
    hosts = ALLOWED + REFUSED
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(hosts)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    verdicts = dict(zip(map(str, hosts), json.loads(out.splitlines()[-1]), strict=True))
    assert verdicts == {str(h): h in ALLOWED for h in hosts}


def test_locust_refuses_a_remote_host_before_any_request() -> None:
    locust = Path(sys.executable).with_name("locust")
    proc = subprocess.run(
        [str(locust), "-f", "locustfile.py", "--headless", "-u", "1", "-t", "5s",
         "-H", "http://example.com"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to run against 'http://example.com'" in proc.stderr
    assert "Ramping to" not in proc.stderr
