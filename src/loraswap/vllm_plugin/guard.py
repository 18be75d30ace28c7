"""What the plugin package and its patches share: the switch convention, the vLLM version
guard and vLLM's unpatched functions. A module of its own so that a patch needs none of the
package that imports it. Imports neither torch nor vLLM."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

# The package's logger (a child of vLLM's "vllm" logger: see the package).
logger = logging.getLogger(f"vllm.{__package__}")

# The unpatched vLLM functions by name, filled by apply() (kept for tests and for undoing, and
# for a replacement that calls vLLM's own).
ORIGINALS: dict[str, Callable[..., Any]] = {}


# Set by loraswap's engine in its API process, which runs no model: the LoRA ops patches are
# for the processes that do (importing vLLM's LoRA layers here cost 0.7 s of every start).
API_PROCESS: list[bool] = []


def mark_api_process() -> None:
    """This process serves the API only; its engine runs in processes of their own."""
    API_PROCESS[:] = [True]


def patch_name(patch: ModuleType) -> str:
    return patch.__name__.rsplit(".", 1)[-1]


def enabled(env_var: str) -> bool:
    """A patch's switch: on unless set to 0/false/no/off."""
    return os.environ.get(env_var, "1").strip().lower() not in {"0", "false", "no", "off"}


def vllm_version() -> str:
    return str(importlib.import_module("vllm").__version__)


def supported(patch: ModuleType, version: str) -> bool:
    """Whether ``patch`` was written for this vLLM version; one warning if not.

    A local label (``0.32.0+cpu``) names a build of the same release, so it is ignored.
    """
    if version.split("+", 1)[0] in patch.WRITTEN_FOR:
        return True
    logger.warning(
        "loraswap: NOT applying the %s patch: written for vLLM %s, this is vLLM %s (check "
        "it against this version and add the version to %s.WRITTEN_FOR, or set %s=0 to go "
        "without it)",
        patch_name(patch),
        ", ".join(patch.WRITTEN_FOR),
        version,
        patch.__name__,
        patch.ENV_VAR,
    )
    return False
