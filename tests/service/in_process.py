"""The app of `create_app`, served in the test's own process: the real engine, batcher, results budget, routes and
encoders, with a pool of one in-process replica that runs the workers' code (`run_splitting`, `write_results`,
`MappedBatch`: real shared-memory segments) instead of worker processes. Requests go through httpx's ASGI
transport; every results handle the engine gives out is kept (`handles`), so that a test can tell a handle its
route closed from one the garbage collector would have released."""

from __future__ import annotations

import asyncio
import itertools
import os
from contextlib import asynccontextmanager

import httpx

from service.app import create_app
from service.settings import Settings
from service.workers.process import run_splitting
from service.workers.protocol import Batch, BatchDone
from service.workers.wire import MappedBatch, write_results

_segments = itertools.count()


class InProcessReplica:
    index = 0
    # what the prefix router reads of a replica: ready, never restarted, keeping no prefix cache (loaded None)
    state = "ready"
    restarts = 0
    loaded = None

    def __init__(self, runner):
        self.runner = runner

    def submit(self, batch: Batch) -> asyncio.Future:
        outs, retries = run_splitting(self.runner, batch)
        results = write_results(outs, batch.spans, f"logitserve_test_{os.getpid()}_{next(_segments)}")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(MappedBatch(BatchDone(0, results, 0.0, retries)))
        return fut


class InProcessPool:
    """What the engine and the batcher read of `workers.WorkerPool`, for one always-free in-process replica."""

    accepting = all_ready = True
    loaded = None

    def __init__(self, runner):
        self.replica = InProcessReplica(runner)
        self.replicas = [self.replica]

    def pick(self) -> InProcessReplica:
        return self.replica

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reasons(self) -> list[str]:
        return []

    def describe(self) -> list[dict]:
        return []


@asynccontextmanager
async def served(checkpoint, runner, **settings):
    """(app, client, handles): the app for `checkpoint` (a ModelRunner of it in `runner`) with these settings."""
    app = create_app(Settings(model=str(checkpoint), **settings))
    engine = app.state.engine
    handles = []
    score = engine.score

    async def kept(*args, **kwargs):
        handle = await score(*args, **kwargs)
        handles.append(handle)
        return handle

    engine.score = kept
    await engine.start(InProcessPool(runner))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            yield app, client, handles
    finally:
        await engine.shutdown()
