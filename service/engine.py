"""The engine (TEI's `infer`): what the routes call to have packed sequences scored. It owns the batcher and the
worker pool for the app's lifetime; the routes never see the queue.

`Engine.score` sizes one request's results (refused up front when they alone exceed the results budget), submits
it, then waits for its result, the client's disconnect or the request timeout,
whichever comes first; a request abandoned while queued is dropped from the queue.

Its result is a handle (`Scored`) that the caller owns and closes exactly once: `with await engine.score(...) as
scored:` for a body built in the block, or handed to a streamed response (`Scored.hand_over`,
`responses.BudgetedResponse`) that closes it when its body is sent or abandoned. Closing gives the results' bytes
back to the results budget.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from model.runtime.outputs import OutputSpec
from model.task import Task

from .batcher import Batcher, Work
from .budget import Reservation, ResultBudget, ResultDims, format_bytes, result_bytes
from .errors import ClientDisconnected, NotReady, RequestTimeout, ResponseTooLarge, UnsupportedOption
from .inputs import PackedInputs
from .metrics import Metrics
from .routing import PrefixRouter
from .settings import Settings
from .workers import RequestOutputs
from model.runtime.numerics import Numerics

logger = logging.getLogger("logitserve.engine")


@dataclass(eq=False)
class Scored:
    """One request's outputs and where its time went: a handle on its results, closed exactly once.

    Whoever holds it closes it: the `with` block it was taken in, or the streamed response it was handed over to.
    A handle that is never closed is a bug; the results' mapping has a finalizer that still gives their bytes back
    when the last view of them goes, and logs that it had to (`workers/wire.py`)."""

    outputs: RequestOutputs
    inputs: PackedInputs
    queue_s: float
    inference_s: float
    reservation: Reservation | None = None  # its bytes in the results budget
    closed: bool = field(default=False, init=False)
    _handed_over: bool = field(default=False, init=False, repr=False)

    def close(self) -> bool:
        """The response is fully sent (or abandoned): the results no longer count against the budget. True on the
        first call only; later calls do nothing."""
        if self.closed:
            return False
        self.closed = True
        if self.reservation is not None:
            self.reservation.release()
        return True

    def hand_over(self) -> Scored:
        """Give the handle to a response that closes it once its body is sent or abandoned: the `with` block it
        was taken in no longer closes it, unless that block raises."""
        self._handed_over = True
        return self

    def __enter__(self) -> Scored:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._handed_over:
            self.close()

    @property
    def timing_headers(self) -> dict[str, str]:
        return {"x-queue-time": f"{self.queue_s * 1000:.3f}", "x-inference-time": f"{self.inference_s * 1000:.3f}"}


class Engine:
    def __init__(self, settings: Settings, checkpoint: str, metrics: Metrics, dims: ResultDims,
                 task: Task = Task.CAUSAL_LM, config=None):
        """config: the served model's ModelConfig, which sizes the router's copy of each replica's prefix cache."""
        self.settings = settings
        self.config = config
        self.checkpoint = checkpoint
        self.metrics = metrics
        self.dims = dims
        self.task = task  # what the served head can answer (a classifier: no next-token vocabulary)
        # The batcher's wake-up, set by whatever may let a batch go: the pool's changes, released results.
        self._wake = asyncio.Event()
        self.budget = ResultBudget(settings.max_result_bytes, metrics.result_bytes, on_release=self._wake.set)
        self.draining = False
        self.pool = None
        self.batcher: Batcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------------ lifetime
    async def start(self, pool=None) -> None:
        """Start the batcher and `pool` (the worker processes, `workers.WorkerPool`, unless one is given: tests
        pass an in-process one). The pool tells the batcher of its changes through `wake`."""
        from .workers import WorkerPool

        s = self.settings
        self._loop = asyncio.get_running_loop()
        if pool is None:
            pool = WorkerPool(s, self.checkpoint, self.metrics, asyncio.get_running_loop(), on_change=self._wake.set)
        self.pool = pool
        router = PrefixRouter(self.config, enabled=s.prefix_routing) if self.config is not None else None
        self.batcher = Batcher(self.pool, s.max_batch_tokens, s.effective_max_queue_tokens, self.metrics,
                               self.budget, self._wake, router)
        self.batcher.start()
        self.pool.start()

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work now; what was admitted has `drain_timeout` to finish, then what still runs is
        stopped at its next block (its clients get 503), so that the server exits within seconds of the signal."""
        self.draining = True
        if self._loop is not None and self.batcher is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, self.settings.drain_timeout,
                                            self.batcher.stop_running)

    async def shutdown(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.drain(timeout=self.settings.drain_timeout)
            self.batcher.stop_running()
            await self.batcher.drain(timeout=self.settings.drain_timeout)
            await self.batcher.stop()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.stop)

    # ------------------------------------------------------------------------------------------ readiness
    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if self.pool is None:
            return "loading"
        if self.pool.all_ready:
            return None
        reasons = self.pool.reasons()
        return "; ".join(reasons) if reasons else "loading"

    def check_accepting(self) -> None:
        if self.draining:
            raise NotReady("the server is draining", retry_after=5)
        if self.pool is None or not self.pool.accepting:
            raise NotReady(f"not ready: {self.not_ready_reason()}", retry_after=2)

    @property
    def loaded(self) -> Numerics | None:
        """The numerics the workers loaded the model with, as they reported them; None until one has."""
        return self.pool.loaded if self.pool is not None else None

    def describe_workers(self) -> list[dict]:
        return self.pool.describe() if self.pool is not None else []

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, inputs: PackedInputs, spec: OutputSpec, receive) -> Scored:
        """Outputs of `spec` for every sequence of `inputs`. `receive` is the request's ASGI receive channel,
        watched for the client's disconnect."""
        refused = spec.unsupported_fields(self.task)
        if refused:  # every route's specs pass here: the one refusal, before anything is queued
            raise UnsupportedOption(
                f"{', '.join(refused)}: this server serves a classifier, whose rows are its labels' scores, not a "
                "next-token distribution; these outputs need a causal LM (ask for logits)", param=refused[0])
        nbytes = result_bytes(spec, self.dims, inputs.lengths)
        if nbytes > self.budget.capacity:
            raise ResponseTooLarge(
                f"this request's results take {format_bytes(nbytes)} ({nbytes} bytes) as float32 tensors, more than "
                f"the server may hold for responses being sent (--max-result-bytes {self.budget.capacity}); ask for "
                "fewer rows (return_logits last_token or variable, fewer or shorter sequences) or logits: false with "
                "target_logprobs / top_k, or split the request; the binary format (Accept: application/x-safetensors) "
                "with dtype bfloat16 halves the body sent but not the results held", param="return_logits")
        work = Work(inputs.ids, inputs.lengths, spec, asyncio.get_running_loop().create_future(),
                    result_bytes=nbytes)
        self.batcher.submit(work)
        self.metrics.prompt_tokens.inc(work.num_tokens)
        fut = work.future
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({fut, disconnect}, timeout=self.settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fut.cancel()
            _release_unread(fut)  # its result may have come in just now: nobody will hold a handle on it
            raise
        finally:
            disconnect.cancel()
        if fut.done():
            result = fut.result()
            return Scored(result.outputs, inputs, result.queue_s, result.inference_s, result.reservation)
        fut.cancel()  # dropped from the queue if it is still there
        if disconnect in done:
            raise ClientDisconnected()
        raise RequestTimeout(f"no result within the request timeout of {self.settings.request_timeout:g}s")


def _release_unread(fut: asyncio.Future) -> None:
    if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result().reservation is not None:
        fut.result().reservation.release()


async def _wait_disconnect(receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True
        await asyncio.sleep(0.01)
