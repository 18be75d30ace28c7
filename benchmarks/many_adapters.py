"""Many adapters behind one endpoint: one hot adapter against Zipf traffic over N adapters.

    python benchmarks/many_adapters.py [--adapters 100,1000] [--alphas 0.8,1.2]
        [--systems loraswap,vllm] [--streams 16] [--requests 160] [--tokens 32]

For each N: writes N valid PEFT adapters for the base model (ranks 8 and 16, target modules
q/v or q/k/v/o, seeded), starts each system alone with the same engine settings (loraswap's
defaults; plain vLLM from the same ``engine_cli_args``, runtime LoRA updating on), registers
all N at run time (timed), then drives streamed chat requests (``--tokens`` each, EOS ignored,
``--streams`` in flight): all to one adapter, then drawn Zipf(alpha) over the N. Records
throughput, TTFT p50/p99, errors, adapter loads and evictions (loraswap's metrics), peak RSS of
the server's processes, and the size of ``/metrics`` and ``/v1/models``. Requests are greedy;
afterwards ``--isolation-sample`` of the Zipf requests run again one at a time, and their
answers must equal what they got in mixed batches. Writes
benchmarks/results/many-<time>.json with the CPU kind. `make bench-many` runs the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from servers import BIN, ROOT, ServerProcess, sse_lines

sys.path.insert(0, str(ROOT))
from loraswap.config import Settings
from loraswap.engine import engine_cli_args, resolved
from loraswap.machine import read_cpu
from tests.adapter_factory import write_adapter

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(8, ("q_proj", "v_proj")), (16, ("q_proj", "v_proj")),
          (8, ("q_proj", "k_proj", "v_proj", "o_proj"))]  # fmt: skip


def make_adapters(root: Path, count: int) -> list[str]:
    import bentoml

    from loraswap.adapters.validation import BaseModelShapes

    shapes = BaseModelShapes.from_checkpoint(Path(bentoml.models.get(model_tag()).path))
    names = []
    for i in range(count):
        name = f"gen-{i:04d}"
        if not (root / name / "adapter_config.json").exists():
            rank, modules = SHAPES[i % len(SHAPES)]
            write_adapter(root / name, shapes, rank=rank, modules=modules, seed=i, scale=0.02)
        names.append(name)
    return names


def model_tag() -> str:
    return f"{Settings().base_model}:latest"


def zipf_draw(count: int, alpha: float, draws: int, seed: int = 0) -> list[int]:
    weights = [1 / (k + 1) ** alpha for k in range(count)]
    return random.Random(seed).choices(range(count), weights=weights, k=draws)


class PeakRss:
    """Samples the summed RSS of a server's processes every 0.5 s."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak, self._stop = server, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in list(self.server.known.values()):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def __enter__(self) -> PeakRss:
        self.server._remember()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def chat_body(i: int, model: str, tokens: int, stream: bool = True) -> dict:
    """Greedy, so that a request's answer can be compared with the same request alone."""
    body = {"model": model, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me about {i}."}]}  # fmt: skip
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def drive(
    url: str, models: list[str], streams: int, tokens: int, texts: dict | None = None
) -> dict:
    """Streamed chat requests for ``models`` (one each), ``streams`` at a time; each answer's
    text goes into ``texts`` by request index."""
    queue = list(enumerate(models))
    ttfts, produced, errors = [], 0, 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal produced, errors
        while queue:
            i, model = queue.pop(0)
            body = chat_body(i, model, tokens)
            started = time.monotonic()
            first = None
            parts: list[str] = []
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        errors += 1
                        await resp.aread()
                        continue
                    async for line in sse_lines(resp):
                        if not line.startswith("data:") or line.endswith("[DONE]"):
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("choices"):
                            first = first if first is not None else time.monotonic() - started
                            parts.append(chunk["choices"][0]["delta"].get("content") or "")
                        if chunk.get("usage"):
                            produced += chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                errors += 1
                continue
            ttfts.append(first if first is not None else time.monotonic() - started)
            if texts is not None:
                texts[i] = "".join(parts)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(streams)))
    seconds = time.monotonic() - started
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None
    return {"requests": len(models), "errors": errors, "tokens": produced,
            "seconds": round(seconds, 2), "tok_per_s": round(produced / seconds, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p99_s": round(p99, 3) if p99 is not None else None,
            "distinct_models": len(set(models))}  # fmt: skip


async def isolation_check(url: str, draw: list[str], texts: dict, tokens: int, sample: int) -> dict:
    """Requests of the Zipf run again, one at a time: their answers must equal the ones they
    got in mixed batches (greedy, the server's dtype)."""
    picked = random.Random(1).sample(sorted(texts), min(sample, len(texts)))
    differing = []
    async with httpx.AsyncClient(timeout=600) as http:
        for i in picked:
            resp = await http.post(
                f"{url}/v1/chat/completions", json=chat_body(i, draw[i], tokens, stream=False)
            )
            alone = resp.json()["choices"][0]["message"]["content"] if resp.is_success else None
            if alone != texts[i]:
                differing.append(draw[i])
    return {"checked": len(picked), "identical": len(picked) - len(differing),
            "differing": differing}  # fmt: skip


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def register(system: str, url: str, root: Path, names: list[str]) -> dict:
    started = time.monotonic()
    failed = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        for name in names:
            if system == "loraswap":
                resp = http.post("/admin/adapters", json={"name": name, "source": str(root / name)})
            else:
                body = {"lora_name": name, "lora_path": str(root / name)}
                resp = http.post("/v1/load_lora_adapter", json=body)
            failed += resp.status_code >= 400
    return {"seconds": round(time.monotonic() - started, 2), "failed": failed}


def server_for(system: str, work: Path, root: Path) -> ServerProcess:
    log = work / f"{system}.log"
    if system == "loraswap":
        env = {"LORASWAP_ADAPTER_ROOTS": json.dumps([str(root)]),
               "LORASWAP_PRELOAD_ADAPTERS": "false",
               "LORASWAP_STATE_DIR": str(work / "state"),
               "LORASWAP_REGISTRY_URI": str(work / "state" / "registry.json")}  # fmt: skip
        argv = [str(BIN / "bentoml"), "serve", "service:LoRASwap", "--port", "{port}"]
        return ServerProcess(system, argv, "/readyz", log, env)
    import bentoml

    settings = Settings()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", "{port}"]
    argv += engine_cli_args(settings, bentoml.models.get(model_tag()).path)
    env = {**settings.cpu_engine_env(), "LORASWAP_PATCH_LORA_OPS": "0",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}  # fmt: skip
    return ServerProcess(system, argv, "/health", log, env)


async def run_system(system: str, work: Path, root: Path, names: list[str], args) -> dict:
    server = server_for(system, work, root).start()
    try:
        with PeakRss(server) as rss:
            registered = await asyncio.to_thread(register, system, server.url, root, names)
            await drive(server.url, [names[0]] * 8, 4, 8)  # warm-up
            one = await drive(server.url, [names[0]] * args.requests, args.streams, args.tokens)
            zipf, answered = {}, {}
            for alpha in args.alphas:
                draw = [names[k] for k in zipf_draw(len(names), alpha, args.requests)]
                texts: dict[int, str] = {}
                zipf[str(alpha)] = await drive(server.url, draw, args.streams, args.tokens, texts)
                answered[str(alpha)] = (draw, texts)
            # the one-adapter run again after the draws: the same server drifts between runs
            # (one adapter 298-337 tok/s on one server), so each ratio is also given against the
            # mean of the runs before and after (an A-B-A design), besides the first alone
            after = await drive(server.url, [names[0]] * args.requests, args.streams, args.tokens)
            mean_one = (one["tok_per_s"] + after["tok_per_s"]) / 2
            for figures in zipf.values():
                figures["vs_one_adapter"] = round(figures["tok_per_s"] / one["tok_per_s"], 2)
                figures["vs_one_adapter_mean"] = round(figures["tok_per_s"] / mean_one, 2)
        metrics = httpx.get(f"{server.url}/metrics", timeout=60).text
        models = httpx.get(f"{server.url}/v1/models", timeout=60).content
        for alpha, (draw, texts) in answered.items():  # after the counters were read
            zipf[alpha]["isolation"] = await isolation_check(
                server.url, draw, texts, args.tokens, args.isolation_sample
            )
        return {
            "register": registered, "one_adapter": one, "one_adapter_after": after, "zipf": zipf,
            "peak_rss_gib": round(rss.peak / 2**30, 2), "ready_s": round(server.ready_s or 0, 1),
            "metrics_kib": round(len(metrics) / 1024, 1),
            "models_kib": round(len(models) / 1024, 1),
            "adapter_loads": metric_sum(metrics, "loraswap_adapter_load_seconds_count"),
            "adapter_load_seconds": round(
                metric_sum(metrics, "loraswap_adapter_load_seconds_sum"), 2
            ),
            "adapter_evictions": metric_sum(metrics, "loraswap_adapter_evictions_total"),
        }  # fmt: skip
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", default="100,1000")
    parser.add_argument("--alphas", default="0.8,1.0,1.2")
    parser.add_argument("--systems", default="loraswap,vllm")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--isolation-sample", type=int, default=16)
    parser.add_argument(
        "--adapter-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraswap-many"
    )
    args = parser.parse_args()
    args.alphas = [float(a) for a in args.alphas.split(",")]
    started = dt.datetime.now(dt.timezone.utc)
    runs = {}
    for count in (int(n) for n in args.adapters.split(",")):
        names = make_adapters(args.adapter_dir, count)
        for system in args.systems.split(","):
            work = Path(tempfile.mkdtemp(prefix=f"loraswap-many-{system}-"))
            print(f"{system}: {count} adapters", file=sys.stderr)
            runs[f"{system}/{count}"] = asyncio.run(
                run_system(system, work, args.adapter_dir, names, args)
            )
            print(json.dumps(runs[f"{system}/{count}"], indent=2), file=sys.stderr)
    import bentoml

    sized = resolved(Settings(), bentoml.models.get(model_tag()).path)
    result = {"started": started.isoformat(timespec="seconds"), "cpu": read_cpu().fingerprint(),
              "slots": {"max_loras": sized.max_loras, "max_cpu_loras": sized.max_cpu_loras,
                        "adapter_memory_gib": sized.adapter_memory_gib, "dtype": sized.dtype},
              "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"many-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
