"""Faster CPU LoRA ops for vLLM, with the index -1 fix built in.

vLLM's torch ops (``vllm.lora.ops.torch_ops.lora_ops``) gather a full copy of the adapter
weights for every token and run one tiny matmul per token. These group the rows by adapter slot
and run one matmul per slot in use, and no work at all when no row has an adapter (base-only
traffic with LoRA enabled) or a slot holds zeros (modules an adapter does not target).
Measurements: docs/benchmarks.md. Rows whose index is -1 ("no adapter") get zeros, so they
never read the last slot (see ``lora_index_fix``). Shapes, dtypes and in-place writes are
upstream's.

In float32 a fused layer runs through :mod:`.row_kernel` (a C kernel, per row, at each adapter's
rank) when it could be built; these torch ops are the path for bf16 and machines without a C
compiler. Also installs :func:`~.lora_index_fix.lora_device` (layers whose weight vLLM's INT8 CPU
kernel released).

The parts these build on, a module each: :mod:`.lora_grouping` (a batch's rows by slot, and the
grouped matmul that gives every row the same arithmetic), :mod:`.lora_forms` (the cached forms
of vLLM's stacked weights the ops read), :mod:`.lora_slots` (vLLM's LoRA manager wrapped so that
a load updates only the slot it wrote) and :mod:`.lora_compile` (torch.compile kept on for LoRA
engines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import loraswap.vllm_plugin.row_kernel as row_kernel  # not through the package: it imports us

from .lora_compile import ORIGINAL_CHECK, compile_asked, compile_with_lora
from .lora_forms import (
    derived_form,
    expand_form,
    live_slots,
    rows_form,
    shrink_form,
    stack_form,
    transposed_copy,
)
from .lora_grouping import grouped_product, grouping_of
from .lora_index_fix import lora_device, write_expanded
from .lora_slots import (
    ORIGINAL_ACTIVATE,
    ORIGINAL_ADD,
    activate_adapter,
    add_adapter,
    unwrap_slot_writers,
    wrap_slot_writers,
)
from .sgmv import sgmv_ops

if TYPE_CHECKING:
    import torch

ENV_VAR = "LORASWAP_LORA_KERNELS"
# vLLM versions whose ops (signatures, in-place semantics) these replace; apply() refuses others.
WRITTEN_FOR = ("0.32.0",)


def install() -> None:
    """Wrap vLLM's ``LoRAModelManager.activate_adapter`` (see
    :func:`.lora_slots.activate_adapter`), ``LRUCacheWorkerLoRAManager.add_adapter``
    (:func:`.lora_slots.add_adapter`) and the LoRA layers' ``reset_lora`` / ``set_lora``
    (:func:`.lora_slots._skipping_reset`), and route
    ``PunicaWrapperCPU.add_lora_linear`` through :func:`lora_linear`."""
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if not ORIGINAL_ACTIVATE:
        ORIGINAL_ACTIVATE.append(LoRAModelManager.activate_adapter)
        LoRAModelManager.activate_adapter = activate_adapter
    if not ORIGINAL_ADD:
        ORIGINAL_ADD.append(LRUCacheWorkerLoRAManager.add_adapter)
        LRUCacheWorkerLoRAManager.add_adapter = add_adapter
    wrap_slot_writers()
    if not ORIGINAL_LINEAR:
        ORIGINAL_LINEAR.append(PunicaWrapperCPU.add_lora_linear)
        PunicaWrapperCPU.add_lora_linear = add_lora_linear
    fused_op()
    if compile_asked():
        compile_with_lora()


def uninstall() -> None:
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if ORIGINAL_ACTIVATE:
        LoRAModelManager.activate_adapter = ORIGINAL_ACTIVATE.pop()
    if ORIGINAL_ADD:
        LRUCacheWorkerLoRAManager.add_adapter = ORIGINAL_ADD.pop()
    unwrap_slot_writers()
    if ORIGINAL_LINEAR:
        PunicaWrapperCPU.add_lora_linear = ORIGINAL_LINEAR.pop()
    if ORIGINAL_CHECK:
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.check_and_update_config = classmethod(ORIGINAL_CHECK.pop())


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor | None:
    """``inputs[r] @ weights[indices[r]].T`` for every row, in the weights' dtype.

    vLLM's version gathers a full copy of the weights for every token and runs one tiny matmul
    per token. Here a batch with one adapter costs one matmul; a mix runs the slots with few
    rows (decode) as one batched matmul of ``MIN_ROWS``-row blocks and each slot with more rows
    (prefill) as one matmul, all against a cached transposed copy of the stacked weights.

    Every row goes through the same arithmetic whatever else the batch holds (the same dtype,
    the same matrix, a multiple of ``MIN_ROWS`` rows per product; a batched matmul's block
    equals the plain matmul of those rows, measured): a request's greedy output must not depend
    on who shares its batch. ``None`` means every row is zero (no adapter in the batch, or only
    slots of zeros): callers skip the write.
    """
    batch = grouping_of(indices)
    live = live_slots(weights)
    if not any(live[s] for s in batch.slots):
        return None
    by_slot = derived_form(weights, "t", transposed_copy)  # [slots, in, out], contiguous
    return grouped_product(inputs.to(weights.dtype), by_slot, batch)


def fusable(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple,
    lora_b_stacked: tuple,
    output_slices: tuple,
) -> bool:
    """Whether a layer's tensors have the layout :func:`lora_linear` was written for (shapes
    and dtypes only: what a compiled graph fixes when it is traced)."""
    n = len(lora_a_stacked)
    if not n or len(lora_b_stacked) != n or len(output_slices) != n:
        return False
    a0 = lora_a_stacked[0]
    rank, dtype = a0.shape[-2], a0.dtype
    if any(
        a.shape[-2] != rank or a.shape[-1] != a0.shape[-1] or a.dtype != dtype
        for a in lora_a_stacked
    ) or any(
        b.shape[-1] != rank or b.dtype != dtype or b.shape[-2] != size
        for b, size in zip(lora_b_stacked, output_slices, strict=True)
    ):
        return False
    return x.shape[-1] == a0.shape[-1] and y.shape[-1] >= sum(output_slices)


def lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple,
    lora_b_stacked: tuple,
    scale: float,
    output_slices: tuple,
    indices: torch.Tensor,
) -> bool:
    """vLLM's ``add_lora_linear`` for one layer, every slice at once: one shrink GEMM for all
    slices and one block-diagonal expand GEMM, instead of a shrink and an expand per slice
    (a fused QKV layer made six op calls, each regrouping and regathering the same rows).
    The same per-row arithmetic rules as :func:`_lora_matmul` (one matrix form, multiples of
    ``MIN_ROWS`` rows). False when the layout is not the one this was written for: the caller
    runs vLLM's per-slice path."""
    if not fusable(y, x, lora_a_stacked, lora_b_stacked, output_slices):
        return False
    rows = x.view(-1, x.shape[-1])
    if indices.numel() < rows.shape[0] or y.view(-1, y.shape[-1]).shape[0] != rows.shape[0]:
        return False
    _fused_op(y, x, lora_a_stacked, lora_b_stacked, scale, sum(output_slices), indices)
    return True


