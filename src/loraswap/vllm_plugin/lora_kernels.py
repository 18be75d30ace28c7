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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import loraswap.vllm_plugin.row_kernel as row_kernel  # not through the package: it imports us

from .lora_index_fix import lora_device, write_expanded
from .sgmv import sgmv_ops

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ENV_VAR = "LORASWAP_LORA_KERNELS"
# vLLM versions whose ops (signatures, in-place semantics) these replace; apply() refuses others.
WRITTEN_FOR = ("0.32.0",)
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
# Derived forms of each stacked weight tensor (the transposed copy, which slots are non-zero), per
# tensor object (vLLM passes the same stacked tensors every step), checked by identity through a
# weak reference and refreshed when the tensor's in-place version changes: vLLM loads slots by
# writing into the stacked tensor, which bumps ``_version`` (activate_adapter refreshes the one
# slot it wrote).
_DERIVED: dict[tuple[int, str], tuple[weakref.ref, int, Any]] = {}
_DERIVED_CACHE_LIMIT = 4096


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


def _grouping(indices: torch.Tensor) -> Grouping:
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


def _module_tensors(manager: Any) -> list[tuple[str, tuple, tuple]]:
    """(module name, lora_a_stacked, lora_b_stacked) of every LoRA layer vLLM wrapped."""
    return [
        (
            name,
            tuple(getattr(module, "lora_a_stacked", ())),
            tuple(getattr(module, "lora_b_stacked", ())),
        )
        for name, module in manager.modules.items()
    ]


@dataclass(frozen=True)
class _Layers:
    """A manager's LoRA layers and which of their stacked tensors have a version counter."""

    count: int
    modules: list[tuple[str, tuple, tuple]]
    tracked: tuple
    tracked_ids: frozenset[int]


def _layers(manager: Any) -> _Layers:
    """Worked out once per manager (vLLM wraps its layers at start, and a stacked tensor stays
    the same object): asking an inference tensor for ``_version`` raises, and ~400 such checks
    per activation cost ~5 ms of the engine loop."""
    cached = getattr(manager, "_loraswap_layers", None)
    if isinstance(cached, _Layers) and cached.count == len(manager.modules):
        return cached
    modules = _module_tensors(manager)
    tracked = tuple(t for _, a, b in modules for t in (*a, *b) if hasattr(t, "_version"))
    layers = _Layers(len(manager.modules), modules, tracked, frozenset(map(id, tracked)))
    with contextlib.suppress(AttributeError):  # no __dict__: worked out per activation
        manager._loraswap_layers = layers
    return layers


def _written(manager: Any, lora_id: int, name: str, n_a: int, n_b: int) -> tuple | None:
    """Which stacked tensors of module ``name`` hold a matrix of adapter ``lora_id`` (per slice
    of lora_a, then lora_b) after vLLM's activation: a module the adapter does not target is
    reset to zeros. None when vLLM's layout is not the expected one (then the slot is read)."""
    try:
        model = manager._registered_adapters[lora_id]
        module_lora = manager._get_lora_layer_weights(model, name)
    except Exception:
        return None
    if not module_lora:
        return (False,) * n_a, (False,) * n_b
    a, b = module_lora.lora_a, module_lora.lora_b
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list) and len(a) == n_a and len(b) == n_b):
            return None
        return tuple(t is not None for t in a), tuple(t is not None for t in b)
    return ((True,), (True,)) if n_a == n_b == 1 else None


def _written_ranks(manager: Any, lora_id: int, name: str, a_stack: tuple) -> tuple | None:
    """The rank vLLM wrote per slice of module ``name`` for adapter ``lora_id`` (0: a slice it
    reset to zeros), from the adapter's own matrices: set_lora copies a rank-r lora_a into the
    first r rows of a zeroed slot. None when the layout is not that one (the slot is read)."""
    try:
        module_lora = manager._get_lora_layer_weights(manager._registered_adapters[lora_id], name)
    except Exception:
        return None
    if not module_lora:
        return (0,) * len(a_stack)
    a, b = module_lora.lora_a, module_lora.lora_b
    a, b = (a, b) if isinstance(a, list) else ([a], [b])
    if not isinstance(b, list) or len(a) != len(a_stack) or len(b) != len(a_stack):
        return None
    ranks = []
    for t, u, stacked in zip(a, b, a_stack, strict=True):
        if t is None or u is None:
            ranks.append(0)
        elif t.dim() != 2 or t.shape[1] != stacked.shape[-1] or t.shape[0] > stacked.shape[-2]:
            return None
        else:
            ranks.append(int(t.shape[0]))
    return tuple(ranks)


