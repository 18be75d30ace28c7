"""Imported only by the engine's fork server (:mod:`loraswap.engine_fork`): the modules vLLM's
EngineCore process imports on a CPU start, so a forked engine process has them loaded. A module
that fails to import here is imported again, and fails properly, in the engine process.

The fork server ignores SIGTERM: BentoML's process manager sends its stop signal to the
worker's children, and vLLM takes the engine for dead as soon as the server that forked it
exits. The server still exits with the worker (it watches its pipe to it)."""

import contextlib
import importlib
import signal

MODULES = (
    "torch",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.model_executor.models.llama",
    "vllm.lora.model_manager",
    "vllm.lora.punica_wrapper.punica_cpu",
    "loraswap.vllm_plugin",
)

signal.signal(signal.SIGTERM, signal.SIG_IGN)
for name in MODULES:
    with contextlib.suppress(Exception):
        importlib.import_module(name)
with contextlib.suppress(Exception):  # built here, not in each engine start (~0.3 s)
    importlib.import_module("loraswap.vllm_plugin.row_kernel").kernel()
with contextlib.suppress(Exception):  # part of the compiled model's cache key (~0.3 s: it
    # hashes the installed Triton's files); cached per process, so forked engines inherit it
    importlib.import_module("torch._inductor.codecache").CacheBase.get_system()
