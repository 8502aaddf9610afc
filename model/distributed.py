"""The explicit parallel context and the process-group helpers (one process per device, SPMD).

Nothing here reads global state: every sharded layer receives a ``ParallelContext`` and uses its ``group``.
``ParallelContext.single()`` is the trivial context of an unsharded model; its collectives are no-ops.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from model.runtime.invariance import all_reduce_in_rank_order

@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup, None when world_size == 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Sum all-reduces in rank order (batch invariance with 3 or more ranks: model/runtime/invariance.py).
    sum_in_rank_order: bool = False

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        return cls(device=torch.device(device))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # Collectives: no-ops on a single rank.
    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.is_distributed:
            if op == dist.ReduceOp.SUM and self.sum_in_rank_order and self.world_size > 2:
                return all_reduce_in_rank_order(x, self.world_size, self.group)
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def all_gather_uneven(self, x: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, where rank r holds sizes[r] entries (padded for the transfer)."""
        if not self.is_distributed:
            return x
        dim = dim % x.dim()
        longest = max(sizes)
        if x.shape[dim] < longest:
            pad_shape = list(x.shape)
            pad_shape[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def split_evenly(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank's share of n items; the first n % world_size ranks get one more."""
    base, extra = divmod(n, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(
    rank: int,
    world_size: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Join a tp group of `world_size` ranks on one or several hosts; NCCL on CUDA, gloo on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size == 1:
        return ParallelContext(device=device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD, device=device)


def init_from_env(device: str | torch.device = "cpu") -> ParallelContext:
    """Multi-host: torch.distributed's env rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), e.g. torchrun."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    return init_process_group(
        rank, world, master_addr=os.environ["MASTER_ADDR"], master_port=int(os.environ["MASTER_PORT"]), device=device
    )


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, device: str, args: tuple, results) -> None:
    ctx = init_process_group(rank, world_size, master_port=port, device=device)
    try:
        # Plain pickle copies tensor data (torch's fd sharing would die with this process); these bytes only
        # travel between our own processes.
        results.put((rank, pickle.dumps(fn(ctx, *args))))
    finally:
        destroy()


def launch_local(fn: Callable, world_size: int, *args, device: str = "cpu") -> list[Any]:
    """Run fn(ctx, *args) on `world_size` spawned ranks of one host; return each rank's (picklable) result."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_spawn_entry, args=(r, fn, world_size, port, device, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    # Read before joining: a rank blocks on a full pipe until its result is taken. A rank that dies posts
    # nothing, so poll and give up once every process has exited.
    while len(outs) < world_size:
        if results.empty() and all(not p.is_alive() for p in procs):
            break
        if not results.empty():
            rank, blob = results.get()
            outs[rank] = pickle.loads(blob)
        else:
            time.sleep(0.01)
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0 or r not in outs]
    if failed:
        raise RuntimeError(f"ranks {failed} failed")
    return [outs[r] for r in range(world_size)]
