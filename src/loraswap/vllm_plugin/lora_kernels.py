"""Faster CPU LoRA ops for vLLM, with the index -1 fix built in.

vLLM's torch ops (``vllm.lora.ops.torch_ops.lora_ops``) gather a full copy of the adapter
weights for every token and run one tiny matmul per token. These do one matmul per op (against
all adapter slots stacked and masked per row when adapters mix), and no work at all when no row
has an adapter (base-only traffic with LoRA enabled) or the rows' slots hold zeros (modules an
adapter does not target). Measurements: docs/benchmarks.md. Rows whose index is -1 ("no
adapter") get a zero mask row, so they never read the last slot (see ``lora_index_fix``).
Shapes, dtypes and in-place writes are upstream's.

Also installs :func:`~.lora_index_fix.lora_device` (layers whose weight vLLM's INT8 CPU kernel
released).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .lora_index_fix import lora_device, write_expanded
from .sgmv import sgmv_ops

if TYPE_CHECKING:
    import torch

ENV_VAR = "LORASWAP_LORA_KERNELS"
# vLLM versions whose ops (signatures, in-place semantics) these replace; apply() refuses others.
WRITTEN_FOR = ("0.32.0",)

# Per-token adapter indices seen recently → (slots used, the one-hot row→slot mask by dtype, or
# None when every row uses one slot), keyed by their bytes: a decode step calls the ops ~14 times
# per layer with the same indices, so this is worked out once per step.
_BATCHES: dict[tuple[int, str, bytes], tuple[list[int], dict[Any, torch.Tensor] | None]] = {}
_BATCH_CACHE_LIMIT = 1024
# Derived forms of each stacked weight tensor (by columns, which slots are non-zero), per tensor
# object (vLLM passes the same stacked tensors every step), checked by identity through a weak
# reference and refreshed when the tensor's in-place version changes: vLLM loads and clears
# slots by writing into the stacked tensor, which bumps ``_version``.
_DERIVED: dict[tuple[int, str], tuple[weakref.ref, int, Any]] = {}
_DERIVED_CACHE_LIMIT = 4096


def _batch(indices: torch.Tensor, n_slots: int) -> tuple[list[int], dict[Any, torch.Tensor] | None]:
    """The adapter slots ``indices`` uses and, unless all rows share one, a one-hot mask
    (float32; other dtypes are added to the same dict when first asked for, by ``_mask``).

    Negative indices mean "no adapter": such rows get an all-zero mask row, so index -1 can
    never read the last slot (the upstream bug).
    """
    key = (n_slots, str(indices.dtype), indices.cpu().numpy().tobytes())
    hit = _BATCHES.get(key)
    if hit is None:
        import torch

        slots = sorted({i for i in indices.tolist() if i >= 0})
        masks = None
        if slots and not (len(slots) == 1 and bool((indices == slots[0]).all())):
            valid = (indices >= 0).unsqueeze(1)
            onehot = torch.nn.functional.one_hot(indices.clamp_min(0).long(), n_slots)
            masks = {torch.float32: (onehot * valid).to(torch.float32)}
        if len(_BATCHES) >= _BATCH_CACHE_LIMIT:
            _BATCHES.clear()
        hit = _BATCHES[key] = (slots, masks)
    return hit


def _mask(masks: dict[Any, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The batch's one-hot mask in ``dtype``, converted once per batch rather than once per op."""
    import torch

    mask = masks.get(dtype)
    if mask is None:
        mask = masks[dtype] = masks[torch.float32].to(dtype)
    return mask


def _derived(weights: torch.Tensor, kind: str, make: Callable[[torch.Tensor], Any]) -> Any:
    if weights.is_inference():  # no version counter: in-place writes would go unseen
        return make(weights)
    key = (id(weights), kind)
    hit = _DERIVED.get(key)
    if hit is None or hit[0]() is not weights or hit[1] != weights._version:
        if len(_DERIVED) >= _DERIVED_CACHE_LIMIT:
            _DERIVED.clear()
        hit = _DERIVED[key] = (weakref.ref(weights), weights._version, make(weights))
    return hit[2]


