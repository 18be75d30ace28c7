"""vLLM's torch LoRA ops with index -1 meaning "no adapter": the fix upstream should merge.

``vllm.lora.ops.torch_ops.lora_ops`` indexes the stacked adapter weights with the per-token
adapter index, where -1 means "no adapter"; PyTorch reads -1 as the LAST slot, so base-model
rows batched with adapter rows get that slot's delta. These are upstream's ops (vLLM 0.32.0)
with the index clamped at 0 and the rows whose index is negative zeroed: the lines marked
``# fix`` are the whole change (docs/upstream-lora-index-bug.md has the diff). Rows with a valid
index are computed exactly as upstream does. Drop this module once a vLLM release has the fix.

Also :func:`lora_device`: vLLM's LoRA wrapper reads ``weight.device`` of layers whose weight
vLLM's INT8 CPU kernel released.

``torch`` is imported inside the ops so that importing the plugin stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .guard import ORIGINALS
from .sgmv import sgmv_ops

if TYPE_CHECKING:
    import torch

ENV_VAR = "LORASWAP_LORA_INDEX_FIX"
# vLLM versions whose lora_ops.py these ops were copied from; apply() refuses on any other.
WRITTEN_FOR = ("0.32.0",)


def _per_row(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Upstream's per-row product (a gathered weight copy and an einsum), with the fix."""
    import torch

    # fix: -1 means "no LoRA"; do not let it wrap around to the last slot.
    no_lora = (indices < 0).unsqueeze(-1)  # fix
    selected_loras = weights[indices.clamp(min=0)].to(dtype=dtype)  # fix
    if len(selected_loras.shape) == 4:
        selected_loras = selected_loras.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected_loras)
    return outputs.masked_fill(no_lora, 0)  # fix


def write_expanded(output_tensor: torch.Tensor, outputs: torch.Tensor, add_inputs: bool) -> None:
    """Upstream's ``bgmv_expand`` write: padding may differ between adapter and model, and a
    single row of outputs broadcasts."""
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
):
    outputs = _per_row(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)

    write_expanded(output_tensor, outputs, add_inputs)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
):
    outputs = _per_row(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)

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
    outputs = _per_row(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)

    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


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


def lora_device(base_layer: Any) -> torch.device:
    """vLLM's ``_get_lora_device``, also for layers whose ``weight`` was released.

    On CPUs without AMX, vLLM's INT8 (W8A8) kernel prepacks the weight for oneDNN and sets
    ``layer.weight = None``; vLLM's LoRA wrapper then fails at engine start reading
    ``weight.device``. Any other tensor of the layer tells the device as well.
    """
    import itertools

    import torch

    if getattr(base_layer, "weight", False) is None:
        tensor = next(itertools.chain(base_layer.parameters(), base_layer.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device
    return ORIGINALS["_get_lora_device"](base_layer)


# Every vLLM function this patch replaces, by name (apply() knows where each one lives).
REPLACEMENTS: dict[str, Callable[..., Any]] = {**FIXED, "_get_lora_device": lora_device}
