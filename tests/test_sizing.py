"""Adapter memory sized from one budget: slots and the host tier, for the base model's shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraswap.adapters import sizing
from loraswap.adapters.validation import BaseModelShapes
from loraswap.config import Settings

# SmolLM2-135M: 30 layers of q/k/v/o and gate/up/down, plus embeddings and lm_head (no LoRA).
LAYER = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
         "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # fmt: skip
SHAPES = BaseModelShapes(
    {f"model.layers.{i}.{m}": shape for i in range(30) for m, shape in LAYER.items()}
    | {"lm_head": (49152, 576), "model.embed_tokens": (49152, 576)}
)
PER_RANK = 30 * sum(out + inp for out, inp in LAYER.values())


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_slot_bytes_cover_every_lora_module_at_the_highest_rank():
    assert sizing.slot_bytes(SHAPES, 16, "float32") == PER_RANK * 16 * 4
    assert sizing.slot_bytes(SHAPES, 16, "bfloat16") == PER_RANK * 16 * 2


def test_cpu_ops_copies_count_per_slot():
    """lora_a once, lora_b once per slice of a packed layer (q/k/v: 3, gate/up: 2)."""
    per_rank = 30 * (576 * 6 + 1536 + 3 * (576 + 192 + 192) + 576 + 2 * 3072 + 576)
    assert sizing.ops_bytes(SHAPES, 16, "float32") == per_rank * 16 * 4
    cpu = sizing.size(settings(), SHAPES, "float32", cpu_ops=True)
    assert cpu.slot_bytes == sizing.slot_bytes(SHAPES, 16, "float32") + per_rank * 16 * 4
    assert cpu.max_loras == 16  # 46 MiB a slot: sixteen still fit in half of 2 GiB
    assert cpu.host_bytes == 2 * sizing.GIB - 16 * cpu.slot_bytes


def test_default_budget_gives_sixteen_slots_and_the_rest_to_the_host_tier():
    mem = sizing.size(settings(), SHAPES, "float32")
    assert mem.max_loras == 16 and mem.max_cpu_loras == sizing.HOST_COUNT_CAP
    assert mem.host_bytes == 2 * sizing.GIB - 16 * mem.slot_bytes


@pytest.mark.parametrize(
    ("kw", "slots"),
    [
        ({"adapter_memory_gib": 0.25}, 6),  # half of 256 MiB holds 6 slots of 18.6 MiB
        ({"max_num_seqs": 4}, 4),  # never more slots than sequences in a batch
        ({"max_loras": 5}, 5),  # an explicit setting wins
        ({"adapter_memory_gib": 0.001}, 1),  # always at least one
    ],
)
def test_slots_follow_the_budget_the_batch_and_explicit_settings(kw, slots):
    mem = sizing.size(settings(**kw), SHAPES, "float32")
    assert mem.max_loras == slots
    assert mem.host_bytes == max(
        0, int(settings(**kw).adapter_memory_gib * sizing.GIB) - slots * mem.slot_bytes
    )


def test_choices_say_why_and_fall_back_without_the_model():
    chosen = sizing.choices(settings(), SHAPES, "float32")
    assert chosen["max_loras"].value == 16 and chosen["max_loras"].source == "auto"
    assert "MiB per slot" in chosen["max_loras"].reason
    assert chosen["adapter_host_bytes"].value > 0
    unknown = sizing.choices(settings(), None, "float32")
    assert unknown["max_loras"].value == sizing.UNSIZED_SLOTS
    assert sizing.choices(settings(max_loras=3), None, "float32")["max_loras"].value == 3


def test_adapter_bytes_count_elements_at_the_engine_dtype(tmp_path: Path):
    save_file(
        {"a": torch.zeros(8, 576, dtype=torch.bfloat16), "b": torch.zeros(576, 8)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    assert sizing.adapter_bytes(tmp_path, "float32") == 2 * 8 * 576 * 4
    assert sizing.adapter_bytes(tmp_path, "bfloat16") == 2 * 8 * 576 * 2
    assert sizing.adapter_bytes(tmp_path / "missing", "float32") == 0
