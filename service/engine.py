"""The engine (TEI's `infer`): what the routes call to have packed sequences scored. It owns the batcher and the
worker pool for the app's lifetime; the routes never see the queue.

`Engine.score` sizes one request's results (refused up front when they alone exceed the results budget), submits
it, then waits for its result, the client's disconnect or the request timeout,
whichever comes first; a request abandoned while queued is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from model.runtime.outputs import OutputSpec

from .batcher import Batcher, Work
from .budget import Reservation, ResultBudget, ResultDims, format_bytes, result_bytes
from .errors import ClientDisconnected, NotReady, RequestTimeout, ResponseTooLarge
from .inputs import PackedInputs
from .metrics import Metrics
from .routing import PrefixRouter
from .settings import Settings
from .workers import RequestOutputs
from .workers.protocol import LoadedModel

logger = logging.getLogger("logitserve.engine")


@dataclass
class Scored:
    """One request's outputs and where its time went."""

    outputs: RequestOutputs
    inputs: PackedInputs
    queue_s: float
    inference_s: float
    reservation: Reservation | None = None  # its bytes in the results budget

    def release(self) -> None:
        """The response is fully sent (or abandoned): its results no longer count against the budget."""
        if self.reservation is not None:
            self.reservation.release()

    @property
    def timing_headers(self) -> dict[str, str]:
        return {"x-queue-time": f"{self.queue_s * 1000:.3f}", "x-inference-time": f"{self.inference_s * 1000:.3f}"}


class Engine:
    def __init__(self, settings: Settings, checkpoint: str, metrics: Metrics, dims: ResultDims, config=None):
        """config: the served model's ModelConfig, which sizes the router's copy of each replica's prefix cache."""
        self.settings = settings
        self.config = config
        self.checkpoint = checkpoint
        self.metrics = metrics
        self.dims = dims
        self.budget = ResultBudget(settings.max_result_bytes, metrics.result_bytes)
        self.draining = False
        self.pool = None
        self.batcher: Batcher | None = None

    # ------------------------------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        from .workers import WorkerPool

        s = self.settings
        router = PrefixRouter(self.config, enabled=s.prefix_routing) if self.config is not None else None
        self.batcher = Batcher(None, s.max_batch_tokens, s.effective_max_queue_tokens, self.metrics, self.budget,
                               router)
        self.pool = WorkerPool(s, self.checkpoint, self.metrics, asyncio.get_running_loop(), on_change=self.batcher.wake)
        self.batcher.pool = self.pool
        self.batcher.start()
        self.pool.start()

    async def shutdown(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.drain(timeout=self.settings.request_timeout)
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
    def loaded(self) -> LoadedModel | None:
        """What the workers loaded (dtype, batch invariance, prefix sharing), as they reported it; None until one has."""
        return self.pool.loaded if self.pool is not None else None

    def describe_workers(self) -> list[dict]:
        return self.pool.describe() if self.pool is not None else []

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, inputs: PackedInputs, spec: OutputSpec, receive) -> Scored:
        """Outputs of `spec` for every sequence of `inputs`. `receive` is the request's ASGI receive channel,
        watched for the client's disconnect."""
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


async def _wait_disconnect(receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True
        await asyncio.sleep(0.01)
