"""What request handling (the pipeline's admission, shadow runs) needs of the adapter registry.

A protocol, so those callers depend on this small interface instead of the registry, and tests
stand in for it with a few methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .keys import AdapterKey
    from .slots import SlotGate


class AdapterResolver(Protocol):
    def resolve(self, model: str) -> AdapterKey | None: ...

    async def ensure_loaded(self, key: AdapterKey) -> None: ...

    def record_request(self, key: AdapterKey, ok: bool) -> None: ...

    def shadow_of(self, model: str) -> AdapterKey | None: ...

    @property
    def slots(self) -> SlotGate: ...
