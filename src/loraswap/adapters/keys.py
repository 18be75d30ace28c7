"""The adapter key: one version of one adapter, ``name@version`` on the wire and in vLLM."""

from __future__ import annotations

from typing import NamedTuple


class AdapterKey(NamedTuple):
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> AdapterKey:
        """``name@version`` → key; raises ValueError when there is no version."""
        name, sep, version = text.partition("@")
        if not sep or not name or not version:
            raise ValueError(f"{text!r} is not name@version")
        return cls(name, version)


def split_model(model: str) -> tuple[str, str | None]:
    """An OpenAI ``model`` value → (adapter name, pinned version or None)."""
    name, sep, version = model.partition("@")
    return name, (version if sep else None)
