"""The batcher (TEI style): one asyncio task owns the queue and packs requests into batches.

Requests carry futures. Admission (`submit`) only appends to the queue and wakes the owner; the owner task alone
takes work out of it, by the packing rule (`packing.take_batch`: the oldest request first, then those sharing a
prefix with the batch, whole requests up to the token budget and the result-bytes share of a batch), holding
requests back while the results budget (`budget.ResultBudget`) is spent, and sends a batch to the least-loaded
replica as soon as one has a free slot: every replica holds one running and one prefetched batch, so a worker
never idles while work is queued, and nothing waits for a batch to fill.

The owner sleeps on one event (`wake`) that everything which may let a batch go sets: a submission, a replica's
free slot or state change (the pool's `on_change`), results released (the budget's `on_release`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from model.runtime.outputs import OutputSpec

from .budget import Reservation, ResultBudget
from .errors import InternalError, NotReady, OutOfMemory, QueueFull, ServiceError
from .packing import BatchLimits, prefix_keys, row_offsets, take_batch
from .routing import PrefixRouter, Route
from .workers import Batch, MappedBatch, Replica, RequestOutputs, RequestSpan, Requeue, WorkerPool

logger = logging.getLogger("logitserve.batcher")


@dataclass(eq=False)
class Work:
    """One request: its sequences packed, one OutputSpec shared by all of them."""

    input_ids: np.ndarray  # int64 [T], all sequences of the request packed
    lengths: list[int]
    spec: OutputSpec
    future: asyncio.Future  # of a WorkResult
    enqueued_at: float = field(default_factory=time.perf_counter)
    dispatched_at: float = 0.0
    queued: bool = False
    result_bytes: int = 0  # what its results take (budget.result_bytes), reserved at dispatch
    reservation: Reservation | None = None
    dispatch: Dispatch | None = None  # the batch it was sent in, while that runs

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @functools.cached_property
    def prefix_keys(self) -> frozenset[bytes]:
        return prefix_keys(self.input_ids, self.lengths)


@dataclass(eq=False)
class Dispatch:
    """A batch sent to a replica, and its requests."""

    replica: Replica
    batch: Batch
    works: list[Work]
    route: Route | None = None  # the router's account of it (routing.py)

    def cancel_if_abandoned(self) -> None:
        """Every request of the batch is answered or abandoned (client gone, timed out): stop computing it."""
        if all(w.future.done() for w in self.works):
            self.replica.cancel(self.batch)


@dataclass
class WorkResult:
    outputs: RequestOutputs
    queue_s: float
    inference_s: float
    reservation: Reservation | None = None


def _release(work: Work) -> None:
    if work.reservation is not None:
        work.reservation.release()
        work.reservation = None


class Batcher:
    """`wake` is the event the pool's `on_change` and the budget's `on_release` set (built with them, before
    either); without a budget, results are not bounded."""

    def __init__(self, pool: WorkerPool, max_batch_tokens: int, max_queue_tokens: int, metrics,
                 budget: ResultBudget | None = None, wake: asyncio.Event | None = None,
                 router: PrefixRouter | None = None):
        self.pool = pool
        self.router = router  # None: every batch goes to the least busy free replica
        self._wake = wake if wake is not None else asyncio.Event()
        self.budget = budget if budget is not None else ResultBudget(1 << 62, metrics.result_bytes, self.wake)
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.queued_tokens = 0
        self._queue: deque[Work] = deque()
        self._task: asyncio.Task | None = None
        self._dispatches: set[asyncio.Task] = set()
        self._running: set[Dispatch] = set()  # batches sent and not answered yet
        self._closed = False

    # ---------------------------------------------------------------- admission (called by request handlers)
    def submit(self, work: Work) -> None:
        if self._closed:
            raise NotReady("the server is draining", retry_after=5)
        n = work.num_tokens
        if n > self.max_queue_tokens:  # would never be admitted, even by an empty queue: refused, not run
            from .tokenizing import queue_limit_error

            raise queue_limit_error(n, self.max_queue_tokens)
        if self.queued_tokens and self.queued_tokens + n > self.max_queue_tokens:
            raise QueueFull(
                f"the queue holds {self.queued_tokens} tokens; this request's {n} would pass the limit of "
                f"{self.max_queue_tokens}", retry_after=1)
        work.queued = True
        self._add_tokens(n)
        self._queue.append(work)
        work.future.add_done_callback(lambda _f, w=work: self._on_done(w))
        self._wake.set()

    def _on_done(self, work: Work) -> None:
        # Cancelled (timeout, disconnect) while queued: its tokens stop counting now; the owner drops it later.
        if work.queued:
            work.queued = False
            self._add_tokens(-work.num_tokens)
        elif work.dispatch is not None:  # while its batch runs: the batch stops once none of its requests waits
            work.dispatch.cancel_if_abandoned()

    def _add_tokens(self, n: int) -> None:
        self.queued_tokens += n
        self.metrics.queue_tokens.set(self.queued_tokens)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------------------------- the owner task
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                replica = self.pool.pick()
                if replica is None:
                    break
                works = self._take()
                if not works:
                    break
                if self.router is not None and self.router.active(self.pool):
                    # The replica caching the oldest request's prefixes, unless it is clearly busier or full.
                    placed = self.router.place(self.pool, [(0, works[0])])
                    replica = placed[1] if placed is not None else replica
                # Submitted here, synchronously, so that the replica's slots are taken before the next pick.
                batch, fut = self._send(replica, works)
                dispatch = Dispatch(replica, batch, works)
                dispatch.route = self.router.dispatched(replica, batch) if self.router is not None else None
                for w in works:
                    w.dispatch = dispatch
                self._running.add(dispatch)
                task = asyncio.get_running_loop().create_task(self._complete(dispatch, fut))
                self._dispatches.add(task)
                task.add_done_callback(self._dispatches.discard)
                # Not held here until the next dispatch: the future's results pin its requests' shared memory.
                del batch, fut, task, works, dispatch

    def _take(self) -> list[Work]:
        """The next batch by the packing rule, its results' bytes reserved; empty while the head of the queue waits
        for the results budget (the budget's release wakes the owner)."""
        limits = BatchLimits(self.max_batch_tokens, self.budget.batch_limit, self.budget.free)
        works = take_batch(self._queue, limits, live=lambda w: not w.future.done())
        for w in works:
            w.reservation = self.budget.reserve(w.result_bytes)
            w.queued = False
            self._add_tokens(-w.num_tokens)
        return works

    def _send(self, replica: Replica, works: list[Work]):
        now = time.perf_counter()
        ids = np.concatenate([w.input_ids for w in works]) if len(works) > 1 else works[0].input_ids
        lengths = [n for w in works for n in w.lengths]
        specs, spans = [], []
        for w in works:
            spans.append(RequestSpan(len(specs), len(specs) + len(w.lengths)))
            specs.extend([w.spec] * len(w.lengths))
            w.dispatched_at = now
            self.metrics.queue_duration.observe(now - w.enqueued_at)
        batch = Batch(ids, row_offsets(lengths), specs, spans)
        self.metrics.batch_tokens.observe(batch.num_tokens)
        self.metrics.batch_sequences.observe(len(lengths))
        return batch, replica.submit(batch)

    async def _complete(self, dispatch: Dispatch, fut) -> None:
        replica, works, batch = dispatch.replica, dispatch.works, dispatch.batch
        label = str(replica.index)
        try:
            result: MappedBatch = await fut
        except Requeue:
            for w in works:
                _release(w)
            for w in reversed(works):
                if not w.future.done():
                    w.queued = True
                    self._add_tokens(w.num_tokens)
                    self._queue.appendleft(w)
        except ServiceError as exc:
            for w in works:
                _release(w)
                if not w.future.done():
                    w.future.set_exception(exc)
        except Exception as exc:  # pragma: no cover - a bug
            logger.exception("dispatch failed")
            for w in works:
                _release(w)
                if not w.future.done():
                    w.future.set_exception(InternalError(f"{type(exc).__name__}: {exc}"))
        else:
            done = result.done
            self.metrics.inference_duration.observe(done.forward_s)
            if done.oom_retries:
                self.metrics.oom_retries.inc(done.oom_retries)
            if done.prefix_shared_tokens:
                self.metrics.prefix_shared_tokens.inc(done.prefix_shared_tokens)
            if done.prefix_cache_hit_tokens:
                self.metrics.prefix_cache_hit_tokens.inc(done.prefix_cache_hit_tokens)
            route = dispatch.route
            if route is None or route.restarts == replica.restarts:  # not a batch of the replica before it restarted
                self.metrics.prefix_cache_bytes.labels(label).set(done.prefix_cache_bytes)
            self.metrics.replica_batches.labels(label).inc()
            self.metrics.replica_batch_tokens.labels(label).inc(batch.num_tokens)
            self.metrics.replica_busy_seconds.labels(label).inc(done.forward_s)
            for i, w in enumerate(works):
                error = done.results[i].error
                if w.future.done() or error is not None:
                    _release(w)  # its client is gone or it timed out: its results are dropped now
                    if error is not None and not w.future.done():  # out of memory even alone: it fails alone
                        w.future.set_exception(OutOfMemory(error))
                else:
                    queue_s = w.dispatched_at - w.enqueued_at
                    # The reservation now belongs to the response, which releases it once fully sent (and the
                    # mapping releases it when its last view goes, whatever happens to the response).
                    outputs = result.outputs(i, w.reservation)
                    w.future.set_result(WorkResult(outputs, queue_s, done.forward_s, w.reservation))
        finally:
            if dispatch.route is not None:
                self.router.answered(dispatch.route)
            self._running.discard(dispatch)
            for w in works:
                w.dispatch = None
            self._wake.set()

    # ------------------------------------------------------------------------------------------ lifetime
    @property
    def busy(self) -> bool:
        return bool(self._dispatches) or any(not w.future.done() for w in self._queue)

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new work and wait until everything admitted has been answered."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)

    def stop_running(self) -> None:
        """Shutdown past its grace: every batch still running stops at its next block, and every request still
        queued or running is answered 503."""
        self._closed = True
        for dispatch in list(self._running):
            dispatch.replica.cancel(dispatch.batch)
        for w in self._queue:
            if not w.future.done():
                w.future.set_exception(NotReady("the server is shutting down", retry_after=5))

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for w in self._queue:
            if not w.future.done():
                w.future.set_exception(NotReady("the server stopped"))
