"""vLLM's ``sgmv_*`` LoRA ops, built on a set of ``bgmv_*`` ops.

The sgmv ops only expand per-sequence adapter indices to per-token ones and call the matching
bgmv op. Each patch builds its own so they reach its bgmv ops directly, not via a module global.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _identity(tensor: Any) -> tuple[int, int, tuple[int, ...], int]:
    """Where ``tensor``'s data is and how often it was written in place: equal identities mean
    equal contents."""
    return (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor._version)


def sgmv_ops(
    bgmv_shrink: Callable[..., Any],
    bgmv_expand: Callable[..., Any],
    bgmv_expand_slice: Callable[..., Any],
) -> dict[str, Callable[..., Any]]:
    def per_token(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
        """Per-token indices, worked out once per step: vLLM passes the same metadata to all
        ~420 op calls of a step, and ``repeat_interleave`` on every call took 11 % of the
        engine's time under many adapters (measured)."""
        import torch

        try:
            key = (_identity(lora_indices_tensor), _identity(seq_len_tensor))
        except RuntimeError:  # inference tensors have no version counter: no caching
            return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        if cached[0] != key:
            cached[:] = [key, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)]
        return cached[1]

    cached: list[Any] = [None, None]

    def sgmv_shrink(
        inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
        lora_indices_tensor, batches, max_seq_length, token_nums, scaling,
    ):  # fmt: skip
        indices = per_token(lora_indices_tensor, seq_len_tensor)
        bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)

    def sgmv_expand(
        inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
        lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False,
    ):  # fmt: skip
        indices = per_token(lora_indices_tensor, seq_len_tensor)
        bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)

    def sgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
        lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
        add_inputs=False,
    ):  # fmt: skip
        indices = per_token(lora_indices_tensor, seq_len_tensor)
        bgmv_expand_slice(
            inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
        )

    return {
        "sgmv_shrink": sgmv_shrink,
        "sgmv_expand": sgmv_expand,
        "sgmv_expand_slice": sgmv_expand_slice,
    }
