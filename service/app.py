"""`create_app(settings)`: the FastAPI application. Nothing is created at import time.

The served model's description (served.py) is read here; the engine (engine.py: the batcher and the worker pool)
starts and stops with the app's lifespan. The routes (routes/) reach both through typed dependencies (deps.py).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from . import __version__
from .engine import Engine
from .errors import (
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    ServiceError,
    error_response,
    format_validation_errors,
)
from .metrics import Metrics
from .routes import ROUTERS
from .budget import ResultDims
from .served import ServedModel
from .settings import Settings

logger = logging.getLogger("logitserve.app")


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or Settings()
    served = ServedModel.load(settings)
    metrics = metrics or Metrics()
    engine = Engine(settings, served.checkpoint, metrics, ResultDims.of(served.config), served.config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="logitserve", version=__version__, lifespan=lifespan)
    app.state.settings, app.state.served, app.state.metrics, app.state.engine = settings, served, metrics, engine
    for router in ROUTERS:
        app.include_router(router)

    # Errors outside a route (no route, wrong method) in the contract's error body; a route answers its own
    # (routes/metered.py).
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = format_validation_errors(list(exc.errors()))
        return error_response(InvalidInput(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
        body = orjson.dumps({"error": {"type": "http_error", "message": str(exc.detail), "param": None}})
        return Response(body, status_code=exc.status_code, media_type="application/json")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(InternalError(f"{type(exc).__name__}: {exc}"))

    return app
