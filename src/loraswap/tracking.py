"""Record built Bentos in an MLflow model registry (local SQLite by default) and list them.

Each ``make build`` becomes a version of the registered model ``loraswap`` whose tags say which
Bento, base model, adapters and vLLM it carries, so "what is deployed" has one answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

REGISTERED_MODEL = "loraswap"
EXPERIMENT = "loraswap-builds"


def bento_facts(bento_tag: str) -> dict[str, Any]:
    """Labels, base model and adapter versions of a built Bento, read from the Bento store."""
    import bentoml

    bento = bentoml.get(bento_tag)
    info = bento.info
    adapters = {}
    for config in sorted(Path(bento.path_of("src/adapters")).glob("*/adapter_config.json")):
        weights = config.parent / "adapter_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes() if weights.exists() else b"").hexdigest()
        adapters[config.parent.name] = digest[:16]
    models = [str(m.tag) for svc in info.services for m in svc.models] or [
        str(m.tag) for m in info.models
    ]
    return {
        "bento": str(bento.tag),
        "labels": dict(info.labels),
        "base_models": models,
        "adapters": adapters,
    }


def record_build(bento_tag: str, tracking_uri: str) -> str:
    """Log the Bento as a new version of the ``loraswap`` registered model; return its number."""
    import mlflow
    from mlflow.tracking import MlflowClient

    facts = bento_facts(bento_tag)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{REGISTERED_MODEL}'"):
        client.create_registered_model(REGISTERED_MODEL, description="loraswap Bentos")
    tags = {
        "bento": facts["bento"],
        "base_model": ",".join(facts["base_models"]),
        "adapters": json.dumps(facts["adapters"], sort_keys=True),
        **{f"label.{k}": str(v) for k, v in facts["labels"].items()},
    }
    with mlflow.start_run(run_name=facts["bento"]) as run:
        mlflow.log_params({k: v[:500] for k, v in tags.items()})
    version = client.create_model_version(
        REGISTERED_MODEL, source=f"bento://{facts['bento']}", run_id=run.info.run_id, tags=tags
    )
    return str(version.version)


def list_builds(tracking_uri: str) -> list[dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{REGISTERED_MODEL}'"):
        return []
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    return [
        {"version": str(v.version), **v.tags}
        for v in sorted(versions, key=lambda v: int(v.version))
    ]
