"""`create_app(settings)`: the FastAPI application. Nothing is created at import time.

The served model's description (served.py) is read here; the engine (engine.py: the batcher and the worker pool)
starts and stops with the app's lifespan. The routes (routes/) reach both through typed dependencies (deps.py).
The app is whole however it is hosted: its send timeout (send_timeout.py) is its outermost layer, and errors
become responses in one function (`errors.error_for`), here for what no route answers.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, guards
from .budget import ResultDims
from .engine import Engine
from .errors import ServiceError, error_for
from .metrics import Metrics
from .routes import ROUTERS
from .send_timeout import SendTimeoutGuard
from .served import ServedModel
from .settings import Settings
from .tokenizing import TokenizingPool


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or Settings()
    served = ServedModel.load(settings)
    metrics = metrics or Metrics()
    engine = Engine(settings, served.checkpoint, metrics, ResultDims.of(served.config), task=served.task,
                    config=served.config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    # The API's documents are routes of their own (routes/docs.py): local assets, the document behind the key.
    app = LogitServe(title="logitserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                     openapi_url=None)
    app.state.settings, app.state.served, app.state.metrics, app.state.engine = settings, served, metrics, engine
    app.state.tokenizing = TokenizingPool(settings)
    for router in ROUTERS:
        app.include_router(router)
    guards.install(app, settings)

    # What no route answers (no route, wrong method, a failure outside a route); a route's own errors are made
    # responses by its route class (routes/metered.py), with the same function.
    for exc_class in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, _error_handler)
    return app


async def _error_handler(request, exc: Exception):
    return error_for(request, exc)  # (a coroutine: Starlette would run a plain function in its thread pool)


class LogitServe(FastAPI):
    """The FastAPI app with the send timeout (`LOGITSERVE_SEND_TIMEOUT`) as its outermost layer: the guard reaches
    the connection through the server's own `send`, which the middleware FastAPI puts first would hide."""

    def build_middleware_stack(self):
        state = self.state
        return SendTimeoutGuard(super().build_middleware_stack(), state.settings.send_timeout,
                                state.metrics.send_timeouts)