def _cached(weights: torch.Tensor, kind: str, version: int) -> tuple | None:
    hit = _DERIVED.get((id(weights), kind))
    if hit is None or hit[0]() is not weights or hit[1] != version:
        return None  # not cached, or stale before this write: remade when used
    return hit


def _refresh_slot(weights: torch.Tensor, index: int, holds: bool | None, version: int) -> bool:
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


def activate_adapter(self: Any, lora_id: int) -> bool:
    """vLLM's ``LoRAModelManager.activate_adapter``, then the derived forms (which slots are
    live, the transposed copy) are updated for the one slot it wrote, so the next step does not
    remake them from every slot of every stacked tensor (~23 ms per load for liveness alone at
    16 slots, fp32, SmolLM2-135M). Which modules the adapter targets comes from the adapter
    itself rather than from reading each slot back (14 → 7 ms per activation, measured).

    vLLM calls this for every adapter of every step, active or not (~5,000 calls in a run of
    160 requests over 100 adapters): an adapter already in a slot goes straight to vLLM, which
    only refreshes its place in the LRU order."""
    if lora_id in getattr(self, "_active_adapters", ()):
        return ORIGINAL_ACTIVATE[0](self, lora_id)
    layers = _layers(self)
    before = {id(t): t._version for t in layers.tracked}
    activated = ORIGINAL_ACTIVATE[0](self, lora_id)
    if activated and lora_id in self.lora_index_to_id:
        index = self.lora_index_to_id.index(lora_id)
        for name, a_stack, b_stack in layers.modules:
            if _untouched((*a_stack, *b_stack), layers.tracked_ids, before):
                continue  # a slot of zeros the adapter leaves alone: its forms stay valid
            written = _written(self, lora_id, name, len(a_stack), len(b_stack))
            holds_a, holds_b = (
                written if written is not None else ((None,) * len(a_stack), (None,) * len(b_stack))
            )
            pairs = [
                (w, h)
                for w, h in (
                    *zip(a_stack, holds_a, strict=True),
                    *zip(b_stack, holds_b, strict=True),
                )
                if id(w) in layers.tracked_ids
            ]
            stays_zero = [_refresh_slot(w, index, h, before[id(w)]) for w, h in pairs]
            if len(pairs) == len(a_stack) + len(b_stack):
                ranks = _written_ranks(self, lora_id, name, a_stack) if written else None
                _refresh_forms(a_stack, b_stack, index, before, not all(stays_zero), ranks)
    return activated


def _untouched(stacked: tuple, tracked_ids: frozenset[int], before: dict) -> bool:
    """Whether no stacked tensor of a module was written since ``before`` (only knowable when
    each has a version counter)."""
    return bool(stacked) and all(
        id(t) in tracked_ids and t._version == before[id(t)] for t in stacked
    )


# Slots known to hold zeros in every stacked tensor of a LoRA layer, on the layer itself.
CLEAN_SLOTS = "_loraswap_clean_slots"
# (class, method name, vLLM's method) for each slot writer wrapped by install().
ORIGINAL_WRITERS: list[tuple[type, str, Callable[..., Any]]] = []


def _clean_slots(layer: Any) -> set[int]:
    return layer.__dict__.setdefault(CLEAN_SLOTS, set())


