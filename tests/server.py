"""Start and stop a real ``bentoml serve`` of loraswap for tests, and prove nothing is left."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).with_name("bentoml")
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One ``bentoml serve service:LoRASwap`` in its own session, logging to a file."""

    def __init__(
        self,
        log_path: Path,
        env: dict[str, str] | None = None,
        target: str = "service:LoRASwap",
        cwd: Path = ROOT,
    ) -> None:
        self.target, self.cwd = target, cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: dict[int, psutil.Process] = {}
        self.start_timeout_s = START_TIMEOUT_S

    def start(self) -> Server:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BENTOML), "serve", self.target, "--port", str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self.remember_processes()
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    self.remember_processes()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"server not ready after {self.start_timeout_s}s:\n{self.log_tail()}")

    def remember_processes(self) -> None:
        """Track every descendant: engine processes live in their own process groups."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.known.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def engine_core(self) -> psutil.Process:
        self.remember_processes()
        for proc in self.known.values():
            try:
                if "EngineCore" in " ".join(proc.cmdline()) or "EngineCore" in proc.name():
                    return proc
            except psutil.NoSuchProcess:
                continue
        raise LookupError("no EngineCore process found")

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.known.values() if p.is_running() and p.status() != "zombie"]

    def signal(self, sig: int, group: bool = False) -> None:
        assert self.proc is not None
        if group:
            os.killpg(os.getpgid(self.proc.pid), sig)
        else:
            self.proc.send_signal(sig)

    def wait_gone(self, timeout: float = 90) -> list[psutil.Process]:
        """Wait for the server and every process it started; return the ones still alive."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(1)
        return left

    def stop(self) -> list[psutil.Process]:
        """SIGTERM, then kill whatever is left so a failed test never leaks memory."""
        if self.proc is None:
            return []
        self.remember_processes()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        left = self.wait_gone()
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self._log.close()
        return left

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
