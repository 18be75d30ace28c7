"""Adapter memory from one budget: how many engine slots, and how many bytes of decoded
adapters the host tier keeps, for this base model, rank and dtype.

A slot holds one adapter at the highest rank for every LoRA-able linear module of the base
model (vLLM allocates them all up front); the host tier keeps loaded adapters in the engine's
memory (vLLM's CPU cache), so a request for one of them needs no disk read. Both come out of
``adapter_memory_gib``. Explicit ``max_loras`` / ``max_cpu_loras`` win.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..choice import Choice

if TYPE_CHECKING:
    from ..config import Settings
    from .validation import BaseModelShapes

GIB = 2**30
# Slots the sizing aims for: the LoRA ops' cost grows with the distinct adapters in a batch,
# not with the slots, so slots only cost memory; 16 covers the streams a small CPU serves at
# once (measured: 16 streams over 1,000 adapters, 8 slots left a third of the requests waiting
# for a slot, TTFT p99 3.0 s; 16 slots 1.1 s).
SLOT_TARGET = 16
# Share of the budget slots may take; the rest is the host tier.
SLOT_SHARE = 0.5
# vLLM's host cache is bounded by a count; the byte budget is ours, so its count only has to
# be high enough never to bind first.
HOST_COUNT_CAP = 4096
UNSIZED_SLOTS = 8  # vLLM's own default, when the base model's shapes are not known
NOT_LORA = ("lm_head", "embed_tokens")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "half": 2}
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
# Slices vLLM packs into one layer (q/k/v, gate/up): the CPU ops' expand copy of such a layer is
# block-diagonal, that many times the size of its lora_b.
PACKED = {"q_proj": 3, "k_proj": 3, "v_proj": 3, "gate_proj": 2, "up_proj": 2}


@dataclass(frozen=True)
class AdapterMemory:
    slot_bytes: int  # vLLM's stacked tensors, plus the CPU ops' copies where they run
    max_loras: int
    max_cpu_loras: int
    host_bytes: int


def dtype_bytes(dtype: str) -> int:
    """Bytes per weight of the engine's LoRA tensors (``auto`` on a GPU: a 16-bit dtype)."""
    return DTYPE_BYTES.get(dtype, 2)


def _lora_linears(shapes: BaseModelShapes) -> list[tuple[str, int, int]]:
    """(module kind such as ``q_proj``, out, in) of every LoRA-able linear module."""
    kinds = (
        (name.rsplit(".", 1)[-1], out, inp) for name, (out, inp) in shapes.linear_shapes.items()
    )
    return [(kind, out, inp) for kind, out, inp in kinds if kind not in NOT_LORA]


def slot_bytes(shapes: BaseModelShapes, rank: int, dtype: str) -> int:
    """One slot: A (rank x in) and B (out x rank) for every LoRA-able linear module."""
    per_rank = sum(out + inp for _, out, inp in _lora_linears(shapes))
    return per_rank * rank * dtype_bytes(dtype)


def ops_bytes(shapes: BaseModelShapes, rank: int, dtype: str) -> int:
    """The CPU LoRA ops' copies of one slot (``vllm_plugin.lora_forms``): lora_a transposed,
    and lora_b transposed, block-diagonal across a packed layer's slices."""
    per_rank = sum(inp + out * PACKED.get(kind, 1) for kind, out, inp in _lora_linears(shapes))
    return per_rank * rank * dtype_bytes(dtype)


def size(
    settings: Settings, shapes: BaseModelShapes, dtype: str, cpu_ops: bool = False
) -> AdapterMemory:
    budget = int(settings.adapter_memory_gib * GIB)
    per_slot = slot_bytes(shapes, settings.max_lora_rank, dtype)
    if cpu_ops:
        per_slot += ops_bytes(shapes, settings.max_lora_rank, dtype)
    if settings.max_loras is not None:
        slots = settings.max_loras
    else:
        fits = int(budget * SLOT_SHARE) // max(per_slot, 1)
        slots = max(1, min(SLOT_TARGET, settings.max_num_seqs, fits))
    host = max(0, budget - slots * per_slot)
    count = settings.max_cpu_loras or max(slots, HOST_COUNT_CAP)
    return AdapterMemory(per_slot, slots, count, host)


def choices(
    settings: Settings, shapes: BaseModelShapes | None, dtype: str, cpu_ops: bool = False
) -> dict[str, Choice]:
    """``max_loras``, ``max_cpu_loras`` and ``adapter_host_bytes``, each with why; ``cpu_ops``:
    the CPU LoRA ops run, and their copies count per slot."""
    if shapes is None:  # no base model weights here (offline ``loraswap info``, a stand-in)
        why = "the base model's weights are not here; sized from adapter_memory_gib at start"
        return {
            "max_loras": Choice(settings.max_loras or UNSIZED_SLOTS,
                                "setting" if settings.max_loras else "auto", why),
            "max_cpu_loras": Choice(settings.max_cpu_loras or HOST_COUNT_CAP,
                                    "setting" if settings.max_cpu_loras else "auto", why),
        }  # fmt: skip
    mem = size(settings, shapes, dtype, cpu_ops)
    budget = f"{settings.adapter_memory_gib:g} GiB adapter memory (LORASWAP_ADAPTER_MEMORY_GIB)"
    slot_mib = mem.slot_bytes / 2**20
    if settings.max_loras is not None:
        slots = Choice(
            mem.max_loras, "setting", f"set by LORASWAP_MAX_LORAS ({slot_mib:.1f} MiB each)"
        )
    else:
        slots = Choice(
            mem.max_loras, "auto",
            f"{slot_mib:.1f} MiB per slot (rank {settings.max_lora_rank}, {dtype}"
            f"{', with the CPU ops copies' if cpu_ops else ''}); up to "
            f"{SLOT_TARGET} (batches mix that many adapters; the ops cost per adapter in the "
            f"batch, not per slot) within {SLOT_SHARE:.0%} of {budget}",
        )  # fmt: skip
    host = Choice(
        mem.host_bytes, "auto",
        f"{mem.host_bytes / 2**20:.0f} MiB of loaded adapters kept in engine memory: the rest "
        f"of {budget}; least recently used and least requested leave first, pinned ones never",
    )  # fmt: skip
    count = Choice(
        mem.max_cpu_loras, "setting" if settings.max_cpu_loras else "auto",
        "set by LORASWAP_MAX_CPU_LORAS" if settings.max_cpu_loras
        else "no count limit of its own: adapter_host_bytes bounds the host tier",
    )  # fmt: skip
    return {"max_loras": slots, "max_cpu_loras": count, "adapter_host_bytes": host}


def adapter_bytes(path: Path, dtype: str) -> int:
    """Bytes an adapter takes in the engine: its tensors' elements at the engine's dtype
    (from the safetensors header, no tensor read). Falls back to the file size."""
    file = path / "adapter_model.safetensors"
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        try:
            return sum(f.stat().st_size for f in path.glob("adapter_model.*"))
        except OSError:
            return 0
    elements = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in meta.get("shape", []):
            count *= dim
        elements += count
    return elements * dtype_bytes(dtype)
