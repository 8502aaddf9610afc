"""`GET /docs` (Swagger UI) and `GET /openapi.json`: the API's document, never from a CDN.

Swagger UI's files come from the installed `swagger-ui-bundle-v2` package (the connexion project's wheel of the
upstream release: no copy of them in this repository to keep up to date). The page and its assets are static, open
like the playground (`GET /`); the document is behind the API key like every other route that describes the
server, and the page sends the key typed on it (or in the playground). ReDoc is not served: no package ships it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from ..deps import Authorized
from ..errors import NotFound
from ..responses import json_response
from .metered import MeteredRoute
from .playground import STATIC

router = APIRouter(route_class=MeteredRoute, include_in_schema=False)

ASSETS = {"swagger-ui.css": "text/css; charset=utf-8", "swagger-ui-bundle.js": "text/javascript; charset=utf-8"}


def swagger_ui_folder():
    from swagger_ui_bundle import swagger_ui_path

    return swagger_ui_path


@router.get("/docs")
async def docs_page() -> FileResponse:
    return FileResponse(STATIC / "docs.html", media_type="text/html; charset=utf-8")


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no docs asset {name}")
    return FileResponse(swagger_ui_folder() / name, media_type=media_type)


@router.get("/openapi.json", dependencies=[Authorized])
async def openapi_document(request: Request) -> Response:
    return json_response(request.app.openapi())
