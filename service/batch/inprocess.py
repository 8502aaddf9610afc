"""The server without its sockets: `create_app(settings)` started in this process, its lifespan entered, and
requests sent through an ASGI transport. Offline runs get exactly the server's answers (the same routes, batcher,
prefix sharing and cache, workers) without HTTP or a port."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from ..settings import Settings

# A Host the app allows by default (API.md: localhost names); the content type its JSON routes require.
BASE_URL = "http://localhost"
JSON_HEADERS = {"content-type": "application/json"}
SAFETENSORS = "application/x-safetensors"


@dataclass
class Answer:
    """One request's answer: status and body bytes, as the server would send them."""

    status_code: int
    content: bytes
    content_type: str


class InProcessServer:
    """`async with InProcessServer(settings) as server: await server.post(url, body)`.

    Entering starts the engine (worker processes) and waits until every replica is ready; leaving drains and
    stops it."""

    def __init__(self, settings: Settings, ready_timeout: float = 600.0):
        from ..app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.ready_timeout = ready_timeout
        self._lifespan = None
        self._client: httpx.AsyncClient | None = None

    @property
    def served(self):
        return self.app.state.served

    @property
    def engine(self):
        return self.app.state.engine

    async def __aenter__(self) -> "InProcessServer":
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        try:
            await self._wait_ready()
        except BaseException:
            await self._lifespan.__aexit__(None, None, None)
            raise
        headers = dict(JSON_HEADERS)
        if self.settings.api_key:
            headers["authorization"] = f"Bearer {self.settings.api_key}"
        # No timeout of its own: the app's --request-timeout applies, as for any client of the server.
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL,
                                         headers=headers, timeout=None)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.aclose()
        await self._lifespan.__aexit__(*exc)

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while (reason := self.engine.not_ready_reason()) is not None:
            pool = self.engine.pool
            failed = pool is not None and any(r.state == "failed" for r in pool.replicas)
            if failed or loop.time() > deadline:
                raise RuntimeError(f"the model did not become ready: {reason}")
            await asyncio.sleep(0.05)

    async def request(self, method: str, url: str, content: bytes, accept: str = "application/json") -> Answer:
        response = await self._client.request(method, url, content=content, headers={"accept": accept})
        return Answer(response.status_code, response.content, response.headers.get("content-type", ""))

    async def post(self, url: str, content: bytes, accept: str = "application/json") -> Answer:
        return await self.request("POST", url, content, accept)


class BackgroundLoop:
    """An event loop on a thread of its own, so that synchronous callers (a notebook, whose own loop is already
    running; a Ray actor) can run the in-process server's coroutines."""

    def __init__(self):
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="logitserve-offline", daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
