"""Every vLLM-internal name loraswap uses, in one table, with the vLLM versions it was written for.

vLLM moves its internals between releases: when an upgrade breaks an import, this is the one
file to change. Names resolve lazily (``vllm_compat.LoRARequest``), so importing loraswap does not
import vLLM.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

# vLLM releases these paths were checked against (major.minor).
TESTED_VLLM = ("0.32",)

NAMES: dict[str, str] = {
    # engine lifecycle
    "AsyncEngineArgs": "vllm.engine.arg_utils",
    "AsyncLLM": "vllm.v1.engine.async_llm",
    "UsageContext": "vllm.usage.usage_lib",
    "make_arg_parser": "vllm.entrypoints.launchers.cli_args",
    "validate_parsed_serve_args": "vllm.entrypoints.launchers.cli_args",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils",
    "current_platform": "vllm.platforms",
    "EngineClient": "vllm.engine.protocol",
    # OpenAI serving layer
    "init_app_state": "vllm.entrypoints.launchers.api_server.app_state",
    "register_api_routers": "vllm.entrypoints.launchers.api_server.routers",
    "init_exception_handler": "vllm.entrypoints.serve.exception_handling.register",
    "create_error_response": "vllm.entrypoints.serve.exception_handling.error_response",
    "ErrorResponse": "vllm.entrypoints.serve.engine.protocol",
    "ModelCard": "vllm.entrypoints.serve.engine.protocol",
    "ModelList": "vllm.entrypoints.serve.engine.protocol",
    "ModelPermission": "vllm.entrypoints.serve.engine.protocol",
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol",
    "OpenAIServingModels": "vllm.entrypoints.openai.models.serving",
    "BatchRequestInput": "vllm.entrypoints.launchers.run_batch",
    "BatchRequestOutput": "vllm.entrypoints.launchers.run_batch",
    "BatchResponseData": "vllm.entrypoints.launchers.run_batch",
    # errors, sampling, LoRA
    "VLLMError": "vllm.exceptions",
    "EngineDeadError": "vllm.v1.engine.exceptions",
    "VLLMValidationError": "vllm.exceptions",
    "RequestOutputKind": "vllm.sampling_params",
    "LoRARequest": "vllm.lora.request",
}


# What vLLM's route registration and serving state import when they first run (inside the
# functions): imported ahead (:func:`import_serving_layer`) while the engine process starts.
SERVING_MODULES = (
    *sorted({module for module in NAMES.values() if module.startswith("vllm.entrypoints")}),
    "vllm.entrypoints.serve.instrumentator",
    "vllm.entrypoints.serve.lora.api_router",
    "vllm.entrypoints.serve.profile.api_router",
    "vllm.entrypoints.serve.tokenize.api_router",
    "vllm.entrypoints.serve.sagemaker.api_router",
    "vllm.entrypoints.serve.elastic_ep.api_router",
    "vllm.entrypoints.openai.models.api_router",
    "vllm.entrypoints.generate.api_router",
    "vllm.entrypoints.generate.structured_decisions.api_router",
    "vllm.entrypoints.scale_out.factories",
    "vllm.parser.metrics",
)


def import_serving_layer() -> None:
    """Import :data:`SERVING_MODULES` (0.6 s on 2 cores), each once; one that fails here is
    left to fail where vLLM imports it, with vLLM's own error."""
    for module in SERVING_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def __getattr__(name: str) -> Any:
    module = NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def is_tested_version(version: str | None = None) -> bool:
    version = version or vllm_version()
    return any(version == v or version.startswith(v + ".") for v in TESTED_VLLM)


def check_version() -> None:
    """Log once at start when vLLM is a release these paths were not checked against."""
    version = vllm_version()
    if not is_tested_version(version):
        logger.warning(
            "vLLM %s is untested with this loraswap (tested: %s); internal imports may fail",
            version,
            ", ".join(TESTED_VLLM),
        )
