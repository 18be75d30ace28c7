"""The warm engine start: vLLM's EngineCore forked from a fork server that imported the engine's
modules early, with the environment a spawned process would have, or spawned when that cannot
be promised."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from loraswap import engine_fork

# Runs in its own interpreter: starting the fork server sets this process's environment.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from loraswap import engine_fork

    def report(path):
        handler = signal.getsignal(signal.SIGTERM)
        with open(path, "w") as out:
            json.dump({"ppid": os.getppid(), "later": os.environ.get("LORASWAP_TEST_LATER"),
                       "sigterm_default": handler == signal.SIG_DFL,
                       "json_loaded": "json.decoder" in sys.modules}, out)

    if __name__ == "__main__":
        engine_fork.PRELOAD = "json"  # the real preload imports vLLM: slow for a unit test
        assert engine_fork.start_server({"VLLM_CPU_KVCACHE_SPACE": "1"})
        os.environ["LORASWAP_TEST_LATER"] = "set after the server started"
        results = []
        for i, change in enumerate((None, "OMP_NUM_THREADS")):
            if change:
                os.environ[change] = "1"
            process = engine_fork.EngineProcess(target=report, args=(f"{sys.argv[1]}/{i}.json",))
            process.start()
            process.join(60)
            results.append({"exitcode": process.exitcode, "reason": engine_fork.forkable()})
        print(json.dumps({"pid": os.getpid(), "runs": results}))
    """
)


@pytest.mark.skipif(not engine_fork.cpu_build(), reason="the warm start is for the CPU build")
def test_engine_process_forked_with_the_parents_environment_or_spawned(tmp_path: Path) -> None:
    script = tmp_path / "start.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )  # fmt: skip
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    forked, spawned = (json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1))
    assert [r["exitcode"] for r in summary["runs"]] == [0, 0], done.stderr
    # the first came from the fork server (its parent), with the modules it preloaded
    assert forked["ppid"] != summary["pid"] and forked["json_loaded"]
    # ... and the environment of the moment it was started, SIGTERM back to its default
    assert forked["later"] == "set after the server started" and forked["sigterm_default"]
    # a variable read at start-up changed after the server started: spawned by this process
    assert summary["runs"][1]["reason"].startswith("environment changed")
    assert "OMP_NUM_THREADS" in summary["runs"][1]["reason"]
    assert spawned["ppid"] == summary["pid"] and spawned["later"] == forked["later"]


def test_forkable_compares_only_what_a_start_reads(monkeypatch, tmp_path: Path) -> None:
    base = {"PATH": "/bin", "LD_PRELOAD": "/lib/libgomp.so", "OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(engine_fork, "_server_env", dict(base))
    monkeypatch.setattr(os, "environ", dict(base))
    assert engine_fork.forkable() is None
    # read when used: free to change
    os.environ.update(PATH="/usr/bin", TORCHINDUCTOR_CACHE_DIR="/tmp/x", VLLM_LOGGING_LEVEL="INFO")
    assert engine_fork.forkable() is None
    # a search path gaining a directory that does not exist finds nothing new
    os.environ["LD_LIBRARY_PATH"] = f"{tmp_path}/missing:"
    assert engine_fork.forkable() is None
    os.environ["LD_LIBRARY_PATH"] = str(tmp_path)
    assert "LD_LIBRARY_PATH" in (engine_fork.forkable() or "")
    del os.environ["LD_LIBRARY_PATH"]
    os.environ["LD_PRELOAD"] = "/lib/libgomp.so:/lib/libtcmalloc.so"
    assert "LD_PRELOAD" in (engine_fork.forkable() or "")


def test_no_fork_server_means_spawn(monkeypatch) -> None:
    monkeypatch.setattr(engine_fork, "_server_env", None)
    assert engine_fork.forkable() == "no fork server"


def test_preload_libraries_as_vllm_sets_them() -> None:
    """torch's own libgomp joins LD_PRELOAD (vLLM's CPU thread binding needs it) unless an
    OpenMP runtime is there already; applying it twice changes nothing."""
    once = engine_fork.preload_libraries("")
    torch_dir = Path(__import__("torch").__file__).parent
    gomp = list((torch_dir.parent / "torch.libs").glob("libgomp*.so*")) + list(
        (torch_dir / "lib").glob("libgomp*.so*")
    )
    if gomp:
        assert str(gomp[0]) in once.split(":")
    assert engine_fork.preload_libraries(once) == once
    assert "libgomp" not in engine_fork.preload_libraries("/opt/libiomp5.so")


def test_the_real_servers_engine_was_forked_from_the_warm_server(server) -> None:
    """On the real server the environment vLLM's CPU platform set (LD_PRELOAD with torch's
    libgomp, the inductor switches) matched the fork server's, so the engine was forked; it
    carries vLLM's process name and its parent is the fork server, not the BentoML worker."""
    if not engine_fork.cpu_build():
        pytest.skip("the warm start is for the CPU build")
    log = server.log_path.read_text(errors="replace")
    assert "engine process forked from the warm fork server" in log, server.log_tail()
    engine = httpx.get(f"{server.url}/info", timeout=30).json()["engine"]
    assert engine["engine_process"]["value"] == "forked", engine["engine_process"]
    core = server.engine_core()
    fork_server = core.parent()
    assert "forkserver" in " ".join(fork_server.cmdline())
    # BentoML's process manager sends its stop signal to the worker's children: the fork server
    # outlives it (vLLM takes the engine for dead once the process that forked it exits)
    fork_server.send_signal(signal.SIGTERM)
    time.sleep(2)
    assert fork_server.is_running() and core.is_running()
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
