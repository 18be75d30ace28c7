"""A short compile warm-up for vLLM's CPU engine (``LORASWAP_SHORT_WARMUP``).

vLLM's CPU worker warms the compiled model up with a profiling run of ``max_num_batched_tokens``
dummy tokens (2,048 by default): on CPU that run only serves to compile (or load) the model's
graph, since the KV cache size is given (``VLLM_CPU_KVCACHE_SPACE``) and nothing is measured.
The graph is compiled for any number of tokens, so a few tokens do the same work: the run took
3.2 s of a 24 s start on a 2-core AVX2 machine, and 0.2 s with 32 tokens. When vLLM sizes the
KV cache from memory use instead (no explicit size), the full run is kept.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
from collections.abc import Callable
from typing import Any

from .guard import enabled, logger, supported, vllm_version

ENV_VAR = "LORASWAP_SHORT_WARMUP"
WRITTEN_FOR = ("0.32.0",)
# More than one token (a graph traced at one token may specialise on it), fewer than a step.
WARMUP_TOKENS = 32

_original: list[Callable[..., Any]] = []


def _short(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def warming_up_model(self: Any) -> None:
        if self.cache_config.kv_cache_memory_bytes is None:
            return original(self)  # vLLM sizes the KV cache from this run's memory use
        full = self.max_num_tokens
        self.max_num_tokens = min(full, WARMUP_TOKENS)
        try:
            return original(self)
        finally:
            self.max_num_tokens = full

    return warming_up_model


def install() -> None:
    """Wrap the CPU model runner's warm-up, in a CPU build's engine process only (the API
    process never imports the model runner: importing it there would cost 0.6 s)."""
    if _original or not enabled(ENV_VAR) or not _engine_process():
        return
    if not supported(sys.modules[__name__], vllm_version()):
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    _original.append(CPUModelRunner.warming_up_model)
    CPUModelRunner.warming_up_model = _short(_original[0])
    logger.info("loraswap: the compile warm-up runs %d tokens (%s)", WARMUP_TOKENS, ENV_VAR)


def uninstall() -> None:
    if _original:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        CPUModelRunner.warming_up_model = _original.pop()


def _engine_process() -> bool:
    """vLLM names its engine processes ``EngineCore`` (``EngineCore_DP0``...)."""
    return multiprocessing.current_process().name.startswith("EngineCore")
