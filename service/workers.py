"""The worker pool: `replicas` groups of `tp` spawned processes, each rank owning its shard of the model.

The front end sends every batch to all ranks of one group (small inputs through pipes); rank 0 writes the packed
result tensors into a `multiprocessing.shared_memory` segment and sends back only a small header (names, shapes,
dtypes, offsets). The front end maps the segment, unlinks it at once (the mapping lives as long as the numpy views
over it) and serializes responses straight from it.

One monitor thread per group watches the ranks' pipes and process sentinels. A dead rank (or a batch held longer
than `worker_timeout`) fails the batch the group was running with `WorkerFailed` (503), puts the batch it held
prefetched back at the head of the queue, kills the group and starts it again.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import logging
import mmap
import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable

import numpy as np

from .errors import OutOfMemory, WorkerFailed

logger = logging.getLogger("logitserve.workers")

SHM_PREFIX = "logitserve_"
PREFETCH = 2  # batches a group holds: one running, one waiting in its pipe so a rank never idles between batches
_ALIGN = 64


class Requeue(Exception):
    """The batch never started: put its requests back at the head of the queue."""


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [T]
    offsets: np.ndarray  # int64 [B+1]
    specs: list  # OutputSpec per sequence
    groups: list[tuple[int, int]]  # sequence range of each request

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


# ----------------------------------------------------------------------------------------------- worker side


def _pack_group(outs: list, a: int, b: int) -> list[tuple[str, Any, int]]:
    """(name, list of parts, concat dim) of the tensors of sequences a..b (one request, one spec)."""
    seqs = outs[a:b]
    first = seqs[0]
    items: list[tuple[str, Any, int]] = [("positions", [s.positions for s in seqs], 0)]
    for key in ("logits", "target_logprobs", "top_k_ids", "top_k_logprobs"):
        if getattr(first, key) is not None:
            items.append((key, [getattr(s, key) for s in seqs], 0))
    if first.hidden_states is not None:
        items.append(("hidden_states", [s.hidden_states for s in seqs], 1))
        items.append(("hidden_positions", [s.hidden_positions for s in seqs], 0))
    return items


def _write_results(outs: list, groups: list[tuple[int, int]], rank_pid: int, counter: int) -> dict:
    """Write every result tensor into one new shared-memory segment; return the header."""
    import torch
    from multiprocessing import resource_tracker, shared_memory

    plan = []
    offset = 0
    header_groups = []
    for a, b in groups:
        failed = next((o for o in outs[a:b] if isinstance(o, _OOM)), None)
        if failed is not None:  # this request alone fails; the others of the batch are answered
            header_groups.append({"error": failed.message, "tensors": {}, "rows": [], "hidden_rows": [], "layers": []})
            continue
        tensors = {}
        for name, parts, dim in _pack_group(outs, a, b):
            dtype = torch.float32 if parts[0].is_floating_point() else torch.int64
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            nbytes = int(np.prod(shape)) * (4 if dtype == torch.float32 else 8)
            tensors[name] = (offset, "float32" if dtype == torch.float32 else "int64", tuple(shape))
            plan.append((offset, dtype, shape, parts, dim))
            offset += nbytes + (-nbytes % _ALIGN)
        header_groups.append(
            {
                "tensors": tensors,
                "rows": [len(s.positions) for s in outs[a:b]],
                "hidden_rows": [0 if s.hidden_positions is None else len(s.hidden_positions) for s in outs[a:b]],
                "layers": list(outs[a].layers),
            }
        )
    size = max(offset, 1)
    name = f"{SHM_PREFIX}{rank_pid}_{counter}"
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    # The front end unlinks the segment; this process must not (its resource tracker would at exit).
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    except Exception:  # pragma: no cover
        pass

    def fill() -> None:
        buf = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size)
        for off, dtype, shape, parts, dim in plan:
            n = int(np.prod(shape)) * (4 if dtype == torch.float32 else 8)
            if n == 0:
                continue
            dest = buf[off : off + n].view(dtype).view(shape)
            pos = 0
            for p in parts:
                k = p.shape[dim]
                dest.narrow(dim, pos, k).copy_(p)
                pos += k
        del buf

    fill()
    shm.close()
    return {"shm": name, "nbytes": size, "groups": header_groups}


# Fault injection for tests (off by default): a forward over >= N tokens raises torch.OutOfMemoryError.
FAULT_OOM_TOKENS_ENV = "LOGITSERVE_FAULT_OOM_TOKENS"


@dataclass
class _OOM:
    """Stands for the outputs of a sequence that ran out of memory even alone."""

    message: str


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _run_splitting(runner, batch: Batch, fault_oom_tokens: int = 0) -> tuple[list, int]:
    """Outputs of every sequence of the batch, and how many sub-batches were retried after out-of-memory.

    On out-of-memory the sequences are split in halves and each half is retried, down to single sequences; a
    sequence that runs out of memory alone gets an `_OOM` in place of its outputs (its request fails alone).
    Every rank of a group takes the same splits when the error is symmetric (the injected fault, a batch too large
    for every shard); an error on one rank only leaves the group's collectives out of step, which the front end
    sees as a hung group (worker_timeout) and restarts.
    """
    import torch

    retries = 0

    def forward(a: int, b: int) -> list:
        nonlocal retries
        lo, hi = int(batch.offsets[a]), int(batch.offsets[b])
        ids = torch.from_numpy(batch.input_ids[lo:hi])
        offsets = torch.from_numpy(batch.offsets[a : b + 1] - lo)
        try:
            if fault_oom_tokens and hi - lo >= fault_oom_tokens:
                oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
                raise oom(f"injected out-of-memory: {hi - lo} tokens >= {FAULT_OOM_TOKENS_ENV}={fault_oom_tokens}")
            return list(runner.run(ids, offsets, batch.specs[a:b]))
        except Exception as exc:
            if not _is_oom(exc):
                raise
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        # Out of memory: release what the failed attempt cached, then retry in halves.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if b - a == 1:
            return [_OOM(f"out of memory on a sequence of {hi - lo} tokens even alone ({message})")]
        retries += 2
        mid = (a + b) // 2
        return forward(a, mid) + forward(mid, b)

    outs = forward(0, len(batch.offsets) - 1)
    return outs, retries


def _worker_main(replica: int, rank: int, tp: int, port: int, checkpoint: str, device: str, dtype: str,
                 threads: int, conn) -> None:
    import torch

    from model.distributed import destroy, init_process_group
    from model.runner import ModelRunner

    torch.set_num_threads(threads)
    if device.startswith("cuda") and ":" not in device:
        count = max(1, torch.cuda.device_count())
        device = f"cuda:{(replica * tp + rank) % count}"
    try:
        ctx = init_process_group(rank, tp, master_port=port, device=device)
        runner = ModelRunner.load(checkpoint, device=ctx.device, dtype=dtype, parallel=ctx)
        conn.send(("ready", rank, os.getpid()))
        counter = itertools.count()
        fault_oom_tokens = int(os.environ.get(FAULT_OOM_TOKENS_ENV) or 0)
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg is None:
                break
            batch_id, batch = msg
            t0 = time.perf_counter()
            try:
                outs, retries = _run_splitting(runner, batch, fault_oom_tokens)
                forward_s = time.perf_counter() - t0
                if rank == 0:
                    header = _write_results(outs, batch.groups, os.getpid(), next(counter))
                    header["forward_s"] = forward_s
                    header["oom_retries"] = retries
                    conn.send(("ok", batch_id, header))
                del outs
            except Exception as exc:  # a bug or a device error: report it for this batch
                logger.exception("batch %s failed on rank %d", batch_id, rank)
                if rank == 0:
                    conn.send(("error", batch_id, f"{type(exc).__name__}: {exc}"))
                if tp > 1:
                    raise  # collectives of the group may be out of step: let the front end restart the group
    finally:
        destroy()
    conn.close()
    os._exit(0)  # skip interpreter teardown of torch: the front end waits for this exit on shutdown


# ------------------------------------------------------------------------------------------- front-end side


class BatchResult:
    """A batch's results mapped from shared memory; numpy views keep the mapping alive, nothing to release."""

    def __init__(self, header: dict):
        self.forward_s: float = header.get("forward_s", 0.0)
        self.oom_retries: int = header.get("oom_retries", 0)
        self.groups: list[dict] = header["groups"]
        self._buf = _attach(header["shm"], header["nbytes"])

    def tensors(self, group: int) -> dict[str, np.ndarray]:
        out = {}
        if "error" in self.groups[group]:
            raise OutOfMemory(self.groups[group]["error"])
        for name, (offset, dtype, shape) in self.groups[group]["tensors"].items():
            count = int(np.prod(shape))
            out[name] = np.frombuffer(self._buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        return out


def _attach(name: str, nbytes: int):
    path = f"/dev/shm/{name}"
    if sys.platform.startswith("linux") and os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
            os.unlink(path)
        return buf
    from multiprocessing import shared_memory  # pragma: no cover - non-Linux fallback

    shm = shared_memory.SharedMemory(name=name)
    data = bytes(shm.buf[:nbytes])
    shm.close()
    shm.unlink()
    return data


@dataclass
class _InFlight:
    batch_id: int
    batch: Batch
    future: asyncio.Future
    sent_at: float = field(default_factory=time.monotonic)


class WorkerGroup:
    """One replica: `tp` ranks. Its monitor thread owns process lifecycle and result delivery."""

    def __init__(self, index: int, pool: WorkerPool):
        self.index = index
        self.pool = pool
        self.state = "loading"  # loading | ready | restarting | failed | stopped
        self.reason = "loading"
        self.pids: list[int] = []
        self.restarts = 0
        self.ever_ready = False
        self.inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self.inflight_tokens = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._generation = 0
        self._send_q: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._procs: list = []
        self._conns: list = []
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"group-{index}-monitor", daemon=True)
        self._sender = threading.Thread(target=self._sender_loop, name=f"group-{index}-sender", daemon=True)

    # -- called on the event loop
    @property
    def free_slots(self) -> int:
        return PREFETCH - len(self.inflight) if self.state == "ready" else 0

    def submit(self, batch: Batch) -> asyncio.Future:
        loop = self.pool.loop
        fut = loop.create_future()
        with self._lock:
            if self.state != "ready":
                fut.set_exception(Requeue())
                return fut
            batch_id = next(self._ids)
            self.inflight[batch_id] = _InFlight(batch_id, batch, fut)
            self.inflight_tokens += batch.num_tokens
            self._send_q.put((self._generation, batch_id, batch))
        self.pool.metrics.replica_inflight_batches.labels(str(self.index)).set(len(self.inflight))
        return fut

    # -- threads
    def start(self) -> None:
        self._monitor.start()
        self._sender.start()

    def _sender_loop(self) -> None:
        while True:
            item = self._send_q.get()
            if item is None:
                return
            generation, batch_id, batch = item
            blob = pickle.dumps((batch_id, batch), protocol=pickle.HIGHEST_PROTOCOL)
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
                target=_worker_main,
                args=(self.index, rank, s.tp, port, self.pool.checkpoint, s.device, s.dtype, self.pool.threads, child),
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
        for pid in self.pids:  # segments a dying rank 0 may have left behind
            for path in glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}_*"):
                try:
                    os.unlink(path)
                except OSError:
                    pass

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
                        msg = obj.recv()
                    except (EOFError, OSError):
                        failure = f"rank {conns[obj]} closed its pipe"
                        break
                    kind = msg[0]
                    if kind == "ready":
                        ready.add(msg[1])
                        if len(ready) == s.tp:
                            startup_failures = 0
                            self._set_state("ready", "ready")
                    elif kind == "ok":
                        try:
                            result = BatchResult(msg[2])
                        except Exception as exc:  # pragma: no cover
                            self._resolve(msg[1], exc=WorkerFailed(f"could not read results: {exc}"))
                        else:
                            self._resolve(msg[1], result=result)
                    elif kind == "error":
                        from .errors import InternalError

                        self._resolve(msg[1], exc=InternalError(f"the model failed on this batch: {msg[2]}"))
                if failure is None and self.inflight:
                    oldest = next(iter(self.inflight.values()))
                    if time.monotonic() - oldest.sent_at > s.worker_timeout:
                        failure = f"batch held for more than {s.worker_timeout:g}s (hung rank)"
            if self._stopping.is_set():
                break
            # A rank failed: kill the group, fail the batch it was running, requeue the one it held prefetched.
            was_ready = self.state == "ready"
            logger.error("replica %d failed: %s; restarting it", self.index, failure)
            with self._lock:
                self._generation += 1
                items = list(self.inflight.values())
            self._set_state("restarting", f"replica {self.index} restarting: {failure}")
            self._kill()
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
        self.groups = [WorkerGroup(i, self) for i in range(settings.replicas)]

    def start(self) -> None:
        for g in self.groups:
            g.start()

    def notify(self) -> None:
        if self._on_change is not None:
            try:
                self.loop.call_soon_threadsafe(self._on_change)
            except RuntimeError:  # loop closed
                pass

    def pick(self) -> WorkerGroup | None:
        """The least-loaded ready group with a free slot."""
        free = [g for g in self.groups if g.free_slots > 0]
        if not free:
            return None
        return min(free, key=lambda g: (len(g.inflight), g.inflight_tokens, g.index))

    @property
    def all_ready(self) -> bool:
        return all(g.state == "ready" for g in self.groups)

    @property
    def any_ready(self) -> bool:
        return any(g.state == "ready" for g in self.groups)

    @property
    def accepting(self) -> bool:
        """Requests are queued while some group is ready, or restarting after it had been ready."""
        return any(g.state == "ready" or (g.ever_ready and g.state == "restarting") for g in self.groups)

    @property
    def all_failed(self) -> bool:
        return all(g.state == "failed" for g in self.groups)

    def reasons(self) -> list[str]:
        return [g.reason for g in self.groups if g.state != "ready"]

    def stop(self, timeout: float = 15.0) -> None:
        for g in self.groups:
            g.stop()
        deadline = time.monotonic() + timeout
        for g in self.groups:
            g._monitor.join(timeout=max(0.1, deadline - time.monotonic()))

    def describe(self) -> list[dict]:
        return [{"replica": g.index, "state": g.state, "pids": list(g.pids), "restarts": g.restarts,
                 "inflight_batches": len(g.inflight)} for g in self.groups]
