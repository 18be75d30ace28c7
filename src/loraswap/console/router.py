"""The operator console: one static page (shipped in the package, no build step) that reads
the admin API with the key entered in the page."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import ApiError

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # the page only talks to this server and runs only its own script
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
}

router = APIRouter(tags=["Console"])


def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"no console asset {name!r}")
    body = files(__package__).joinpath(name).read_bytes()
    return Response(body, media_type=ASSETS[name], headers=HEADERS)


@router.get("/console", include_in_schema=True)
async def console() -> Response:
    """The operator console (HTML)."""
    return asset("index.html")


@router.get("/console/{name}")
async def console_asset(name: str) -> Response:
    return asset(name)
