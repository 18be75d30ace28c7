"""Derived forms of vLLM's stacked LoRA weights, cached for the CPU LoRA ops.

The ops of :mod:`.lora_kernels` read the stacked weights in forms vLLM does not keep: which slots
are non-zero (their work is skipped), a contiguous transposed copy, a layer's slices side by side
for one shrink GEMM and block-diagonal for one expand GEMM, and the row kernel's layout with each
slot's ranks (:mod:`.row_kernel`). Remaking them from every slot after each adapter load would
cost more than the load, so :func:`~.lora_slots.activate_adapter` updates the one slot vLLM wrote
(:func:`refresh_slot`, :func:`refresh_forms`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import loraswap.vllm_plugin.row_kernel as row_kernel  # not through the package: it imports us

if TYPE_CHECKING:
    import torch

# Derived forms of each stacked weight tensor (the transposed copy, which slots are non-zero), per
# tensor object (vLLM passes the same stacked tensors every step), checked by identity through a
# weak reference and refreshed when the tensor's in-place version changes: vLLM loads slots by
# writing into the stacked tensor, which bumps ``_version`` (activate_adapter refreshes the one
# slot it wrote).
_DERIVED: dict[tuple[int, str], tuple[weakref.ref, int, Any]] = {}
_DERIVED_CACHE_LIMIT = 4096


def derived_form(weights: torch.Tensor, kind: str, make: Callable[[torch.Tensor], Any]) -> Any:
    if weights.is_inference():  # no version counter: in-place writes would go unseen
        return make(weights)
    key = (id(weights), kind)
    hit = _DERIVED.get(key)
    if hit is None or hit[0]() is not weights or hit[1] != weights._version:
        if len(_DERIVED) >= _DERIVED_CACHE_LIMIT:
            _DERIVED.clear()
        hit = _DERIVED[key] = (weakref.ref(weights), weights._version, make(weights))
    return hit[2]


def _cached(weights: torch.Tensor, kind: str, version: int) -> tuple | None:
    hit = _DERIVED.get((id(weights), kind))
    if hit is None or hit[0]() is not weights or hit[1] != version:
        return None  # not cached, or stale before this write: remade when used
    return hit


def refresh_slot(weights: torch.Tensor, index: int, holds: bool | None, version: int) -> bool:
    """Bring the cached derived forms of ``weights`` up to date after vLLM wrote slot ``index``;
    ``holds`` says whether it now holds a matrix (None: unknown, read it). A slot of zeros that
    stays zeros costs no tensor work: most modules an adapter does not target. True when the
    slot is known to have held zeros before the write and after it."""
    live_hit = _cached(weights, "live", version)
    t_hit = _cached(weights, "t", version)
    was_live = live_hit[2][index] if live_hit is not None else None
    if live_hit is None and t_hit is None:
        return False
    now_live = holds if holds is not None else bool(weights[index].any())
    try:
        if live_hit is not None:
            live = list(live_hit[2])
            live[index] = now_live
            _DERIVED[(id(weights), "live")] = (live_hit[0], weights._version, live)
        if t_hit is not None:
            copy = t_hit[2]
            if now_live:
                _update_transposed(copy, weights, index)
            elif was_live is not False:
                copy[index].zero_()
            _DERIVED[(id(weights), "t")] = (t_hit[0], weights._version, copy)
    except Exception:  # never fail a load over a cache: remade when used
        _DERIVED.pop((id(weights), "live"), None)
        _DERIVED.pop((id(weights), "t"), None)
    return was_live is False and not now_live


def _update_transposed(copy: torch.Tensor, weights: torch.Tensor, index: int) -> None:
    n_out, n_in = weights.shape[-2], weights.shape[-1]
    copy[index].copy_(weights[index].view(n_out, n_in).T)


def live_slots(weights: torch.Tensor) -> list[bool]:
    """Which slots hold a non-zero matrix. vLLM wraps every linear layer; an adapter that
    targets only attention leaves its MLP slots zero, and their work can be skipped."""
    return derived_form(weights, "live", lambda w: w.flatten(1).any(dim=1).tolist())


def transposed_copy(weights: torch.Tensor) -> torch.Tensor:
    """[slots, (1,) out, in] → [slots, in, out], contiguous: GEMMs on the transposed view are
    slower (measured 10 % of an engine step under many adapters), and activation refreshes one
    slot of the copy only. Made outside inference mode (the forward pass runs in it) so a load
    can update it in place without entering inference mode per slot."""
    import torch

    n_slots, n_out, n_in = weights.shape[0], weights.shape[-2], weights.shape[-1]
    with torch.inference_mode(False):
        return weights.reshape(n_slots, n_out, n_in).transpose(1, 2).contiguous()


def stack_form(stack: tuple, kind: str, make: Callable[[tuple], Any]) -> Any:
    """A derived form of one module's stacked tensors together (its slices), cached like
    :func:`derived_form` and valid while none of them was written."""
    if any(t.is_inference() for t in stack):
        return make(stack)
    key = (tuple(id(t) for t in stack), kind)
    versions = tuple(t._version for t in stack)
    hit = _stack_hit(stack, kind, versions)
    if hit is None:
        if len(_DERIVED) >= _DERIVED_CACHE_LIMIT:
            _DERIVED.clear()
        hit = _DERIVED[key] = (tuple(weakref.ref(t) for t in stack), versions, make(stack))
    return hit[2]


def _stack_hit(stack: tuple, kind: str, versions: tuple) -> tuple | None:
    """The cached ``kind`` form of ``stack`` if it was made from these very tensors at these
    versions, else None."""
    hit = _DERIVED.get((tuple(id(t) for t in stack), kind))
    if (
        hit is None
        or hit[1] != versions
        or any(r() is not t for r, t in zip(hit[0], stack, strict=True))
    ):
        return None
    return hit


def shrink_form(a_stack: tuple) -> torch.Tensor:
    """The slices' lora_a side by side, transposed: [slots, in, slices * rank], so one GEMM
    shrinks a row for every slice (q, k and v share their input)."""
    import torch

    with torch.inference_mode(False):
        return torch.cat([transposed_copy(a) for a in a_stack], dim=2).contiguous()


def expand_form(b_stack: tuple) -> torch.Tensor:
    """The slices' lora_b as one block-diagonal matrix per slot, transposed: [slots, slices *
    rank, sum of out], so one GEMM expands every slice into its own columns; the zeros off the
    diagonal sit in the same places for every row, whatever the batch holds."""
    import torch

    n_slots, rank = b_stack[0].shape[0], b_stack[0].shape[-1]
    total = sum(b.shape[-2] for b in b_stack)
    with torch.inference_mode(False):
        form = b_stack[0].new_zeros(n_slots, rank * len(b_stack), total)
        for i, (b, offset) in enumerate(zip(b_stack, _offsets(b_stack), strict=True)):
            n_out = b.shape[-2]
            form[:, i * rank : (i + 1) * rank, offset : offset + n_out] = b.reshape(
                n_slots, n_out, rank
            ).transpose(1, 2)
    return form


def _offsets(b_stack: tuple) -> list[int]:
    offsets, at = [], 0
    for b in b_stack:
        offsets.append(at)
        at += b.shape[-2]
    return offsets


def _update_shrink_form(form: torch.Tensor, a_stack: tuple, index: int) -> None:
    rank, n_in = a_stack[0].shape[-2], a_stack[0].shape[-1]
    for i, a in enumerate(a_stack):
        form[index, :, i * rank : (i + 1) * rank].copy_(a[index].view(rank, n_in).T)


def _update_expand_form(form: torch.Tensor, b_stack: tuple, index: int) -> None:
    rank = b_stack[0].shape[-1]
    for i, (b, offset) in enumerate(zip(b_stack, _offsets(b_stack), strict=True)):
        n_out = b.shape[-2]
        form[index, i * rank : (i + 1) * rank, offset : offset + n_out].copy_(
            b[index].view(n_out, rank).T
        )


def refresh_forms(
    a_stack: tuple, b_stack: tuple, index: int, before: dict, copy: bool, ranks: tuple | None
) -> None:
    """After vLLM wrote slot ``index`` of a module: update its fused forms' slot (``copy``) or,
    when the slot held zeros and still does, only note the new versions. The row kernel's form
    gets that slot's ranks: ``ranks`` when the adapter says them, else read from that slot (not
    from every slot at the next step)."""
    import torch

    def update_rows(form: Any, stack: tuple, index: int) -> None:
        if form is None:  # the layer does not fit the kernel
            return
        form[1][index] = (
            row_kernel.ranks_of(a_stack, b_stack, index)
            if ranks is None
            else torch.tensor(ranks, dtype=torch.int32)
        )

    for stack, kind, update in (
        (a_stack, "shrink", _update_shrink_form),
        (b_stack, "expand", _update_expand_form),
        ((*a_stack, *b_stack), "rows", update_rows),
    ):
        if not stack:
            continue
        key = (tuple(id(t) for t in stack), kind)
        hit = _stack_hit(stack, kind, tuple(before.get(id(t)) for t in stack))
        if hit is None:
            continue
        try:
            if copy:
                update(hit[2], stack, index)
            _DERIVED[key] = (hit[0], tuple(t._version for t in stack), hit[2])
        except Exception:  # never fail a load over a cache: remade when used
            _DERIVED.pop(key, None)


def rows_form(stack: tuple) -> tuple[row_kernel.Layout, torch.Tensor] | None:
    """A layer's stacked tensors (lora_a slices, then lora_b slices) as the row kernel reads
    them, with each slot's rank per slice; None when they do not fit it."""
    a_stack, b_stack = stack[: len(stack) // 2], stack[len(stack) // 2 :]
    if not row_kernel.Layout.fits(a_stack, b_stack):
        return None
    return row_kernel.Layout(a_stack, b_stack), row_kernel.ranks_of(a_stack, b_stack)
