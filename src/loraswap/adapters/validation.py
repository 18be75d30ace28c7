"""Check a PEFT LoRA adapter against the base model before the engine ever sees it.

vLLM answers a corrupt adapter or one over ``max_lora_rank`` with HTTP 500 and accepts one made
for another hidden size; every check here turns such an adapter into a 4xx that says what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# base_model.model.<module path>.lora_A.weight (PEFT's saved key layout)
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterInvalid(ValueError):
    """The adapter cannot be served; the message says why."""


@dataclass(frozen=True)
class BaseModelShapes:
    """What an adapter must fit: each linear module's (out_features, in_features)."""

    linear_shapes: dict[str, tuple[int, int]]

    @property
    def module_names(self) -> set[str]:
        """Leaf names such as ``q_proj``, the vocabulary of PEFT's ``target_modules``."""
        return {path.rsplit(".", 1)[-1] for path in self.linear_shapes}

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> BaseModelShapes:
        """Read weight shapes from the base model's safetensors headers (no tensor is loaded)."""
        shapes: dict[str, tuple[int, int]] = {}
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        for file in files:
            with safe_open(str(file), framework="numpy") as fh:  # headers only: no torch import
                for key in fh.keys():  # noqa: SIM118
                    if not key.endswith(".weight"):
                        continue
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        return cls(shapes)


@dataclass
class AdapterInfo:
    """What validation learned about an adapter."""

    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    base_model_name: str = ""
    tensors: int = 0
    warnings: list[str] = field(default_factory=list)


def check_name(value: str, what: str = "adapter name") -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise AdapterInvalid(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def inside_roots(path: Path, roots: list[Path]) -> Path:
    """``path`` resolved, if it and every file under it stay inside one of ``roots``."""
    resolved_roots = [root.expanduser().resolve() for root in roots]
    try:
        resolved = path.expanduser().resolve(strict=True)
    except FileNotFoundError:
        raise AdapterInvalid(f"adapter path {str(path)!r} does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise AdapterInvalid(f"adapter path {str(path)!r} cannot be resolved: {exc}") from None

    def contained(candidate: Path) -> bool:
        return any(candidate == root or candidate.is_relative_to(root) for root in resolved_roots)

    if not contained(resolved):
        raise AdapterInvalid(
            f"adapter path {str(path)!r} is outside the adapter roots "
            f"({', '.join(str(r) for r in roots)})"
        )
    if resolved.is_dir():
        for child in resolved.rglob("*"):
            if not contained(child.resolve()):
                raise AdapterInvalid(
                    f"{child.relative_to(resolved)} in adapter {str(path)!r} links outside "
                    "the adapter roots"
                )
    return resolved


def _load_config(directory: Path) -> dict:
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterInvalid(f"not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{ADAPTER_CONFIG} must hold a JSON object")
    return config


def validate_adapter(directory: Path, base: BaseModelShapes, max_rank: int) -> AdapterInfo:
    """Validate a local PEFT LoRA directory; raise :class:`AdapterInvalid` naming the problem."""
    if not directory.is_dir():
        raise AdapterInvalid(f"adapter path {str(directory)!r} is not a directory")
    config = _load_config(directory)

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(f"peft_type is {config.get('peft_type')!r}; only LORA is supported")
    if config.get("use_dora"):
        raise AdapterInvalid("DoRA adapters (use_dora) are not supported by vLLM")
    if config.get("modules_to_save"):
        raise AdapterInvalid(
            f"modules_to_save {config['modules_to_save']} is not supported: vLLM serves LoRA "
            "deltas only"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterInvalid(f"LoRA rank r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterInvalid(f"LoRA rank {rank} exceeds this server's max_lora_rank {max_rank}")
    pattern_ranks = config.get("rank_pattern") or {}
    if any(int(r) > max_rank for r in pattern_ranks.values()):
        raise AdapterInvalid(f"rank_pattern has ranks above max_lora_rank {max_rank}")

    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            raise AdapterInvalid(
                "target_modules as a regular expression is not supported; list module names"
            )
        targets = sorted(base.module_names - {"lm_head"})
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterInvalid("target_modules must be a non-empty list of module names")
    unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - base.module_names)
    if unknown:
        raise AdapterInvalid(
            f"target modules {unknown} do not exist in the base model "
            f"(it has {sorted(base.module_names)})"
        )

    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterInvalid(f"{ADAPTER_WEIGHTS} is missing (only safetensors weights are served)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        raise AdapterInvalid(f"{ADAPTER_WEIGHTS} is unreadable: {exc}") from None
    if not shapes:
        raise AdapterInvalid(f"{ADAPTER_WEIGHTS} holds no tensors")

    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise AdapterInvalid(f"unexpected tensor {key!r}: not a LoRA A/B weight")
        module = match["module"]
        if module not in base.linear_shapes:
            raise AdapterInvalid(f"tensor {key!r} targets {module!r}, absent from the base model")
        out_features, in_features = base.linear_shapes[module]
        if len(shape) != 2:
            raise AdapterInvalid(f"tensor {key!r} has shape {list(shape)}, expected 2 dimensions")
        if match["ab"] == "A":
            tensor_rank, expected = shape[0], (shape[0], in_features)
            wanted = f"[r, {in_features}]"
        else:
            tensor_rank, expected = shape[1], (out_features, shape[1])
            wanted = f"[{out_features}, r]"
        if shape != expected or tensor_rank > max_rank:
            raise AdapterInvalid(
                f"tensor {key!r} has shape {list(shape)} but the base model's {module} needs "
                f"{wanted} with r <= {max_rank}: the adapter was made for a different base model"
            )

    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=sorted(set(targets)),
        size_bytes=size,
        base_model_name=str(config.get("base_model_name_or_path") or ""),
        tensors=len(shapes),
    )
