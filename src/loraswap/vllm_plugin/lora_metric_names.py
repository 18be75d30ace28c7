"""vLLM's ``vllm:lora_requests_info`` with adapters in the names requests use.

A LoRA-aware router matches a request's ``model`` against this gauge's adapter names, and vLLM
lists adapters as loraswap registers them in the engine (``uppercase@v1``) while requests say
``uppercase``. :func:`install` wraps ``PrometheusStatLogger.record``, which runs in the API
process (AsyncLLM's output handler), where the adapter registry lives: the scheduler stats it
is given are first renamed by the callable it is installed with
(:meth:`loraswap.router_metrics.RouterView.renamed`, passed in: that module imports this one),
and vLLM's own code sets the gauge. Nothing of vLLM's is copied. Installed by
:func:`loraswap.router_metrics.watch`, in the process whose residency it follows, only when
vLLM's stat loggers are loaded there; the switch and the version guard are those of the other
patches (:mod:`loraswap.vllm_plugin.guard`).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from .guard import enabled, supported, vllm_version

# (scheduler_stats, max_lora) -> the stats with the LoRA adapters under request names.
Rename = Callable[[Any, int], Any]

ENV_VAR = "LORASWAP_ROUTER_LORA_NAMES"
# vLLM versions whose PrometheusStatLogger.record / SchedulerStats this was checked against.
WRITTEN_FOR = ("0.32.0",)
# vLLM's own record, while installed.
ORIGINAL: list[Callable[..., Any]] = []

logger = logging.getLogger(f"vllm.{__name__}")


def ensure_installed(rename: Rename) -> bool:
    """Install unless switched off or written for another vLLM; True when in effect."""
    if ORIGINAL:
        return True
    if not enabled(ENV_VAR):
        return False
    if not supported(sys.modules[__name__], vllm_version()):
        return False
    install(rename)
    return True


def wrap(original: Callable[..., Any], rename: Rename) -> Callable[..., Any]:
    """``PrometheusStatLogger.record`` giving ``original`` the stats renamed by ``rename`` (when
    the logger has its LoRA gauge); on a failure, the stats as they are and one warning."""
    failed: list[Exception] = []

    @functools.wraps(original)
    def record(self: Any, scheduler_stats: Any, *args: Any, **kwargs: Any) -> Any:
        if scheduler_stats is not None and getattr(self, "gauge_lora_info", None) is not None:
            try:
                scheduler_stats = rename(scheduler_stats, self.max_lora)
            except Exception as exc:  # vLLM's output handler must never see it
                if not failed:
                    logger.warning("loraswap: LoRA adapter names for routers failed: %r", exc)
                failed.append(exc)
        return original(self, scheduler_stats, *args, **kwargs)

    return record


def install(rename: Rename) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    if ORIGINAL:
        return
    ORIGINAL.append(PrometheusStatLogger.record)
    PrometheusStatLogger.record = wrap(ORIGINAL[0], rename)  # type: ignore[method-assign]
    logger.info("loraswap: vllm:lora_requests_info names adapters as requests do")


def uninstall() -> None:
    if ORIGINAL:
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        PrometheusStatLogger.record = ORIGINAL.pop()  # type: ignore[method-assign]
