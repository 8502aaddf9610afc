"""What the routes depend on, as typed FastAPI dependencies: the app's parts, and the checks every route of a
kind needs (API key, readiness, a size-limited JSON body). A route names what it needs in its signature or in
its router's `dependencies`; nothing is checked by hand inside a route."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Annotated, TypeVar

import orjson
from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from .engine import Engine
from .errors import (
    ClientDisconnected,
    InvalidInput,
    PayloadTooLarge,
    SlowRequest,
    Unauthorized,
    UnsupportedMediaType,
    UnsupportedOption,
    format_validation_errors,
)
from .metrics import Metrics
from .served import ServedModel
from .settings import Settings
from .tokenizing import TokenizingPool


def _served(request: Request) -> ServedModel:
    return request.app.state.served


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _tokenizing(request: Request) -> TokenizingPool:
    return request.app.state.tokenizing


ServedDep = Annotated[ServedModel, Depends(_served)]
TokenizingDep = Annotated[TokenizingPool, Depends(_tokenizing)]
EngineDep = Annotated[Engine, Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    key = settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>")


def require_workers(engine: EngineDep) -> None:
    """Workers that take requests (503 while loading, restarting with none left, or draining)."""
    engine.check_accepting()


def require_tokenizer(served: ServedDep):
    if served.tokenizer is None:
        raise UnsupportedOption("this model has no tokenizer.json", param=None)
    return served.tokenizer


TokenizerDep = Annotated[object, Depends(require_tokenizer)]  # tokenizers.Tokenizer
Authorized = Depends(require_api_key)
WorkersAccepting = Depends(require_workers)


JSON = "application/json"


def require_json(request: Request) -> None:
    """Only a body declared as JSON is read as JSON (`application/json`, parameters such as charset allowed): a web
    page can post text/plain, forms and multipart to any server without asking, but not JSON (that needs a CORS
    preflight, which this server grants only to --cors-origins)."""
    declared = request.headers.get("content-type", "")
    if declared.partition(";")[0].strip().lower() != JSON:
        shown = repr(declared[:100]) if declared else "none"
        raise UnsupportedMediaType(f"the body must be JSON sent as Content-Type: {JSON} (got {shown})",
                                   param="content-type")


async def read_body(request: Request, settings: SettingsDep) -> bytes:
    require_json(request)
    limit = settings.max_request_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit} bytes")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise SlowRequest(f"the request body did not arrive within {settings.body_timeout:g}s "
                          f"({total} bytes received)") from None
    except ClientDisconnect:  # gone mid-body: a 499, not a server error
        raise ClientDisconnected() from None
    return b"".join(chunks)


Body = Annotated[bytes, Depends(read_body)]

Model = TypeVar("Model", bound=BaseModel)


def parse_body(cls: type[Model], body: bytes, prepare=None) -> Model:
    """A JSON object body as `cls`, with the contract's 422 messages (sequence indices named); `prepare` (optional)
    rewrites the object before validation (TEI's `parameters`)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput("the body must be a JSON object")
    try:
        return cls.model_validate(prepare(obj) if prepare is not None else obj)
    except ValidationError as exc:
        message, param = format_validation_errors(exc.errors(include_url=False))
        raise InvalidInput(message, param=param) from None


def json_body(cls: type[Model]):
    """`Annotated[cls, ...]` for a route parameter: the size-limited body parsed as `cls` (our parsing, not
    FastAPI's, for the contract's error messages; the route documents the schema with `request_body(cls)`)."""

    async def parsed(body: Body) -> Model:
        return parse_body(cls, body)

    return Annotated[cls, Depends(parsed)]


def request_body(cls: type[BaseModel]) -> dict:
    """`openapi_extra` that documents a JSON request body of `cls`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}}}
