"""The servers compared by the benchmark, each started the way its users start it.

Every server runs in its own session on a free loopback port; stopping it ends its whole process
tree (vLLM's engine processes live in their own process groups), so runs never overlap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 600


async def sse_lines(response: httpx.Response):
    """An SSE body's lines, split on newlines only: httpx's ``aiter_lines`` also splits on
    U+2028, U+0085 and the like, which JSON leaves unescaped inside generated text."""
    pending = ""
    async for text in response.aiter_text():
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.rstrip("\r")
    if pending:
        yield pending


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server command, its readiness URL path, and the processes it started."""

    name: str
    argv: list[str]
    ready_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    known: dict[int, psutil.Process] = field(default_factory=dict)
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start and wait for the ready route; ``ready_s`` is the wall time to ready."""
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        while time.monotonic() - started < START_TIMEOUT_S:
            self._remember()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    self.ready_s = time.monotonic() - started
                    self._remember()
                    return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def _remember(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.known.setdefault(proc.pid, proc)

    def stop(self) -> None:
        """SIGTERM the server, wait for every process it started, kill any straggler."""
        if self.proc is None:
            return
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=90)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self._alive():
            time.sleep(0.5)
        for proc in self._alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def _alive(self) -> list[psutil.Process]:
        alive = []
        for proc in self.known.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def measure_on_loraswap(
    name: str, measure: Any, args: Any, env: dict[str, str] | None = None, key: str | None = None
) -> None:
    """Start loraswap (default settings plus ``env``) in a fresh state directory, run
    ``measure(url, args)`` (a coroutine), and write its figures with the CPU kind and the engine
    choices to benchmarks/results/<name>-<time>.json."""
    import asyncio
    import datetime as dt
    import json
    import tempfile

    from loraswap.machine import read_cpu

    work = Path(tempfile.mkdtemp(prefix=f"loraswap-{name}-"))
    server = ServerProcess(
        "loraswap", [str(BIN / "bentoml"), "serve", "service:LoRASwap", "--port", "{port}"],
        "/readyz", work / "serve.log",
        env={"LORASWAP_STATE_DIR": str(work / "state"),
             "LORASWAP_REGISTRY_URI": str(work / "registry.json"), **(env or {})},
    ).start()  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        figures = asyncio.run(measure(server.url, args))
        info = httpx.get(f"{server.url}/info", timeout=30, headers=headers).json()
    finally:
        server.stop()
    started = dt.datetime.now(dt.timezone.utc)
    result = {"started": started.isoformat(timespec="seconds"), "cpu": read_cpu().fingerprint(),
              "engine": info["engine"], "args": vars(args), **figures}  # fmt: skip
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"results: {out}", file=sys.stderr)
