"""Turn an adapter source URI into a local PEFT directory the engine can read.

Nothing outside the source policy is read: every source is checked against what some key may
register from (the registration route checked the caller's own limits already). Local paths must
stay inside the adapter roots; ``bentoml://name:version`` reads the BentoML model store;
``hf://org/name@revision`` downloads from the Hugging Face hub; ``http(s)://`` goes through
:mod:`.http_fetch` (every hop's address checked); any other fsspec URL the policy lists by name
(``s3://bucket/prefix``, ``gs://``...) is copied. Remote copies land in the adapter cache under
``<name>/<version>``, written to a temporary directory first and renamed, so a half-download is
never served.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..source_policy import SourcePolicy, SourceRefused
from .http_fetch import download
from .validation import ADAPTER_CONFIG, AdapterInvalid, inside_roots

logger = logging.getLogger(__name__)
HF_SOURCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
ADAPTER_FILES = [ADAPTER_CONFIG, "adapter_model.safetensors", "README.md"]


@dataclass(frozen=True)
class Materialized:
    path: Path
    kind: str  # local | bentoml | hf | http | fsspec


def source_kind(source: str) -> str:
    if source.startswith("hf://"):
        return "hf"
    if source.startswith("bentoml://"):
        return "bentoml"
    if source.startswith("file://") or "://" not in source:
        return "local"
    if source.startswith(("http://", "https://")):
        return "http"
    return "fsspec"


def _publish(tmp: Path, target: Path) -> Path:
    """Atomically move a complete download into place (another process may have won)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    tmp.rename(target)
    return target


def _download_hf(repo: str, revision: str, tmp: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id=repo, revision=revision, local_dir=str(tmp), allow_patterns=ADAPTER_FILES
    )


def _download_http(url: str, tmp: Path, policy: SourcePolicy) -> None:
    def allowed(hop: str) -> None:
        if not policy.reaches(hop):
            raise AdapterInvalid(f"{hop!r}: its host is not in the adapter source policy")

    base, networks = url.rstrip("/"), policy.networks()
    for name in ADAPTER_FILES:
        got = download(f"{base}/{name}", tmp / name, allowed=allowed, networks=networks,
                       required=False)  # fmt: skip
        if not got and name == ADAPTER_CONFIG:
            raise AdapterInvalid(f"no {ADAPTER_CONFIG} at {url}")


def _download_fsspec(url: str, tmp: Path, storage_options: dict[str, Any]) -> None:
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(url, storage_options=storage_options)
    remote = paths[0].rstrip("/")
    if not fs.exists(f"{remote}/{ADAPTER_CONFIG}"):
        raise AdapterInvalid(f"no {ADAPTER_CONFIG} at {url}")
    for name in ADAPTER_FILES:
        if fs.exists(f"{remote}/{name}"):
            fs.get(f"{remote}/{name}", str(tmp / name))


def materialize(
    source: str,
    *,
    name: str,
    version: str,
    roots: list[Path],
    cache_dir: Path,
    storage_options: dict[str, Any] | None = None,
    policy: SourcePolicy | None = None,
) -> Materialized:
    """A local directory holding the adapter of ``source``; raise AdapterInvalid if unusable
    or outside ``policy`` (default: the default policy)."""
    policy = policy or SourcePolicy()
    try:
        policy.check(source, roots)
    except SourceRefused as exc:
        raise AdapterInvalid(str(exc)) from None
    kind = source_kind(source)
    if kind == "local":
        local = source[len("file://") :] if source.startswith("file://") else source
        return Materialized(inside_roots(Path(local), roots), kind)
    if kind == "bentoml":
        import bentoml
        from bentoml.exceptions import BentoMLException

        tag = source[len("bentoml://") :]
        try:
            return Materialized(Path(bentoml.models.get(tag).path), kind)
        except (BentoMLException, ValueError) as exc:
            raise AdapterInvalid(f"BentoML model {tag!r} not found: {exc}") from None

    target = cache_dir / name / version
    if (target / ADAPTER_CONFIG).is_file():
        return Materialized(target, kind)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=cache_dir))
    started = time.monotonic()
    logger.info("adapter %s@%s: downloading %s", name, version, source)
    try:
        if kind == "hf":
            match = HF_SOURCE.match(source)
            if match is None:
                raise AdapterInvalid(f"bad hub source {source!r}: use hf://org/name[@revision]")
            _download_hf(match["repo"], match["rev"] or "main", tmp)
        elif kind == "http":
            _download_http(source, tmp, policy)
        else:
            _download_fsspec(source, tmp, storage_options or {})
    except AdapterInvalid:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterInvalid(f"cannot fetch adapter from {source}: {exc}") from None
    size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    logger.info("adapter %s@%s: downloaded %.1f MB in %.1f s", name, version, size / 1e6,
                time.monotonic() - started)  # fmt: skip
    return Materialized(_publish(tmp, target), kind)
