"""Request bodies of the adapter management API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoadAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body; ``lora_name`` may pin a version (``name@v2``)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(examples=["uppercase"])
    source: str = Field(
        description="adapters/<dir>, bentoml://tag, hf://org/name@rev, s3://bucket/prefix",
        examples=["adapters/uppercase"],
    )
    version: str | None = Field(None, description="default: v<N+1>")
    promote: bool = Field(True, description="point the alias at this version")
    load: bool = Field(False, description="load into the engine now, not on first request")
    pin: bool = False


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    canary_version: str | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)
