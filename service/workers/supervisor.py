"""Supervision: `replicas` replicas of `tp` spawned processes each, every rank owning its shard of the model.

The front end sends every batch to all ranks of one replica; rank 0 answers (protocol.py, wire.py). One monitor
thread per replica watches the ranks' pipes and process sentinels. A dead rank (or a batch held longer than
`worker_timeout`) fails the batch the replica was running with `WorkerFailed` (503), puts the batch it held
prefetched back at the head of the queue, kills the replica and starts it again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable

from model.runtime.numerics import Numerics

from ..errors import InternalError, NotReady, WorkerFailed
from .process import worker_main
from .protocol import (
    Batch,
    BatchCancelled,
    BatchDone,
    BatchFailed,
    CancelFlags,
    Job,
    RunnerOptions,
    WorkerReady,
)
from .wire import MappedBatch, remove_segments

logger = logging.getLogger("logitserve.workers")

PREFETCH = 2  # batches a replica holds: one running, one waiting in its pipe so a rank never idles between batches


def _stopped() -> NotReady:
    """What a cancelled batch's requests get: nothing when their clients are gone, this when the server stops."""
    return NotReady("the server is shutting down: this request's batch was stopped", retry_after=5)


class Requeue(Exception):
    """The batch never started: put its requests back at the head of the queue."""


@dataclass
class _InFlight:
    batch_id: int
    batch: Batch
    future: asyncio.Future
    sent_at: float = field(default_factory=time.monotonic)


