"""The app that `create_app` returns is whole however it is hosted: its send timeout is its own outermost layer (not
cli.serve's wrapping), every route is metered, the playground's included, and an error reads the same whether a
metered route or the app's exception handlers turned it into a response (one function does both)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter
from starlette.exceptions import HTTPException

from service.app import create_app
from service.errors import ClientDisconnected, InvalidInput, QueueFull, Unauthorized
from service.routes import ROUTERS
from service.routes.metered import MeteredRoute
from service.settings import Settings


class _Transport:
    aborted = 0

    def abort(self):
        self.aborted += 1


class _Connection:
    """uvicorn's request cycle as the app sees it: a `send` bound to an object holding the transport; a body send
    never completes (a client that stopped reading)."""

    def __init__(self):
        self.transport = _Transport()
        self.started = []

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.started.append(message["status"])
        elif message.get("body"):
            await asyncio.Event().wait()


def _scope(method: str, path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


def test_an_app_hosted_directly_has_the_send_timeout(tiny_checkpoint):
    app = create_app(Settings(model=str(tiny_checkpoint), send_timeout=0.3))
    connection = _Connection()

    async def receive():
        await asyncio.Event().wait()

    async def main():
        await asyncio.wait_for(app(_scope("GET", "/health"), receive, connection.send), timeout=10)

    asyncio.run(main())
    assert connection.started == [200] and connection.transport.aborted == 1
    assert app.state.metrics.send_timeouts._value.get() == 1


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    return create_app(Settings(model=str(tiny_checkpoint)))


def _get(app, method: str, path: str) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.request(method, path)

    return asyncio.run(main())


def test_every_route_is_metered_the_playground_included(app):
    routes = [route for router in ROUTERS for route in router.routes]
    assert {"/", "/static/{name}", "/v1/logits", "/health"} <= {r.path for r in routes}
    assert all(isinstance(r, MeteredRoute) for r in routes), [r.path for r in routes if not isinstance(r, MeteredRoute)]
    assert _get(app, "GET", "/").status_code == 200
    assert _get(app, "GET", "/static/nothing.js").status_code == 404
    requests = app.state.metrics.requests
    assert requests.labels("/", "200")._value.get() == 1
    assert requests.labels("/static/{name}", "404")._value.get() == 1


ERRORS = {
    "invalid input": InvalidInput("bad ids", param="input_ids"),
    "queue full": QueueFull("the queue is full", retry_after=3),
    "unauthorized": Unauthorized("no key"),
    "http exception": HTTPException(418, "a teapot"),
    "client gone": ClientDisconnected(),
    "a bug": RuntimeError("boom"),
}


@pytest.mark.parametrize("error", ERRORS)
def test_an_error_reads_the_same_from_a_metered_route_and_from_the_app(error, tiny_checkpoint):
    app = create_app(Settings(model=str(tiny_checkpoint)))

    async def fail():
        raise ERRORS[error]

    metered = APIRouter(route_class=MeteredRoute)
    metered.add_api_route("/fails", fail, methods=["POST"])
    app.include_router(metered)
    app.add_api_route("/fails", fail, methods=["PUT"])  # a plain route: the app's exception handlers answer
    from_route, from_app = _get(app, "POST", "/fails"), _get(app, "PUT", "/fails")
    assert from_route.status_code == from_app.status_code != 200
    assert from_route.content == from_app.content
    for header in ("content-type", "retry-after", "www-authenticate"):
        assert from_route.headers.get(header) == from_app.headers.get(header)
