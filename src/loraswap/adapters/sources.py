"""Turn an adapter source URI into a local PEFT directory the engine can read.

Nothing outside the source policy is read: every fetch checks the source against what its
caller may register from now (the registering key's, or for a stored version its registrant's,
see :mod:`.owners`), as the registration route did, and every http(s) redirect the same way.
Local paths must stay inside the adapter roots; ``bentoml://name:version`` reads the BentoML model
store; ``hf://org/name@revision`` downloads from the Hugging Face hub; ``http(s)://`` goes through
:mod:`.http_fetch` (every hop's address checked); any other fsspec URL the policy lists by name
(``s3://bucket/prefix``, ``gs://``...) is copied, its host's addresses checked first when the URL
names one (:data:`HOST_PROTOCOLS`). Remote copies land in the adapter cache under
``<name>/<version>-<hash of the source>``, written to a temporary directory first and renamed, so
a half-download is never served, and a later registration of the same name and version from
another source (after a delete, by another owner) never finds the earlier bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..source_policy import POLICY_NAME, Caller, SourcePolicy, SourceRefused
from .http_fetch import checked_address, download
from .validation import ADAPTER_CONFIG, AdapterInvalid, inside_roots

logger = logging.getLogger(__name__)
HF_SOURCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
ADAPTER_FILES = [ADAPTER_CONFIG, "adapter_model.safetensors", "README.md"]
# fsspec protocols whose URL names a host to connect to; the others name a bucket, container or
# repository served by an endpoint the operator configures (LORASWAP_FSSPEC_STORAGE_OPTIONS).
# A fetch's refusal, kept to the source: the policy's own message lists what the registrant may
# use (another tenant's prefixes, for a name two tenants own), and a broken version's error is
# shown to its owner. The registration route answers the full message first.
OUTSIDE = f"outside {POLICY_NAME} for the key that registered it (its limits as they are now)"
HOST_PROTOCOLS = frozenset({"ftp", "sftp", "ssh", "smb", "webhdfs", "hdfs", "arrow_hdfs", "root"})


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


def _download_http(url: str, tmp: Path, policy: SourcePolicy, caller: Caller) -> None:
    def allowed(hop: str) -> None:
        try:
            policy.check_hop(hop, [], caller)
        except SourceRefused:
            raise AdapterInvalid(f"redirected to {hop!r}, {OUTSIDE}") from None

    base, networks = url.rstrip("/"), policy.networks()
    for name in ADAPTER_FILES:
        got = download(f"{base}/{name}", tmp / name, allowed=allowed, networks=networks,
                       required=False)  # fmt: skip
        if not got and name == ADAPTER_CONFIG:
            raise AdapterInvalid(f"no {ADAPTER_CONFIG} at {url}")


def check_host(url: str, policy: SourcePolicy) -> None:
    """An fsspec URL naming a host (:data:`HOST_PROTOCOLS`) is fetched only if every address
    the host resolves to is public or in ``private_networks``, as an http(s) one. Unlike http(s),
    the connection cannot be pinned to the checked address (fsspec's clients, ftplib, paramiko,
    smbprotocol..., look the name up again), so a name that resolves elsewhere a moment later
    is not stopped: an operator listing such a protocol should list its hosts by address."""
    protocol, _, rest = url.partition("://")
    if protocol not in HOST_PROTOCOLS:
        return
    authority = urlsplit("//" + rest.partition("/")[0])
    try:
        host, port = authority.hostname, authority.port or 0
    except ValueError:
        raise AdapterInvalid(f"{url!r}: bad port") from None
    if not host:
        raise AdapterInvalid(f"{url!r} names no host")
    checked_address(host, port, policy.networks())


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
    caller: Caller | None = None,
) -> Materialized:
    """A local directory holding the adapter of ``source``; raise AdapterInvalid if unusable
    or outside ``policy`` (default: the default policy) for ``caller`` (default: a global
    admin), checked before the cache is looked at."""
    policy, caller = policy or SourcePolicy(), caller or Caller()
    try:
        policy.check_as(source, roots, caller)
    except SourceRefused:
        raise AdapterInvalid(f"source {source!r} is {OUTSIDE}") from None
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

    digest = hashlib.sha256(source.encode()).hexdigest()[:32]  # the exact string, revision kept
    target = cache_dir / name / f"{version}-{digest}"
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
            _download_http(source, tmp, policy, caller)
        else:
            check_host(source, policy)
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