class Replica:
    """One model replica: `tp` ranks. Its monitor thread owns process lifecycle and result delivery."""

    def __init__(self, index: int, pool: WorkerPool):
        self.index = index
        self.pool = pool
        self.state = "loading"  # loading | ready | restarting | failed | stopped
        self.reason = "loading"
        self.pids: list[int] = []
        self.restarts = 0
        self.ever_ready = False
        self.loaded: Numerics | None = None  # as the ranks loaded the model
        self.inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self.inflight_tokens = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._generation = 0
        self._send_q: queue.Queue = queue.Queue()
        # Read by every rank between blocks; one set for the replica's life (batch ids are never reused).
        self._cancel = CancelFlags(mp.get_context("spawn"))
        self._stopping = threading.Event()
        self._procs: list = []
        self._conns: list = []
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"replica-{index}-monitor", daemon=True)
        self._sender = threading.Thread(target=self._sender_loop, name=f"replica-{index}-sender", daemon=True)

    # -- called on the event loop
    @property
    def free_slots(self) -> int:
        return PREFETCH - len(self.inflight) if self.state == "ready" else 0

    def submit(self, batch: Batch) -> asyncio.Future:
        """A future of the batch's MappedBatch (or Requeue, WorkerFailed, InternalError)."""
        loop = self.pool.loop
        fut = loop.create_future()
        with self._lock:
            if self.state != "ready":
                fut.set_exception(Requeue())
                return fut
            batch_id = next(self._ids)
            self.inflight[batch_id] = _InFlight(batch_id, batch, fut)
            self.inflight_tokens += batch.num_tokens
            self._send_q.put((self._generation, Job(batch_id, batch)))
        self.pool.metrics.replica_inflight_batches.labels(str(self.index)).set(len(self.inflight))
        return fut

    def cancel(self, batch: Batch) -> None:
        """Stop `batch` at its next block boundary (or before it starts): nobody waits for it any more. Its future
        then fails with NotReady; a batch already answered is left alone."""
        with self._lock:
            batch_id = next((i for i, item in self.inflight.items() if item.batch is batch), None)
            if batch_id is not None:
                self._cancel.cancel(batch_id)

    # -- threads
    def start(self) -> None:
        self._monitor.start()
        self._sender.start()

    def _sender_loop(self) -> None:
        while True:
            item = self._send_q.get()
            if item is None:
                return
            generation, job = item
            if self._cancel.is_cancelled(job.batch_id):  # cancelled before it was sent: never reaches a rank
                self.pool.metrics.cancelled_batches.inc()
                self._resolve(job.batch_id, exc=_stopped())
                continue
            blob = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)  # once for every rank
            with self._lock:
                if generation != self._generation:
                    continue
                conns = list(self._conns)
            for conn in conns:
                try:
                    conn.send_bytes(blob)
                except (OSError, ValueError):
                    pass  # a dead rank: the monitor sees its sentinel

    def _spawn(self) -> None:
        from model.distributed import find_free_port

        s = self.pool.settings
        ctx = mp.get_context("spawn")
        port = find_free_port()
        procs, conns = [], []
        for rank in range(s.tp):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=worker_main,
                args=(self.index, rank, s.tp, port, self.pool.checkpoint, s.device, RunnerOptions.from_settings(s),
                      self.pool.threads, child, self._cancel, os.getpid()),
                name=f"logitserve-r{self.index}-rank{rank}",
                daemon=True,
            )
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        with self._lock:
            self._procs, self._conns = procs, conns
            self.pids = [p.pid for p in procs]

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)
        for c in self._conns:
            c.close()
        for pid in self.pids:
            remove_segments(pid)

    def _set_state(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        if state == "ready":
            self.ever_ready = True
        self.pool.metrics.replica_ready.labels(str(self.index)).set(1 if state == "ready" else 0)
        self.pool.notify()

    def _resolve(self, batch_id: int, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            item = self.inflight.pop(batch_id, None)
            if item is None:
                return
            self.inflight_tokens -= item.batch.num_tokens
        self.pool.metrics.replica_inflight_batches.labels(str(self.index)).set(len(self.inflight))

        def deliver() -> None:
            if not item.future.done():
                if exc is not None:
                    item.future.set_exception(exc)
                else:
                    item.future.set_result(result)

        self.pool.loop.call_soon_threadsafe(deliver)

    def _receive(self, message, ready: set[int]) -> None:
        if isinstance(message, WorkerReady):
            ready.add(message.rank)
            self.loaded = message.loaded
            if len(ready) == self.pool.settings.tp:
                logger.info("replica %d ready (pids %s, %s, batch invariant: %s)", self.index, self.pids,
                            message.loaded.dtype, message.loaded.batch_invariant)
                self._set_state("ready", "ready")
        elif isinstance(message, BatchDone):
            try:
                result = MappedBatch(message)
            except Exception as exc:  # pragma: no cover
                self._resolve(message.batch_id, exc=WorkerFailed(f"could not read results: {exc}"))
            else:
                self._resolve(message.batch_id, result=result)
        elif isinstance(message, BatchCancelled):
            self.pool.metrics.cancelled_batches.inc()
            self._resolve(message.batch_id, exc=_stopped())
        elif isinstance(message, BatchFailed):
            self._resolve(message.batch_id, exc=InternalError(f"the model failed on this batch: {message.message}"))

    def _monitor_loop(self) -> None:
        s = self.pool.settings
        startup_failures = 0
        while not self._stopping.is_set():
            self._spawn()
            ready: set[int] = set()
            failure = None
            sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
            conns = {c: r for r, c in enumerate(self._conns)}
            while failure is None and not self._stopping.is_set():
                for obj in mp_wait(list(conns) + list(sentinels), timeout=0.5):
                    if obj in sentinels:
                        r = sentinels[obj]
                        failure = f"rank {r} (pid {self._procs[r].pid}) exited with code {self._procs[r].exitcode}"
                        break
                    try:
                        message = obj.recv()
                    except (EOFError, OSError):
                        failure = f"rank {conns[obj]} closed its pipe"
                        break
                    self._receive(message, ready)
                    if self.state == "ready":
                        startup_failures = 0
                if failure is None and self.inflight:
                    oldest = next(iter(self.inflight.values()))
                    if time.monotonic() - oldest.sent_at > s.worker_timeout:
                        failure = f"batch held for more than {s.worker_timeout:g}s (hung rank)"
            if self._stopping.is_set():
                break
            # A rank failed: kill the replica, fail the batch it was running, requeue the one it held prefetched.
            was_ready = self.state == "ready"
            logger.error("replica %d failed: %s; restarting it", self.index, failure)
            with self._lock:
                self._generation += 1
                items = list(self.inflight.values())
            self._set_state("restarting", f"replica {self.index} restarting: {failure}")
            self._kill()
            # Its prefix cache died with it (the router's copy is emptied when it sees `restarts` move).
            self.pool.metrics.prefix_cache_bytes.labels(str(self.index)).set(0)
            for i, item in enumerate(items):
                if i == 0:
                    self._resolve(item.batch_id, exc=WorkerFailed(f"a worker failed while running this batch: {failure}"))
                else:
                    self._resolve(item.batch_id, exc=Requeue())
            self.restarts += 1
            self.pool.metrics.worker_restarts.inc()
            if not was_ready:
                startup_failures += 1
                if startup_failures >= s.max_startup_failures:
                    self._set_state("failed", f"replica {self.index} failed to start {startup_failures} times: {failure}")
                    return
                time.sleep(min(5.0, 0.5 * startup_failures))
        self._shutdown()

    def _shutdown(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill()
        self._set_state("stopped", "stopped")

    def stop(self) -> None:
        self._stopping.set()
        self._send_q.put(None)


class WorkerPool:
    def __init__(self, settings, checkpoint: str, metrics, loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[], None] | None = None):
        self.settings = settings
        self.checkpoint = checkpoint
        self.metrics = metrics
        self.loop = loop
        self._on_change = on_change
        world = settings.replicas * settings.tp
        self.threads = max(1, (os.cpu_count() or 1) // world) if settings.device == "cpu" else 1
        self.replicas = [Replica(i, self) for i in range(settings.replicas)]
        self._announced = False

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def notify(self) -> None:
        """A replica changed state (called from its monitor thread)."""
        if self.all_ready and not self._announced:
            self._announced = True
            logger.info("all %d replica(s) ready: accepting requests", len(self.replicas))
        if self._on_change is not None:
            try:
                self.loop.call_soon_threadsafe(self._on_change)
            except RuntimeError:  # loop closed
                pass

    def pick(self) -> Replica | None:
        """The least-loaded ready replica with a free slot."""
        free = [r for r in self.replicas if r.free_slots > 0]
        if not free:
            return None
        return min(free, key=lambda r: (len(r.inflight), r.inflight_tokens, r.index))

    @property
    def all_ready(self) -> bool:
        return all(r.state == "ready" for r in self.replicas)

    @property
    def accepting(self) -> bool:
        """Requests are queued while some replica is ready, or restarting after it had been ready."""
        return any(r.state == "ready" or (r.ever_ready and r.state == "restarting") for r in self.replicas)

    @property
    def loaded(self) -> Numerics | None:
        """The numerics the workers loaded the model with; None until one replica has."""
        return next((r.loaded for r in self.replicas if r.loaded is not None), None)

    def reasons(self) -> list[str]:
        return [r.reason for r in self.replicas if r.state != "ready"]

    def stop(self, timeout: float = 15.0) -> None:
        for r in self.replicas:
            r.stop()
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            r._monitor.join(timeout=max(0.1, deadline - time.monotonic()))

    def describe(self) -> list[dict]:
        return [{"replica": r.index, "state": r.state, "pids": list(r.pids), "restarts": r.restarts,
                 "inflight_batches": len(r.inflight)} for r in self.replicas]
