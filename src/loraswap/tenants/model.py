"""What a tenant is: its keys (hashed), the adapters it owns, base-model access, limits."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from ..source_policy import SourceRefused, check_entry

NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$")
KEY_PREFIX = "lsk-"


def hash_key(key: str) -> str:
    """Keys are 256-bit random tokens: a plain SHA-256 is enough (no dictionary to attack)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_sources(value: list[str] | None) -> list[str] | None:
    """A tenant's ``sources``: each entry one the source policy can read."""
    try:
        return None if value is None else [check_entry(entry) for entry in value]
    except SourceRefused as exc:
        raise ValueError(str(exc)) from None


class ApiKey(BaseModel):
    id: str = Field(description="public id, to revoke a key without showing it")
    sha256: str
    role: Literal["user", "admin"] = "user"
    label: str = ""
    created_at: float = Field(default_factory=time.time)


class Limits(BaseModel):
    """Unset: no tenant-level limit (the server's own limits still apply)."""

    max_concurrent: int | None = Field(None, ge=1, description="requests in flight")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion")
    batch_tokens_per_day: int | None = Field(None, ge=1, description="Batch API lines, UTC day")
    max_pins: int = Field(1, ge=0, description="adapters a tenant admin may pin")


class Tenant(BaseModel):
    name: str
    adapters: list[str] = Field(
        default_factory=list,
        description="adapter names it owns; a trailing `*` owns a prefix (`acme-*`)",
    )
    base_model: bool = Field(True, description="may use the base model")
    sources: list[str] | None = Field(
        None,
        description="where its admin keys may register adapters from (`roots`, a directory, "
        "`s3://bucket/prefix/`, `hf://org`...), within LORASWAP_ADAPTER_SOURCES's `allow`; "
        "unset: the policy's `tenant_default`",
    )
    limits: Limits = Field(default_factory=Limits)
    keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("tenant names are lowercase letters, digits, `-`, `_`, `.`")
        if value in ("admin", "default", "anonymous"):
            raise ValueError(f"{value!r} is reserved")
        return value

    @field_validator("adapters")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            stem = pattern.removesuffix("*")
            if not stem or "*" in stem:
                raise ValueError(f"bad adapter pattern {pattern!r}: a name or a `prefix*`")
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str] | None) -> list[str] | None:
        return check_sources(value)

    def owns(self, adapter: str) -> bool:
        return any(
            adapter.startswith(p[:-1]) if p.endswith("*") else adapter == p for p in self.adapters
        )


class TenantsState(BaseModel):
    revision: int = 0
    tenants: dict[str, Tenant] = Field(default_factory=dict)
