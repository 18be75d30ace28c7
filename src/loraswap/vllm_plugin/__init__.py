"""loraswap's vLLM plugin: :func:`apply` is a ``vllm.general_plugins`` entry point.

vLLM runs general plugins in the API process, the EngineCore process and every worker, so the
patches reach the processes that actually run the model (in loraswap's API process, marked by
:func:`.guard.mark_api_process`, only the part for the engine's configuration). Two patches,
each behind a switch (on unless set to 0/false/no/off):

- ``LORASWAP_LORA_INDEX_FIX`` (:mod:`.lora_index_fix`): upstream's torch LoRA ops with index -1
  meaning "no adapter" (vLLM reads it as the last slot). The fix upstream should merge.
- ``LORASWAP_LORA_KERNELS`` (:mod:`.lora_kernels`): faster batched ops that include that fix,
  Both also fix ``_get_lora_device`` for layers whose weight was released (INT8 on CPU).

When both are on the kernels win; ``LORASWAP_PATCH_LORA_OPS=0`` (the older switch) turns both
off. A patch lists the vLLM versions it was written for (``WRITTEN_FOR``) and refuses, with one
warning, to touch any other version: vLLM's ops may have changed under it. Importing this
package imports neither torch nor vLLM; :func:`apply` does.

``LORASWAP_SHORT_WARMUP`` (:mod:`.warmup`) is independent of those: the CPU engine's compile
warm-up runs a few tokens instead of a full step's (a faster start).

A fourth patch, ``LORASWAP_ROUTER_LORA_NAMES`` (:mod:`.lora_metric_names`: adapters in
``vllm:lora_requests_info`` under the names requests use), is not a general plugin's: only the
API process has the adapter registry, so :mod:`loraswap.router_metrics` installs it there, with
the same switch convention and version guard (:mod:`.guard`, which the patches import rather
than this package).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import lora_index_fix, lora_kernels, warmup
from .guard import API_PROCESS, ORIGINALS, enabled, patch_name, supported, vllm_version

# A child of vLLM's "vllm" logger: vLLM gives that one a handler in its EngineCore and worker
# processes, where the root logger usually has none and a plain module logger would be silent.
logger = logging.getLogger(f"vllm.{__name__}")

LEGACY_ENV_VAR = "LORASWAP_PATCH_LORA_OPS"  # =0 turns every patch off (the older switch)
OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
OP_NAMES = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)
# Where each replaceable vLLM function is defined, then the modules that import it by name,
# loaded first so that their copies are rebound too.
HOMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(OP_NAMES, (OPS_MODULE, "vllm.lora.ops.torch_ops")),
    "_get_lora_device": ("vllm.lora.layers.utils", "vllm.lora.layers.base_linear"),
}
# In order of preference: the kernels include the fix, so the fix alone is the fallback.
PATCHES: tuple[ModuleType, ...] = (lora_kernels, lora_index_fix)

# Module names whose namespace apply() rewrote, for logs and tests.
PATCHED_MODULES: list[str] = []
# The patch in effect ("lora_kernels" or "lora_index_fix"), empty when vLLM is unpatched.
APPLIED: list[str] = []


def _rebind(swap: dict[int, Callable[..., Any]]) -> list[str]:
    """Rebind, in every loaded module but this package's, each global whose value's id is a
    key of ``swap`` (ids of live functions only, so an id match is an identity match)."""
    patched: list[str] = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name == __name__ or mod_name.startswith(f"{__name__}."):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        hits = [(attr, swap[id(v)]) for attr, v in list(namespace.items()) if id(v) in swap]
        for attr, new in hits:
            namespace[attr] = new
        if hits:
            patched.append(mod_name)
    return sorted(patched)


def apply() -> None:
    """Install the first switched-on patch written for this vLLM, in every namespace.

    vLLM calls this with no arguments in each process (general plugin). Besides the defining
    module, ``vllm.lora.ops.torch_ops`` re-exports the ops and ``punica_cpu`` imports them by
    name, so rebinding the module attribute alone is not enough: every loaded module whose
    global is one of the original functions is rebound. Modules imported later pick up the
    replacements from ``vllm.lora.ops.torch_ops``. Safe to call more than once.
    """
    warmup.install()
    if APPLIED:
        if APPLIED[0] == patch_name(lora_kernels) and lora_kernels.compile_asked():
            lora_kernels.compile_with_lora()  # asked for after the first apply in this process
        return
    wanted = [p for p in PATCHES if enabled(p.ENV_VAR)] if enabled(LEGACY_ENV_VAR) else []
    if not wanted:
        logger.debug("loraswap: LoRA patches switched off: vLLM torch LoRA ops left unpatched")
        return
    version = vllm_version()
    patch = next((p for p in wanted if supported(p, version)), None)
    if patch is None:
        return
    if API_PROCESS:  # no model runs here: only the engine's configuration is made here
        if patch is lora_kernels and lora_kernels.compile_asked():
            lora_kernels.compile_with_lora()
        return

    import importlib

    originals: dict[str, Callable[..., Any]] = {}
    for name in patch.REPLACEMENTS:
        home, *importers = HOMES[name]
        module = importlib.import_module(home)
        for importer in importers:
            importlib.import_module(importer)
        originals[name] = getattr(module, name)
    patched = _rebind({id(fn): patch.REPLACEMENTS[name] for name, fn in originals.items()})
    install = getattr(patch, "install", None)
    if install is not None:
        install()

    ORIGINALS.update(originals)
    PATCHED_MODULES[:] = patched
    APPLIED[:] = [patch_name(patch)]
    logger.info(
        "loraswap: applied the %s patch to vLLM %s: torch LoRA ops with index -1 meaning "
        "no adapter (in %s)",
        APPLIED[0],
        version,
        ", ".join(PATCHED_MODULES),
    )


def restore() -> None:
    """Undo :func:`apply`: vLLM's own functions back in every namespace (tests, A/B runs)."""
    if not APPLIED:
        return
    patch = next(p for p in PATCHES if patch_name(p) == APPLIED[0])
    replaced = patch.REPLACEMENTS
    _rebind({id(replaced[name]): fn for name, fn in ORIGINALS.items() if name in replaced})
    uninstall = getattr(patch, "uninstall", None)
    if uninstall is not None:
        uninstall()
    ORIGINALS.clear()
    PATCHED_MODULES.clear()
    APPLIED.clear()
