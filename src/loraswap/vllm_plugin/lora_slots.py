"""Slot bookkeeping wrapped around vLLM's LoRA manager: an adapter load costs the slot it wrote.

vLLM's ``LoRAModelManager.activate_adapter`` writes an adapter into one slot of every LoRA
layer's stacked tensors (zeros where the adapter has no matrix) and is called for every adapter
of every step. Wrapped here (by :func:`.lora_kernels.install`): the cached forms of
:mod:`.lora_forms` are updated for that slot only, from what the adapter itself holds; an adapter
already in a slot goes straight to vLLM; a slot vLLM zeroed and nothing wrote since is not
zeroed again; and ``add_adapter`` skips copying the host cache for an adapter already loaded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .lora_forms import refresh_forms, refresh_slot


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
            stays_zero = [refresh_slot(w, index, h, before[id(w)]) for w, h in pairs]
            if len(pairs) == len(a_stack) + len(b_stack):
                ranks = _written_ranks(self, lora_id, name, a_stack) if written else None
                refresh_forms(a_stack, b_stack, index, before, not all(stays_zero), ranks)
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


def wrap_slot_writers() -> None:
    if ORIGINAL_WRITERS:
        return
    for cls in _layer_classes():
        for name, wrap in (("reset_lora", _skipping_reset), ("set_lora", _noting_set)):
            original = cls.__dict__.get(name)
            if callable(original):
                ORIGINAL_WRITERS.append((cls, name, original))
                setattr(cls, name, wrap(original))


def unwrap_slot_writers() -> None:
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
