"""`GET /`: the playground page, and its script and style sheet (`GET /static/...`).

Plain files in `service/static/`, served as they are (no build step, nothing fetched from elsewhere). The page
calls the public API from the browser (`/v1/logits`, `/tokenize`, `/detokenize`, `/v1/models`) with the API key
typed on the page, so these routes need no key themselves and hold no state.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse

from ..errors import NotFound
from .metered import MeteredRoute

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",  # the API document's page (routes/docs.py)
}

router = APIRouter(route_class=MeteredRoute, include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8")


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no static file {name}")
    return FileResponse(STATIC / name, media_type=media_type)
