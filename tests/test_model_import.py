"""Base-model import into a throw-away BentoML store (a subprocess per store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraswap.model_import import (
    DEFAULT_MODEL_NAME,
    ModelImportError,
    base_model_reference,
    default_name,
    resolve_source,
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real (random, tiny) Llama checkpoint in Hugging Face format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "loraswap", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_local_directory_import_is_idempotent(tmp_path, tiny_model_dir):
    first = run_cli(tmp_path, "import-model", str(tiny_model_dir), "--name", "tiny")
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag.startswith("tiny:")
    second = run_cli(tmp_path, "import-model", str(tiny_model_dir), "--name", "tiny")
    assert second.returncode == 0 and second.stdout.strip() == tag
    assert "already imported" in second.stderr
    stored = tmp_path / "models" / "tiny" / tag.split(":")[1]
    assert (stored / "model.safetensors").is_file()
    manifest = (stored / "model.yaml").read_text()
    for label in ("source: hf-dir", "format: safetensors", "dtype: float32", "content-hash:"):
        assert label in manifest


def test_changed_source_gets_a_new_version(tmp_path, tiny_model_dir):
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in tiny_model_dir.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(config))
    home = tmp_path / "home"
    a = run_cli(home, "import-model", str(tiny_model_dir), "--name", "tiny").stdout.strip()
    b = run_cli(home, "import-model", str(changed), "--name", "tiny").stdout.strip()
    assert a and b and a != b


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/file.gguf", "GGUF file not found"),
        ("not a model", "unknown model source"),
    ],
)
def test_bad_sources_fail_clearly(tmp_path, source, message):
    result = run_cli(tmp_path, "import-model", source)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelImportError, match="no weights"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelImportError, match=r"config\.json"):
        resolve_source(str(tmp_path.parent))


def test_default_source_is_the_packaged_gguf():
    source = resolve_source(None)
    assert source.kind == "gguf" and source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert default_name(source) == DEFAULT_MODEL_NAME


def test_default_model_was_imported_and_reimport_is_a_no_op():
    """`make test` imported the default model; importing again must skip the conversion."""
    result = subprocess.run(
        [sys.executable, "-m", "loraswap", "import-model"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{DEFAULT_MODEL_NAME}:")
    assert "already imported" in result.stderr


def test_hub_import_goes_through_snapshot_download(tmp_path, tiny_model_dir):
    """The hub path is real up to the download call, which a stand-in answers from disk."""
    script = textwrap.dedent(
        f"""
        import shutil, sys, huggingface_hub
        calls = []
        def fake_snapshot_download(**kwargs):
            calls.append(kwargs)
            shutil.copytree({str(tiny_model_dir)!r}, kwargs["local_dir"], dirs_exist_ok=True)
            return kwargs["local_dir"]
        huggingface_hub.snapshot_download = fake_snapshot_download
        from loraswap.model_import import import_model
        result = import_model("acme/tiny-llama", revision="v1")
        call = calls[0]
        assert call["repo_id"] == "acme/tiny-llama" and call["revision"] == "v1", call
        assert "*.safetensors" in call["allow_patterns"]
        print(result.tag)
        """
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tiny-llama:")
    manifest = next((tmp_path / "models" / "tiny-llama").glob("*/model.yaml")).read_text()
    assert "source: hf-hub" in manifest and "acme/tiny-llama" in manifest


def test_service_reference_kinds(tmp_path):
    import bentoml

    assert isinstance(base_model_reference("smollm2-135m-instruct"), bentoml.models.BentoModel)
    hub = base_model_reference("meta-llama/Llama-3.1-8B-Instruct", "abc123")
    assert isinstance(hub, bentoml.models.HuggingFaceModel) and hub.revision == "abc123"
    assert base_model_reference(str(tmp_path)) == str(tmp_path.resolve())


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    """The content hash is remembered by path, size, inode and mtime: a warm start skips reading
    the model; a change to any of them reads it again."""
    from loraswap import model_import

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"a" * 1000)
    reads = []
    real = model_import.read_hash
    monkeypatch.setattr(model_import, "read_hash", lambda *a: reads.append(1) or real(*a))
    first = model_import.hash_files([weights])
    assert model_import.hash_files([weights]) == first and len(reads) == 1
    weights.write_bytes(b"b" * 1000)  # same size, new bytes and mtime
    os.utime(weights, ns=(1, 1))
    second = model_import.hash_files([weights])
    assert second != first and len(reads) == 2
    assert json.loads(model_import.hash_cache_path().read_text())  # written where it says
