"""Request bodies of the adapter management API."""

from __future__ import annotations

from typing import Literal

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
    shadow_version: str | None = Field(
        None, description="also answers a sample of the alias's requests; stored, not returned"
    )
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of requests shadowed")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    source: Literal["shadow", "canary"] | None = Field(
        None, alias="from", description="default: whichever of the two is set"
    )
