"""Every README code block and every file in examples/ runs as written against the real server.

A README block that cannot run here (it starts servers, needs a GPU, builds images) says so with
``<!-- example: not run (why) -->`` on the line before it (or ``run by <test file>`` when a test
with the server it needs runs it); every other bash, python and js block runs, with
``localhost:3000`` pointed at the test server and curl failing on HTTP errors.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.server import ROOT

BLOCK = re.compile(
    r"(?:<!-- example: (?:not run \((?P<why>[^)]+)\)|run by (?P<by>\S+)[^>]*) -->\n[ \t]*)?"
    r"```(?P<lang>bash|python|js)\n(?P<code>.*?)```",
    re.S,
)
README = (ROOT / "README.md").read_text()
README_BLOCKS = [
    pytest.param(
        m["lang"],
        m["code"],
        m["why"] or (m["by"] and f"{m['by']} runs it"),
        id=f"line-{README[: m.start()].count(chr(10)) + 2}",
    )
    for m in BLOCK.finditer(README)
]
EXAMPLES = ROOT / "examples"
# What each example must print (beyond exiting 0): proof it did its job, not just ran.
EXPECTED = {
    "chat.py": ["smollm2-135m-instruct:", "uppercase@v1:", "tokens)"],
    "tools.py": ["call: get_weather(", "streamed call arguments: {'city'"],
    "json_output.py": ["json_schema: {'name'", "parse: name="],
    "adapters.py": ["registered: ['v1', 'v2']", "example-persona@v1", "deleted example-persona"],
    "batch_job.py": ["completed, 6/6 done", "[uppercase@v1]"],
}
LEFT_BEHIND = ("shouty", "persona", "example-persona")  # adapters the blocks register


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not installed")
    return path


def run(command: list[str], server, cwd=ROOT, timeout: float = 300) -> str:
    env = {**os.environ, "LORASWAP_URL": server.url, "BENTOML_PORT": str(server.port)}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def examples_server(server):
    yield server
    for name in LEFT_BEHIND:  # leave the shared server as the other tests expect it
        httpx.delete(f"{server.url}/admin/adapters/{name}", timeout=60)


@pytest.mark.parametrize(("lang", "code", "why"), README_BLOCKS)
def test_readme_block_runs(examples_server, lang: str, code: str, why: str | None, tmp_path):
    if why:
        pytest.skip(f"README marks it not run: {why}")
    server = examples_server
    code = code.replace("localhost:3000", f"127.0.0.1:{server.port}")
    code = code.replace("127.0.0.1:3000", f"127.0.0.1:{server.port}")
    if lang == "bash":
        prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'
        run(["bash", "-c", prelude + code], server)
    elif lang == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        run([sys.executable, str(script)], server, cwd=tmp_path)
    else:
        script = tmp_path / "block.js"
        script.write_text(code)
        run([node(), "--experimental-websocket", str(script)], server, timeout=120)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(examples_server, name: str):
    out = run([sys.executable, str(EXAMPLES / name)], examples_server)
    for expected in EXPECTED[name]:
        assert expected in out, f"{name} printed:\n{out}"


def test_websocket_page_client_runs(examples_server):
    """websocket.html's client code (ws_client.js), run under Node's WebSocket."""
    page = (EXAMPLES / "websocket.html").read_text()
    assert '<script src="ws_client.js"></script>' in page and "generateMany(" in page
    out = run([node(), "--experimental-websocket", str(EXAMPLES / "ws_client.js")], examples_server)
    base, _, adapter = out.partition("\nuppercase@v1: ")
    assert base.startswith("smollm2-135m-instruct: ") and base.rstrip().endswith("tokens)"), out
    assert adapter.rstrip().endswith("tokens)"), out


def test_every_example_is_tested():
    shipped = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".js", ".html")}
    assert shipped == set(EXPECTED) | {"ws_client.js", "websocket.html"}