def _live_slots(weights: torch.Tensor) -> list[bool]:
    """Which slots hold a non-zero matrix. vLLM wraps every linear layer; an adapter that
    targets only attention leaves its MLP slots zero, and their work can be skipped."""
    return _derived(weights, "live", lambda w: w.flatten(1).any(dim=1).tolist())


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor | None:
    """``inputs[r] @ weights[indices[r]].T`` for every row, in the weights' dtype.

    vLLM's version gathers a full copy of the weights for every token and runs one tiny matmul
    per token. Here a batch with one adapter costs one matmul against that slot, and a batch
    mixing adapters one matmul against all slots stacked, where a one-hot row mask keeps each
    row's own slot and zeroes rows without an adapter (the other slots add exact zeros).

    Every row is computed in the weights' dtype whatever else the batch holds: a request's
    arithmetic must not depend on who shares its batch (an fp32 path for one adapter and a bf16
    path for mixes made greedy outputs differ between solo and mixed batches). ``None`` means
    every row is zero (no adapter in the batch, or only slots of zeros): callers skip the write.
    """
    n_slots, n_out, n_in = weights.shape[0], weights.shape[-2], weights.shape[-1]
    slots, masks = _batch(indices, n_slots)
    live = _live_slots(weights)
    if not any(live[s] for s in slots):
        return None
    shrink_like = n_out <= n_in  # [rows, in] @ [in, slots*out], then keep each row's slot
    x = inputs.to(weights.dtype)
    if masks is None:
        if shrink_like:
            return x @ weights.reshape(-1, n_in)[slots[0] * n_out : (slots[0] + 1) * n_out].T
        return x @ _derived(weights, "cols", _by_columns)[slots[0] * n_in : (slots[0] + 1) * n_in]
    mask = _mask(masks, weights.dtype)
    if shrink_like:
        full = (x @ weights.reshape(-1, n_in).T).view(-1, n_slots, n_out)
        return (full * mask.unsqueeze(2)).sum(dim=1)
    # expand-like: spread each row into its slot's block of inputs, then one matmul.
    blocks = (mask.unsqueeze(2) * x.unsqueeze(1)).reshape(x.shape[0], -1)
    return blocks @ _derived(weights, "cols", _by_columns)


def _by_columns(weights: torch.Tensor) -> torch.Tensor:
    """[slots, (1,) out, in] → [slots * in, out]: each slot's transposed matrix, stacked."""
    n_slots, n_out, n_in = weights.shape[0], weights.shape[-2], weights.shape[-1]
    return weights.reshape(n_slots, n_out, n_in).transpose(1, 2).reshape(-1, n_out)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    """vLLM's ``bgmv_expand``: rows with index -1 contribute zero."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor)
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    if outputs is None:
        if not add_inputs:
            output_tensor[:, :common_len] = 0
        return

    write_expanded(output_tensor, outputs[:, :common_len], add_inputs)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    """vLLM's ``bgmv_shrink``: rows with index -1 are written as zero."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor)
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
    """vLLM's ``bgmv_expand_slice``: rows with index -1 contribute zero."""
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor)
    window = output_tensor[:, slice_offset : slice_offset + slice_size]
    if outputs is None:
        if not add_inputs:
            window.zero_()
        return
    if add_inputs:
        window += outputs[:]
    else:
        window.copy_(outputs[:])


# The ops by their name in vllm.lora.ops.torch_ops.lora_ops.
FIXED: dict[str, Callable[..., Any]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}
FIXED.update(sgmv_ops(bgmv_shrink, bgmv_expand, bgmv_expand_slice))
sgmv_shrink, sgmv_expand, sgmv_expand_slice = (
    FIXED["sgmv_shrink"],
    FIXED["sgmv_expand"],
    FIXED["sgmv_expand_slice"],
)


# Every vLLM function this patch replaces, by name (apply() knows where each one lives).
REPLACEMENTS: dict[str, Callable[..., Any]] = {**FIXED, "_get_lora_device": lora_device}
