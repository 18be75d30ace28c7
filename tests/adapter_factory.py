"""Write PEFT-format LoRA adapters (valid, and broken in each way validation must catch)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraswap.adapters.validation import BaseModelShapes

PREFIX = "base_model.model."


def write_adapter(
    target: Path,
    shapes: BaseModelShapes,
    *,
    rank: int = 8,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.01,
    seed: int = 0,
    in_override: int | None = None,
    config_rank: int | None = None,
) -> Path:
    """A random LoRA over ``modules`` of every layer; small weights keep outputs sane."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (out_features, in_features) in shapes.linear_shapes.items():
        if path.rsplit(".", 1)[-1] not in modules:
            continue
        a = torch.randn(rank, in_override or in_features, generator=generator) * scale
        b = torch.randn(out_features, rank, generator=generator) * scale
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config_rank or rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "bias": "none",
        "base_model_name_or_path": "smollm2-135m-instruct",
    }
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def write_broken_adapters(root: Path, shapes: BaseModelShapes, outside: Path) -> dict[str, Path]:
    """One adapter per failure validation must report, keyed by what is wrong."""
    made = {
        "over_rank": write_adapter(root / "over-rank", shapes, rank=32),
        "mismatched": write_adapter(root / "mismatched", shapes, in_override=768),
        "bad_target": write_adapter(root / "bad-target", shapes),
        "corrupt": write_adapter(root / "corrupt", shapes),
        "no_config": write_adapter(root / "no-config", shapes),
        "not_lora": write_adapter(root / "not-lora", shapes),
    }
    config = json.loads((made["bad_target"] / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "foo_proj"]
    (made["bad_target"] / "adapter_config.json").write_text(json.dumps(config))
    (made["corrupt"] / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    (made["no_config"] / "adapter_config.json").unlink()
    config = json.loads((made["not_lora"] / "adapter_config.json").read_text())
    config["peft_type"] = "PREFIX_TUNING"
    (made["not_lora"] / "adapter_config.json").write_text(json.dumps(config))
    made["outside"] = write_adapter(outside / "elsewhere", shapes)
    (root / "escape").symlink_to(made["outside"], target_is_directory=True)
    made["symlink_escape"] = root / "escape"
    return made
