"""How a batch's rows map onto adapter slots, and the grouped matmul the CPU LoRA ops run.

The ops of :mod:`.lora_kernels` run one matmul per adapter slot in use rather than one per token.
A request's greedy output must not depend on who shares its batch, so every row goes through the
same arithmetic whatever else the batch holds: the same matrix and a multiple of ``MIN_ROWS``
rows per product (a batched matmul's block equals the plain matmul of those rows, measured).
Rows whose index is -1 ("no adapter") get zeros, so they never read the last slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Every per-slot matmul gets a multiple of this many rows (zeros pad the rest): MKL's fp32 GEMM
# rounds differently for 1-3 and 5-7 rows, and for the rows past 8 of a 9-11-row product, so
# without the padding a request's result would depend on how many rows share its adapter in the
# batch (measured on AVX-512; bf16 GEMMs are row-count invariant already). At multiples of 4
# every row matched its own 4-row product (4-40 rows tried), and 4 pads decode less than 8
# (17 vs 24 ms of LoRA ops per step with 16 adapters in a batch).
MIN_ROWS = 4

# Per-token adapter indices seen recently → their grouping, keyed by their bytes: a decode step
# calls the ops ~14 times per layer with the same indices, so this is worked out once per step.
_BATCHES: dict[tuple[str, bytes], Grouping] = {}
_BATCH_CACHE_LIMIT = 1024


@dataclass(frozen=True)
class Grouping:
    """How a batch's rows map onto adapter slots.

    ``single`` is the slot when every row uses it (the inputs are used as they are). Otherwise
    slots with at most ``MIN_ROWS`` rows get one block of exactly ``MIN_ROWS`` rows each in a
    padded buffer, and all such blocks run as one batched matmul: ``block_slots`` are the
    consecutive slots they span (slots between them get blocks of zeros), ``gather`` picks
    each padded row from the inputs (index ``rows`` is an all-zero row). Slots with more rows
    (prefill) run one matmul each over their ``large`` rows, padded (index ``rows`` again) to
    a multiple of ``MIN_ROWS``. ``scatter`` picks each input row's result from the blocks'
    results followed by the large groups' (the last index is a zero row, for rows without an
    adapter).
    """

    rows: int
    single: int | None
    slots: tuple[int, ...]
    block_slots: tuple[int, ...] = ()
    large: tuple[tuple[int, torch.Tensor], ...] = ()
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None


def grouping_of(indices: torch.Tensor) -> Grouping:
    """The slots ``indices`` uses and its by-slot layout. Negative indices mean "no adapter":
    such rows read zeros, so index -1 can never read the last slot (the upstream bug)."""
    key = (str(indices.dtype), indices.cpu().numpy().tobytes())
    hit = _BATCHES.get(key)
    if hit is None:
        hit = _BATCHES[key] = _group(indices.tolist())
        if len(_BATCHES) > _BATCH_CACHE_LIMIT:
            _BATCHES.clear()
    return hit


def _group(per_row: list[int]) -> Grouping:
    import torch

    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(per_row):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(row)
    slots = tuple(sorted(by_slot))
    rows = len(per_row)
    if len(slots) == 1 and len(by_slot[slots[0]]) == rows:
        return Grouping(rows=rows, single=slots[0], slots=slots)
    small = [s for s in slots if len(by_slot[s]) <= MIN_ROWS]
    # One block per slot over the range the small slots span, so the batched matmul reads the
    # stacked weights as a view (a slot without rows gets a block of zeros: cheaper than
    # copying the weights of scattered slots).
    block_range = range(small[0], small[-1] + 1) if small else range(0)
    small_set = set(small)
    gather: list[int] = []
    where = [-1] * rows
    for slot in block_range:
        members = by_slot[slot] if slot in small_set else []
        for i, row in enumerate(members):
            where[row] = len(gather) + i
        gather.extend(members + [rows] * (MIN_ROWS - len(members)))
    position = len(gather)
    large = []
    for slot in (s for s in slots if len(by_slot[s]) > MIN_ROWS):
        members = by_slot[slot]
        for i, row in enumerate(members):
            where[row] = position + i
        padded = members + [rows] * (-len(members) % MIN_ROWS)
        position += len(padded)
        large.append((slot, torch.tensor(padded, dtype=torch.long)))
    return Grouping(
        rows=rows,
        single=None,
        slots=slots,
        block_slots=tuple(block_range),
        large=tuple(large),
        gather=torch.tensor(gather, dtype=torch.long),
        scatter=torch.tensor([position if w < 0 else w for w in where], dtype=torch.long),
    )


def grouped_product(x: torch.Tensor, by_slot: torch.Tensor, batch: Grouping) -> torch.Tensor:
    """``x[r] @ by_slot[slot of r]`` for every row (zeros for rows without an adapter)."""
    import torch

    n_out = by_slot.shape[-1]
    if batch.single is not None:
        short = -batch.rows % MIN_ROWS
        padded = torch.nn.functional.pad(x, (0, 0, 0, short)) if short else x
        return _product(padded, by_slot, batch.single)[: batch.rows]
    source = torch.nn.functional.pad(x, (0, 0, 0, 1))  # row ``rows`` is zeros
    parts = []
    if batch.block_slots:
        blocks = source.index_select(0, batch.gather)
        first = batch.block_slots[0]
        matrices = by_slot[first : first + len(batch.block_slots)]
        products = torch.bmm(blocks.view(len(batch.block_slots), MIN_ROWS, -1), matrices)
        parts.append(products.view(-1, n_out))
    for slot, rows in batch.large:
        parts.append(_product(source.index_select(0, rows), by_slot, slot))
    if len(parts) == 1:  # decode: one zero row appended, without a separate cat
        return torch.nn.functional.pad(parts[0], (0, 0, 0, 1)).index_select(0, batch.scatter)
    parts.append(x.new_zeros(1, n_out))
    return torch.cat(parts).index_select(0, batch.scatter)


def _product(x: torch.Tensor, by_slot: torch.Tensor, slot: int) -> torch.Tensor:
    """``x @ by_slot[slot]`` through the same batched GEMM as the mixed blocks (a plain matmul
    of a transposed view rounds differently for few rows)."""
    import torch

    return torch.bmm(x.unsqueeze(0), by_slot[slot : slot + 1])[0]
