"""Where a decode step's time goes: py-spy on loraswap's EngineCore under a steady load.

    python benchmarks/engine_profile.py [--concurrency 1] [--model a0] [--seconds 20]

Starts loraswap, keeps ``concurrency`` streams busy (``model`` may be an adapter: ``a0``), records
the EngineCore process with py-spy (native frames off, idle off) and writes the self-time share
of the top functions and files to ``benchmarks/results/profile-c<N>-<model>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BIN, ROOT, ServerProcess

RESULTS = ROOT / "benchmarks" / "results"


def keep_busy(url: str, model: str, stop: threading.Event) -> None:
    body = {"model": model, "prompt": "Tell me a long story about the sea.", "max_tokens": 256}
    body["ignore_eos"] = True
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            client.post("/v1/completions", json=body).raise_for_status()


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self time per function and per file from py-spy's collapsed stacks."""
    by_function: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        n = int(count)
        total += n
        by_function[leaf] += n
        path = leaf.rpartition("(")[2].rstrip(")").rsplit(":", 1)[0]
        by_file[path.split("site-packages/")[-1]] += n
    lines = [f"{total} samples", "", "self time by function:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in by_function.most_common(top)]
    lines += ["", "self time by file:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in by_file.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seconds", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraswap-profile-"))
    shutil.copytree(ROOT / "adapters" / "uppercase", work / "adapters" / "a0")
    env = {
        "LORASWAP_ADAPTER_ROOTS": json.dumps([str(work / "adapters")]),
        "LORASWAP_STATE_DIR": str(work / "state"),
        "LORASWAP_REGISTRY_URI": str(work / "state" / "registry.json"),
    }
    argv = [str(BIN / "bentoml"), "serve", "service:LoRASwap", "--port", "{port}"]
    server = ServerProcess("profile", argv, "/readyz", work / "serve.log", env).start()
    stop = threading.Event()
    try:
        workers = [
            threading.Thread(target=keep_busy, args=(server.url, args.model, stop), daemon=True)
            for _ in range(args.concurrency)
        ]
        for worker in workers:
            worker.start()
        core = next(p for p in server.known.values() if "EngineCore" in " ".join(p.cmdline()))
        collapsed = work / "profile.txt"
        subprocess.run(
            [str(BIN / "py-spy"), "record", "--pid", str(core.pid), "--duration",
             str(args.seconds), "--format", "raw", "--output", str(collapsed), "--nonblocking"],
            check=True,
        )  # fmt: skip
        stop.set()
        out = RESULTS / f"profile-c{args.concurrency}-{args.model}.txt"
        out.write_text(summarize(collapsed) + "\n")
        print(out.read_text())
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
