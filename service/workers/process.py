"""A worker process: one rank of one replica. It loads its shard, then runs every `Job` it receives; rank 0 writes
the results (wire.py) and answers. Out of memory splits a batch in halves down to single sequences."""

from __future__ import annotations

import itertools
import logging
import os
import time

from .lifeline import die_with_parent
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
from .wire import OutOfMemoryAlone, segment_name, write_results

logger = logging.getLogger("logitserve.workers")

# Fault injection for tests (off by default): a forward over >= N tokens raises torch.OutOfMemoryError.
FAULT_OOM_TOKENS_ENV = "LOGITSERVE_FAULT_OOM_TOKENS"
# Fault injection for tests (off by default): every block of a forward takes this many seconds longer (a long batch).
FAULT_SLOW_BLOCK_ENV = "LOGITSERVE_FAULT_SLOW_BLOCK_S"


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def run_splitting(runner, batch: Batch, fault_oom_tokens: int = 0, should_stop=None) -> tuple[list, int]:
    """Outputs of every sequence of the batch, and how many sub-batches were retried after out-of-memory.

    On out-of-memory the sequences are split in halves and each half is retried, down to single sequences; a
    sequence that runs out of memory alone gets an `OutOfMemoryAlone` in place of its outputs (its request fails
    alone). Every rank of a replica takes the same splits when the error is symmetric (the injected fault, a batch
    too large for every shard); an error on one rank only leaves the replica's collectives out of step, which the
    front end sees as a hung replica (worker_timeout) and restarts.
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
            return list(runner.run(ids, offsets, batch.specs[a:b], should_stop=should_stop))
        except Exception as exc:
            if not _is_oom(exc):
                raise
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        # Out of memory: release what the failed attempt cached, then retry in halves.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if b - a == 1:
            return [OutOfMemoryAlone(f"out of memory on a sequence of {hi - lo} tokens even alone ({message})")]
        retries += 2
        mid = (a + b) // 2
        return forward(a, mid) + forward(mid, b)

    outs = forward(0, len(batch.offsets) - 1)
    return outs, retries


def stop_check(cancel: CancelFlags, batch_id: int, tp: int, device, slow_block_s: float = 0.0):
    """`should_stop` for one batch: whether the front end cancelled it. With tp > 1 the ranks agree (a max over the
    group) so that every rank stops before the same block and the replica's collectives stay in step."""

    def cancelled() -> bool:
        if slow_block_s:
            time.sleep(slow_block_s)
        if tp == 1:
            return cancel.is_cancelled(batch_id)
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(cancel.is_cancelled(batch_id))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return cancelled


def worker_main(replica: int, rank: int, tp: int, port: int, checkpoint: str, device: str,
                options: RunnerOptions, threads: int, conn, cancel: CancelFlags, parent_pid: int) -> None:
    """Load this rank's shard with the numerics `options` resolve to (RunnerOptions.numerics, which /info uses
    too), report them, then run jobs until the pipe closes.

    `cancel`: the replica's cancellation flags, read before a batch and before each of its blocks."""
    die_with_parent(parent_pid)
    import torch

    from model.distributed import destroy, init_process_group
    from model.families.config import ModelConfig
    from model.runtime.runner import ModelRunner

    torch.set_num_threads(threads)
    if device.startswith("cuda") and ":" not in device:
        count = max(1, torch.cuda.device_count())
        device = f"cuda:{(replica * tp + rank) % count}"
    try:
        ctx = init_process_group(rank, tp, master_port=port, device=device)
        numerics = options.numerics(ModelConfig.from_pretrained(checkpoint), ctx.device)
        runner = ModelRunner.load(checkpoint, parallel=ctx, numerics=numerics)
        conn.send(WorkerReady(rank, os.getpid(), runner.numerics))
        serve_jobs(runner, rank, tp, conn, cancel)
    finally:
        destroy()
    conn.close()
    os._exit(0)  # skip interpreter teardown of torch: the front end waits for this exit on shutdown


def serve_jobs(runner, rank: int, tp: int, conn, cancel: CancelFlags) -> None:
    """Run the front end's jobs on `runner` until the pipe closes; rank 0 answers each (done, cancelled, failed)."""
    from model.errors import Cancelled

    counter = itertools.count()
    fault_oom_tokens = int(os.environ.get(FAULT_OOM_TOKENS_ENV) or 0)
    slow_block_s = float(os.environ.get(FAULT_SLOW_BLOCK_ENV) or 0)
    while True:
        try:
            job: Job | None = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        t0 = time.perf_counter()
        shared_before, hits_before = runner.prefix_shared_tokens, runner.prefix_cache_hit_tokens
        should_stop = stop_check(cancel, job.batch_id, tp, runner.parallel.device, slow_block_s)
        try:
            if should_stop():  # its clients left while it waited in the pipe: never computed
                raise Cancelled("cancelled before it started")
            outs, retries = run_splitting(runner, job.batch, fault_oom_tokens, should_stop)
            forward_s = time.perf_counter() - t0
            if rank == 0:
                results = write_results(outs, job.batch.spans, segment_name(os.getpid(), next(counter)))
                conn.send(BatchDone(job.batch_id, results, forward_s, retries,
                                    runner.prefix_shared_tokens - shared_before,
                                    runner.prefix_cache_hit_tokens - hits_before, runner.prefix_cache_bytes))
            del outs
        except Cancelled as exc:
            logger.info("batch %s stopped on rank %d: %s", job.batch_id, rank, exc)
            if rank == 0:
                conn.send(BatchCancelled(job.batch_id))
        except Exception as exc:  # a bug or a device error: report it for this batch
            logger.exception("batch %s failed on rank %d", job.batch_id, rank)
            if rank == 0:
                conn.send(BatchFailed(job.batch_id, f"{type(exc).__name__}: {exc}"))
            if tp > 1:
                raise  # collectives of the replica may be out of step: let the front end restart it