def _skipping_reset(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM zeroes every module an adapter does not target at each activation, including the
    embedding and logits layers' vocabulary-sized slots (~3 ms an activation for SmolLM2): a
    slot it zeroed and nothing wrote since is left as it is."""

    @functools.wraps(original)
    def reset_lora(self: Any, index: int) -> None:
        clean = _clean_slots(self)
        if index in clean:
            return
        original(self, index)
        clean.add(index)

    return reset_lora


def _noting_set(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_lora(self: Any, index: int, *args: Any, **kwargs: Any) -> None:
        _clean_slots(self).discard(index)
        try:
            original(self, index, *args, **kwargs)
        finally:
            _clean_slots(self).discard(index)  # set_lora zeroes the slot first, then writes

    return set_lora


def _layer_classes() -> list[type]:
    from vllm.lora.layers import BaseLayerWithLoRA

    classes, todo = [], [BaseLayerWithLoRA]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    return classes


def _wrap_slot_writers() -> None:
    if ORIGINAL_WRITERS:
        return
    for cls in _layer_classes():
        for name, wrap in (("reset_lora", _skipping_reset), ("set_lora", _noting_set)):
            original = cls.__dict__.get(name)
            if callable(original):
                ORIGINAL_WRITERS.append((cls, name, original))
                setattr(cls, name, wrap(original))


def _unwrap_slot_writers() -> None:
    while ORIGINAL_WRITERS:
        cls, name, original = ORIGINAL_WRITERS.pop()
        setattr(cls, name, original)


# The unpatched method, set by install().
ORIGINAL_ACTIVATE: list[Callable[..., bool]] = []
ORIGINAL_ADD: list[Callable[..., bool]] = []


def add_adapter(self: Any, lora_request: Any) -> bool:
    """vLLM's ``LRUCacheWorkerLoRAManager.add_adapter``, which every step calls for each adapter
    in the batch and which starts by copying the whole host cache into a set to see whether the
    adapter is loaded (a copy of up to ``max_cpu_loras`` entries, per adapter, per step). An
    adapter already loaded takes vLLM's own path for that case without the copy."""
    from vllm.lora import worker_manager

    manager = self._adapter_manager
    lora_id = lora_request.lora_int_id
    if lora_request.load_inplace or lora_id not in manager._registered_adapters:
        return ORIGINAL_ADD[0](self, lora_request)
    with worker_manager.gpu_sync_allowed():
        loaded = manager.get_adapter(lora_id) is not None
        manager.activate_adapter(lora_id)
    return loaded


def install() -> None:
    """Wrap vLLM's ``LoRAModelManager.activate_adapter`` (see :func:`activate_adapter`),
    ``LRUCacheWorkerLoRAManager.add_adapter`` (:func:`add_adapter`) and the LoRA layers'
    ``reset_lora`` / ``set_lora`` (:func:`_skipping_reset`), and route
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
    _wrap_slot_writers()
    if not ORIGINAL_LINEAR:
        ORIGINAL_LINEAR.append(PunicaWrapperCPU.add_lora_linear)
        PunicaWrapperCPU.add_lora_linear = add_lora_linear
    fused_op()
    if compile_asked():
        compile_with_lora()


# Set by the engine (``LORASWAP_COMPILE_LORA``): keep torch.compile on for LoRA engines.
COMPILE_ENV = "LORASWAP_COMPILE_LORA"
ORIGINAL_CHECK: list[Any] = []


def compile_asked() -> bool:
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def compile_with_lora() -> None:
    """vLLM's CPU platform turns compilation off whenever LoRA is on, because its LoRA ops
    decide in Python from the batch (which a traced graph would fix). Here every LoRA layer is
    one opaque custom op fed the per-token index buffer, so the compiled graph stays right:
    keep the mode the platform picked before it turned compilation off."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    if ORIGINAL_CHECK:
        return
    from loraswap.machine import cxx_compiler

    if cxx_compiler() is None:
        logger.warning(
            "loraswap: no C++ compiler (g++) for torch.compile: the LoRA engine runs eager"
        )
        return
    original = CpuPlatform.check_and_update_config.__func__
    ORIGINAL_CHECK.append(original)

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        wanted = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        if vllm_config.lora_config is not None and wanted == CompilationMode.VLLM_COMPILE:
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
            logger.info("loraswap: LoRA engine compiled (LORASWAP_COMPILE_LORA)")

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    _reload_compiled_models()


def _reload_compiled_models() -> None:
    """vLLM 0.32 saves the compiled model to its cache but cannot load it back on CPU: the
    loaded callable lacks ``finalize_loading`` (which only its GPU backend's callables have), so
    every start compiled again (+40 s). Give it a no-op one: a warm start then loads the
    compiled model from the cache (measured: 70-79 s → 27 s to an engine, the same outputs)."""
    import torch

    if getattr(torch.compiler.load_compiled_function, "_loraswap", False):
        return
    load = torch.compiler.load_compiled_function

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        inner = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if inner is not None and not hasattr(inner, "finalize_loading"):
            inner.finalize_loading = lambda vllm_config: None
        return loaded

    load_compiled_function._loraswap = True  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function


def uninstall() -> None:
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if ORIGINAL_ACTIVATE:
        LoRAModelManager.activate_adapter = ORIGINAL_ACTIVATE.pop()
    if ORIGINAL_ADD:
        LRUCacheWorkerLoRAManager.add_adapter = ORIGINAL_ADD.pop()
    _unwrap_slot_writers()
    if ORIGINAL_LINEAR:
        PunicaWrapperCPU.add_lora_linear = ORIGINAL_LINEAR.pop()
    if ORIGINAL_CHECK:
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.check_and_update_config = classmethod(ORIGINAL_CHECK.pop())


def _update_transposed(copy: torch.Tensor, weights: torch.Tensor, index: int) -> None:
    n_out, n_in = weights.shape[-2], weights.shape[-1]
    copy[index].copy_(weights[index].view(n_out, n_in).T)


def _live_slots(weights: torch.Tensor) -> list[bool]:
    """Which slots hold a non-zero matrix. vLLM wraps every linear layer; an adapter that
    targets only attention leaves its MLP slots zero, and their work can be skipped."""
    return _derived(weights, "live", lambda w: w.flatten(1).any(dim=1).tolist())


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
    batch = _grouping(indices)
    live = _live_slots(weights)
    if not any(live[s] for s in batch.slots):
        return None
    by_slot = _derived(weights, "t", _transposed)  # [slots, in, out], contiguous
    return _grouped(inputs.to(weights.dtype), by_slot, batch)


def _grouped(x: torch.Tensor, by_slot: torch.Tensor, batch: Grouping) -> torch.Tensor:
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


def _transposed(weights: torch.Tensor) -> torch.Tensor:
    """[slots, (1,) out, in] → [slots, in, out], contiguous: GEMMs on the transposed view are
    slower (measured 10 % of an engine step under many adapters), and activation refreshes one
    slot of the copy only. Made outside inference mode (the forward pass runs in it) so a load
    can update it in place without entering inference mode per slot."""
    import torch

    n_slots, n_out, n_in = weights.shape[0], weights.shape[-2], weights.shape[-1]
    with torch.inference_mode(False):
        return weights.reshape(n_slots, n_out, n_in).transpose(1, 2).contiguous()


def _stack_form(stack: tuple, kind: str, make: Callable[[tuple], Any]) -> Any:
    """A derived form of one module's stacked tensors together (its slices), cached like
    :func:`_derived` and valid while none of them was written."""
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


def _shrink_form(a_stack: tuple) -> torch.Tensor:
    """The slices' lora_a side by side, transposed: [slots, in, slices * rank], so one GEMM
    shrinks a row for every slice (q, k and v share their input)."""
    import torch

    with torch.inference_mode(False):
        return torch.cat([_transposed(a) for a in a_stack], dim=2).contiguous()


def _expand_form(b_stack: tuple) -> torch.Tensor:
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


def _refresh_forms(
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


def _rows_form(stack: tuple) -> tuple[row_kernel.Layout, torch.Tensor] | None:
    """A layer's stacked tensors (lora_a slices, then lora_b slices) as the row kernel reads
    them, with each slot's rank per slice; None when they do not fit it."""
    a_stack, b_stack = stack[: len(stack) // 2], stack[len(stack) // 2 :]
    if not row_kernel.Layout.fits(a_stack, b_stack):
        return None
    return row_kernel.Layout(a_stack, b_stack), row_kernel.ranks_of(a_stack, b_stack)


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
        form = _stack_form((*lora_a_stacked, *lora_b_stacked), "rows", _rows_form)
        if form is not None and row_kernel.run(function, *form, out, rows, scale, indices):
            return
    batch = _grouping(indices)
    lives = [
        (_live_slots(a), _live_slots(b))
        for a, b in zip(lora_a_stacked, lora_b_stacked, strict=True)
    ]
    if not any(la[s] and lb[s] for la, lb in lives for s in batch.slots):
        return  # no slot in the batch holds this layer's adapters: nothing to add
    dtype = lora_a_stacked[0].dtype
    shrunk = _grouped(rows.to(dtype), _stack_form(lora_a_stacked, "shrink", _shrink_form), batch)
    if scale != 1.0:
        shrunk = scale * shrunk
    expanded = _grouped(shrunk, _stack_form(lora_b_stacked, "expand", _expand_form), batch)
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
