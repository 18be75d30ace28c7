"""torch.compile kept on for LoRA engines on vLLM's CPU platform (``LORASWAP_COMPILE_LORA``).

Safe only because every LoRA layer of :mod:`.lora_kernels` runs as one opaque custom op (see
:func:`compile_with_lora`); a warm start also loads the compiled model back from vLLM's cache.
Imports neither torch nor vLLM until called.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# Set by the engine (``LORASWAP_COMPILE_LORA``): keep torch.compile on for LoRA engines.
COMPILE_ENV = "LORASWAP_COMPILE_LORA"
ORIGINAL_CHECK: list[Any] = []


def compile_asked() -> bool:
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def compile_with_lora() -> None:
    """vLLM's CPU platform turns compilation off whenever LoRA is on, because its LoRA ops
    decide in Python from the batch (which a traced graph would fix). Here every LoRA layer is
    one opaque custom op fed the per-token index buffer, so the compiled graph stays right:
    keep the mode the platform picked before it turned compilation off."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    if ORIGINAL_CHECK:
        return
    from loraswap.machine import cxx_compiler

    if cxx_compiler() is None:
        logger.warning(
            "loraswap: no C++ compiler (g++) for torch.compile: the LoRA engine runs eager"
        )
        return
    original = CpuPlatform.check_and_update_config.__func__
    ORIGINAL_CHECK.append(original)

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        wanted = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        if vllm_config.lora_config is not None and wanted == CompilationMode.VLLM_COMPILE:
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
            logger.info("loraswap: LoRA engine compiled (LORASWAP_COMPILE_LORA)")

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    _reload_compiled_models()


def _reload_compiled_models() -> None:
    """vLLM 0.32 saves the compiled model to its cache but cannot load it back on CPU: the
    loaded callable lacks ``finalize_loading`` (which only its GPU backend's callables have), so
    every start compiled again (+40 s). Give it a no-op one: a warm start then loads the
    compiled model from the cache (measured: 70-79 s → 27 s to an engine, the same outputs)."""
    import torch

    if getattr(torch.compiler.load_compiled_function, "_loraswap", False):
        return
    load = torch.compiler.load_compiled_function

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        inner = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if inner is not None and not hasattr(inner, "finalize_loading"):
            inner.finalize_loading = lambda vllm_config: None
        return loaded

    load_compiled_function._loraswap = True  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function
