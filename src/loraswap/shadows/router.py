"""``/admin/comparisons``: how each shadow version answers next to its alias's version."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ..runtime import runtime_of
from ..tenants import current

router = APIRouter(tags=["Adapters"])


@router.get("/admin/comparisons")
async def comparisons(request: Request, adapter: str | None = None) -> dict:
    """Per (adapter, primary version, shadow version): how many sampled requests, how often the
    two answers were identical, mean lengths, median latencies, and the latest differing pairs
    (a tenant's admin sees only its adapters)."""
    shadows = runtime_of(request).pipeline.shadows
    if shadows is None:
        return {"object": "list", "data": []}
    data = await asyncio.to_thread(shadows.store.summaries, current().may_use_adapter, adapter)
    return {"object": "list", "data": data}
