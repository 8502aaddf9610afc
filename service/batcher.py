"""The batcher (TEI style): one asyncio task owns the queue and packs requests into batches by a token budget.

Requests carry futures. Admission (`submit`) only appends to the queue and wakes the owner; the owner task alone
takes work out of it: it skips requests whose future is already done (timed out, client gone), packs whole
requests by the token budget and the result-bytes share of a batch (`packing.fits`), holds requests back while
the results budget (`budget.ResultBudget`) is spent, and sends a batch to the least-loaded replica as soon as one has a
free slot: every replica holds one running and one prefetched batch, so a worker never idles while work is
queued, and nothing waits for a batch to fill. With several replicas keeping prefix caches, the router
(routing.py) places the requests instead: a batch goes to the replica that caches its first request's prefixes
unless that one is clearly busier, and takes only the requests that replica suits; a request whose replica has no
free slot waits for it while later ones go elsewhere.

Batches are grouped by shared prefix (the workers compute a prefix shared within a batch once): after the oldest
request, a batch takes first the queued requests, among the next ``SHARING_LOOKAHEAD``, whose sequences start with
the same ``SHARING_KEY_TOKENS`` tokens as one already taken, then the rest in arrival order. Every batch starts with
the oldest request, so a request waits at most one batch per request queued before it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from model.runtime.outputs import OutputSpec

from .budget import Reservation, ResultBudget
from .errors import InternalError, NotReady, OutOfMemory, QueueFull, ServiceError
from .packing import fits, row_offsets
from .routing import PrefixRouter, Route
from .workers import Batch, MappedBatch, Replica, RequestOutputs, RequestSpan, Requeue, WorkerPool

logger = logging.getLogger("logitserve.batcher")

# Leading tokens that mark two sequences as sharing a prefix worth grouping (a context's continuations, few-shot
# prompts); shorter sequences are packed in arrival order.
SHARING_KEY_TOKENS = 16
# Queued requests searched for ones that share a prefix with the batch being formed.
SHARING_LOOKAHEAD = 256
# Queued requests the router places (each costs a walk of the replicas' shadow trees along its sequences).
ROUTING_LOOKAHEAD = 16


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

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @functools.cached_property
    def prefix_keys(self) -> frozenset[bytes]:
        """The first SHARING_KEY_TOKENS tokens of each of its sequences that has as many."""
        keys, start = set(), 0
        for n in self.lengths:
            if n >= SHARING_KEY_TOKENS:
                keys.add(self.input_ids[start : start + SHARING_KEY_TOKENS].tobytes())
            start += n
        return frozenset(keys)


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
    def __init__(self, pool: WorkerPool | None, max_batch_tokens: int, max_queue_tokens: int, metrics,
                 budget: ResultBudget | None = None, router: PrefixRouter | None = None):
        self.pool = pool
        self.router = router  # None: every batch goes to the least busy free replica
        self.budget = budget if budget is not None else ResultBudget(1 << 62, metrics.result_bytes)
        self.budget._on_release = self.wake  # noqa: SLF001
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.queued_tokens = 0
        self._queue: deque[Work] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._dispatches: set[asyncio.Task] = set()
        self._closed = False

    # ---------------------------------------------------------------- admission (called by request handlers)
    def submit(self, work: Work) -> None:
        if self._closed:
            raise NotReady("the server is draining", retry_after=5)
        n = work.num_tokens
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
                first, joins = 0, None
                if self.router is not None and self.router.active(self.pool):
                    placed = self.router.place(self.pool, self._in_view(ROUTING_LOOKAHEAD))
                    if placed is None:
                        break  # each request in view waits for the replica caching its prefix (woken by answers)
                    first, replica = placed
                    joins = self.router.joiner(self.pool, replica, self._queue[first])
                works = self._take(first, joins)
                if not works:
                    break
                # Submitted here, synchronously, so that the replica's slots are taken before the next pick.
                batch = self._batch(works)
                fut = self._send(replica, works, batch)
                route = self.router.dispatched(replica, batch) if self.router is not None else None
                task = asyncio.get_running_loop().create_task(self._complete(replica, works, batch, fut, route))
                self._dispatches.add(task)
                task.add_done_callback(self._dispatches.discard)
                # Not held here until the next dispatch: the future's results pin its requests' shared memory.
                del batch, fut, task, works, route

    def _in_view(self, n: int) -> list[tuple[int, Work]]:
        """The first `n` queued requests still waiting, with their queue indices."""
        return [(i, w) for i, w in enumerate(itertools.islice(self._queue, n)) if not w.future.done()]

    def _take(self, first: int = 0, joins: Callable[[Work], bool] | None = None) -> list[Work]:
        """The next batch: the oldest request, then those sharing a prefix with the batch (``_joining``), then the
        rest in arrival order; empty while the head of the queue waits for the results budget (a request never
        overtakes an older one that is held back, so a large one is not starved).

        With the router (several replicas caching prefixes) the batch starts with the queued request at `first`
        (the one it placed) and the rest joins only where `joins` says this replica suits it: the others wait for
        the replica that caches their prefixes."""
        works: list[Work] = []
        keys: set[bytes] = set()
        tokens = nbytes = 0
        while self._queue:
            w = self._queue[0]
            if w.future.done():
                self._queue.popleft()
                first = max(0, first - 1)
                continue
            if not self.budget.fits(w.result_bytes):
                break  # held back until responses being sent release their bytes (budget wakes us)
            if not works:
                pick = first
                if not self.budget.fits(self._queue[first].result_bytes):
                    break
            else:
                pick = self._joining(lambda q: not keys.isdisjoint(q.prefix_keys), tokens, nbytes) if keys else None
                if pick is None and joins is not None:
                    pick = self._joining(joins, tokens, nbytes, ROUTING_LOOKAHEAD)
                    if pick is None:
                        break
            if pick is None:
                if not fits(tokens, w.num_tokens, self.max_batch_tokens, nbytes, w.result_bytes,
                            self.budget.batch_limit):
                    break
                pick = 0
            w = self._queue[pick]
            del self._queue[pick]
            works.append(w)
            keys |= w.prefix_keys
            tokens += w.num_tokens
            nbytes += w.result_bytes
            w.reservation = self.budget.reserve(w.result_bytes)
            w.queued = False
            self._add_tokens(-w.num_tokens)
        return works

    def _joining(self, joins: Callable[[Work], bool], tokens: int, nbytes: int,
                 lookahead: int = SHARING_LOOKAHEAD) -> int | None:
        """Queue index of the first request among the next `lookahead` that `joins` the batch and fits within its
        budgets; None if there is none."""
        for i, w in enumerate(itertools.islice(self._queue, lookahead)):
            if (not w.future.done()
                    and fits(tokens, w.num_tokens, self.max_batch_tokens, nbytes, w.result_bytes,
                             self.budget.batch_limit)
                    and self.budget.fits(w.result_bytes) and joins(w)):  # last: the router counts what joins
                return i
        return None

    @staticmethod
    def _batch(works: list[Work]) -> Batch:
        ids = np.concatenate([w.input_ids for w in works]) if len(works) > 1 else works[0].input_ids
        lengths = [n for w in works for n in w.lengths]
        specs, spans = [], []
        for w in works:
            spans.append(RequestSpan(len(specs), len(specs) + len(w.lengths)))
            specs.extend([w.spec] * len(w.lengths))
        return Batch(ids, row_offsets(lengths), specs, spans)

    def _send(self, replica: Replica, works: list[Work], batch: Batch):
        now = time.perf_counter()
        for w in works:
            w.dispatched_at = now
            self.metrics.queue_duration.observe(now - w.enqueued_at)
        self.metrics.batch_tokens.observe(batch.num_tokens)
        self.metrics.batch_sequences.observe(len(batch.specs))
        return replica.submit(batch)

    async def _complete(self, replica: Replica, works: list[Work], batch: Batch, fut, route: Route | None) -> None:
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
            if route is not None:
                self.router.answered(route)
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
