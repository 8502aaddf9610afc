"""Process-group helpers: the multi-host env rendezvous (as torchrun sets it), exercised on one host."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from model.distributed import ParallelContext, find_free_port, split_evenly

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = """
import torch
from model.distributed import init_from_env, destroy
ctx = init_from_env("cpu")
x = torch.tensor([float(ctx.rank + 1)])
ctx.all_reduce(x)
parts = ctx.all_gather_uneven(torch.full((ctx.rank + 1,), float(ctx.rank)), [1, 2], dim=0)
print(f"rank={ctx.rank} world={ctx.world_size} sum={x.item()} gathered={parts.tolist()}")
# Leave the way the service's workers do (service/workers.py): together, destroy the group, then os._exit.
# Interpreter teardown with the store's threads still joinable aborted twice in clean-clone CI runs under load
# ("terminate called without an active exception"), on rank 0 once and rank 1 once, even after the barrier.
import os, sys
torch.distributed.barrier()
destroy()
sys.stdout.flush()
os._exit(0)
"""


def test_env_rendezvous_joins_a_group():
    port = str(find_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for rank, out in enumerate(outs):
        assert f"rank={rank} world=2 sum=3.0 gathered=[0.0, 1.0, 1.0]" in out, out


def test_single_context_collectives_are_no_ops():
    ctx = ParallelContext.single()
    x = torch.ones(3)
    assert ctx.all_reduce(x) is x and not ctx.is_distributed
    assert torch.equal(ctx.all_gather_uneven(x, [3]), x)


def test_split_evenly_gives_the_first_ranks_one_more():
    assert [split_evenly(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert [split_evenly(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
