"""Replicas of loraswap on one machine sharing PostgreSQL, Redis and S3 (moto), behind haproxy
(round robin, health-checked on ``/readyz``), as a Kubernetes Service would put them. Used by
the fleet test and ``make fleet``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.server import ROOT, Server, free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CONFIG = """\
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    retries 3
    option redispatch
frontend loraswap
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}
"""


class Balancer:
    """haproxy in front of the replicas' ports."""

    def __init__(self, workdir: Path, ports: list[int], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "haproxy.cfg"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(ports))
        self.config.write_text(HAPROXY_CONFIG.format(port=self.port, servers=servers))
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Balancer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/livez", timeout=2)
                return self
            time.sleep(0.1)
        raise RuntimeError(f"haproxy did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def replica_home(workdir: Path) -> Path:
    """A BentoML home of its own: each ``bentoml serve`` empties its Prometheus directory at
    start, which would take another replica's series away."""
    home = workdir / "bentoml"
    home.mkdir(parents=True, exist_ok=True)
    return home


def base_model_dir() -> str:
    """The imported base model's directory: every replica loads the same path, so they share
    vLLM's compile cache (its key includes the path)."""
    import bentoml

    return bentoml.models.get("smollm2-135m-instruct:latest").path


class Replica(Server):
    """One replica: its own port, state directory and BentoML home, the fleet's shared state."""

    def __init__(self, workdir: Path, env: dict[str, str], port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        env = {"LORASWAP_BASE_MODEL": base_model_dir(), **env,
               "BENTOML_HOME": str(replica_home(workdir)),
               "LORASWAP_STATE_DIR": str(workdir / "state"),
               # where 0.1.0 kept a registry document to import: none here (not the project's)
               "LORASWAP_REGISTRY_URI": str(workdir / "state" / "registry.json"),
               "LORASWAP_ADAPTER_CACHE_DIR": str(workdir / "cache")}  # fmt: skip
        super().__init__(workdir / "serve.log", env=env, cwd=ROOT)
        if port is not None:
            self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.start_timeout_s = 900  # a fresh machine compiles the model at the first start

    def restart_like(self) -> Replica:
        """A new process on the same port and directories (a restarted pod)."""
        return Replica(self.workdir, self.env, self.port)

    def kill(self) -> None:
        """SIGKILL every process of the replica at once, as a node failure would."""
        self.remember_processes()
        for proc in self.known.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)
        self._log.close()

    def pids(self) -> set[int]:
        self.remember_processes()
        return set(self.known)


def shared_env(db_url: str, redis_url: str, s3: dict, prefix: str, **extra: str) -> dict[str, str]:
    """What every replica shares: the database (jobs, files, usage, audit, the adapter
    catalogue, tenants), the limits store and S3 for file bytes."""
    bucket = f"s3://{s3['bucket']}/{prefix}"
    return {
        "LORASWAP_DATABASE_URL": db_url,
        "LORASWAP_LIMITS_URI": redis_url,
        "LORASWAP_FILES_URI": f"{bucket}/files",
        "LORASWAP_FSSPEC_STORAGE_OPTIONS": json.dumps(s3["options"]),
        **extra,
    }


def core_of(index: int) -> dict[str, str]:
    """Each replica's engine on its own core where there are enough: engines sharing cores spin
    their OpenMP threads against each other and slow down many times over."""
    cores = sorted(os.sched_getaffinity(0))
    return {"LORASWAP_CPU_THREADS_BIND": str(cores[index % len(cores)])}


def start_all(replicas: list[Replica]) -> None:
    """Start the first replica alone (on a fresh machine it compiles the model and fills the
    compile cache), then the others side by side."""
    errors: list[BaseException] = []

    def run(replica: Replica) -> None:
        try:
            replica.start()
        except BaseException as exc:
            errors.append(exc)

    try:
        run(replicas[0])
        threads = [threading.Thread(target=run, args=(r,)) for r in replicas[1:]]
        threads = threads if not errors else []
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:  # a test timeout or Ctrl-C while starting: leave nothing running
        for replica in replicas:
            replica.stop()
        raise
    if errors:
        for replica in replicas:
            replica.stop()
        raise errors[0]