def _run_fused(
    out: torch.Tensor,
    rows: torch.Tensor,
    lora_a_stacked: tuple,
    lora_b_stacked: tuple,
    scale: float,
    total: int,
    indices: torch.Tensor,
) -> None:
    import torch

    if lora_a_stacked[0].dtype == torch.float32 and (function := row_kernel.kernel()) is not None:
        form = stack_form((*lora_a_stacked, *lora_b_stacked), "rows", rows_form)
        if form is not None and row_kernel.run(function, *form, out, rows, scale, indices):
            return
    batch = grouping_of(indices)
    lives = [
        (live_slots(a), live_slots(b)) for a, b in zip(lora_a_stacked, lora_b_stacked, strict=True)
    ]
    if not any(la[s] and lb[s] for la, lb in lives for s in batch.slots):
        return  # no slot in the batch holds this layer's adapters: nothing to add
    dtype = lora_a_stacked[0].dtype
    shrunk = grouped_product(
        rows.to(dtype), stack_form(lora_a_stacked, "shrink", shrink_form), batch
    )
    if scale != 1.0:
        shrunk = scale * shrunk
    expanded = grouped_product(shrunk, stack_form(lora_b_stacked, "expand", expand_form), batch)
    out[:, :total] += expanded


def _fused_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    total: int,
    token_indices: torch.Tensor,
) -> None:
    """:func:`lora_linear`'s work, also registered as a torch custom op (opaque to
    torch.compile: the grouping depends on the indices' values, which a traced graph must not
    fix). ``token_indices`` may be longer than the rows: vLLM's whole per-token buffer."""
    rows = x.view(-1, x.shape[-1])
    _run_fused(y.view(-1, y.shape[-1]), rows, tuple(lora_a), tuple(lora_b), scale, total,
               token_indices[: rows.shape[0]])  # fmt: skip


FUSED_OP: list[Any] = []


def fused_op() -> Any:
    """``torch.ops.loraswap.lora_linear``, registered once per process (by :func:`install`,
    outside any traced region)."""
    if not FUSED_OP:
        import torch

        op = torch.library.custom_op(
            "loraswap::lora_linear",
            mutates_args=("y",),
            schema="(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, "
            "int total, Tensor token_indices) -> ()",
        )(_fused_op)
        op.register_fake(lambda y, x, lora_a, lora_b, scale, total, token_indices: None)
        FUSED_OP.append(op)
    return FUSED_OP[0]


def add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple,
    lora_b_stacked: tuple,
    scale: float,
    output_slices: tuple,
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> None:
    """``PunicaWrapperCPU.add_lora_linear`` through :func:`lora_linear`, or vLLM's own. Under
    torch.compile the layer runs as one custom op fed the whole per-token index buffer."""
    import torch

    if buffer is None and torch.compiler.is_compiling():
        if fusable(y, x, lora_a_stacked, lora_b_stacked, output_slices):
            fused_op()(y, x, list(lora_a_stacked), list(lora_b_stacked), scale,
                       sum(output_slices), self._token_lora_indices)  # fmt: skip
            return
    elif buffer is None and lora_linear(
        y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, self.token_lora_indices
    ):
        return
    ORIGINAL_LINEAR[0](
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
    )


# The unpatched PunicaWrapperCPU.add_lora_linear, set by install().
ORIGINAL_LINEAR: list[Callable[..., None]] = []


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
    if scaling != 1.0:  # vLLM folds the LoRA scaling into B: this is 1.0 on its hot path
        outputs = scaling * outputs
    output_tensor[:, : outputs.shape[1]] = outputs


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
