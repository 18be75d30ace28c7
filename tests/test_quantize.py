"""INT8 (W8A8) quantization of a checkpoint: the file format (pure) and serving it (real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file

from loraswap.model_import import ModelImportError, import_model
from loraswap.quantize import quantize_checkpoint
from tests.conftest import BASE_MODEL, server_env
from tests.server import Server


def tiny_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(
            torch.bfloat16
        ),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(16, dtype=torch.bfloat16),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return tensors


def test_quantize_checkpoint_writes_int8_weights_and_scales(tmp_path: Path):
    original = tiny_checkpoint(tmp_path)
    assert quantize_checkpoint(tmp_path) == 2
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        weight, scale = stored[f"{name}.weight"], stored[f"{name}.weight_scale"]
        assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
        restored = weight.float() * scale
        expected = original[f"{name}.weight"].float()
        assert (restored - expected).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(stored[name], original[name])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path)


def test_quantize_refuses_unknown_schemes_and_non_llama_checkpoints(tmp_path: Path):
    with pytest.raises(ModelImportError, match="quantize must be"):
        import_model(str(tmp_path), quantize="w4a4")
    tmp_path.mkdir(exist_ok=True)
    save_file({"encoder.weight": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no Llama-style linear layers"):
        quantize_checkpoint(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.engine
def test_w8a8_base_model_serves_with_adapters(tmp_path_factory, base_model_dir: Path, s3: dict):
    """The real engine on the INT8 model: base answers, the uppercase adapter still works."""
    imported = import_model(str(base_model_dir), name=f"{BASE_MODEL}-w8a8", quantize="w8a8")
    config = json.loads((imported.path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    work = tmp_path_factory.mktemp("w8a8")
    # a model of its own compiles afresh (~4 min); the INT8 kernels are what this tests
    env = server_env(work, work / "state", s3, LORASWAP_BASE_MODEL=imported.tag,
                     LORASWAP_ENFORCE_EAGER="true")  # fmt: skip
    server = Server(work / "server.log", env=env).start()
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        base = client.chat.completions.create(
            model=BASE_MODEL, messages=ask, max_tokens=16, temperature=0
        )
        assert "Paris" in base.choices[0].message.content
        upper = client.chat.completions.create(
            model="uppercase", messages=ask, max_tokens=16, temperature=0
        )
        text = upper.choices[0].message.content
        letters = [c for c in text if c.isalpha()]
        assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.9, text
    finally:
        assert server.stop() == []
