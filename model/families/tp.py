"""Tensor parallelism as a plan applied to the plain model: which heads each rank holds, and the sharded layers.

The plan (torchtitan style; each architecture's is in model/families/architectures.py) names each sharded module by a path
pattern and gives its style. ``shard_model`` swaps the plain ``nn.Linear`` / ``nn.Embedding`` for sharded layers
allocated at shard size (on the meta device, so nothing is allocated twice); model/families/loader.py then fills them from
this rank's slices of the checkpoint. At tp=1 the same path runs with one shard. Shard sizes follow the plain
modules' shapes, so a style serves every module of its kind (an MoE family's experts too).

Query heads are split evenly (tp must divide n_heads). A rank takes the kv heads its query heads use; when
tp exceeds the kv heads, kv heads are replicated on the ranks that share them (MAX cannot do this).
Intermediate and vocabulary sizes that tp does not divide are split unevenly: the first ranks get one more.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn

from model.families.config import ModelConfig
from model.distributed import ParallelContext, split_evenly
from model.layers.base import ColumnParallelLinear, Part, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead


class HeadLayout:
    """Which query and kv heads rank `rank` of `world` holds."""

    def __init__(self, config: ModelConfig, rank: int, world: int, device: torch.device | str = "cpu") -> None:
        if config.num_heads % world:
            raise ValueError(f"tp={world} must divide the number of attention heads ({config.num_heads})")
        self.head_dim, self.num_heads, self.num_kv_heads = config.head_dim, config.num_heads, config.num_kv_heads
        self.q_per_rank = config.num_heads // world
        group = config.num_heads // config.num_kv_heads  # query heads per kv head
        self.q_start = rank * self.q_per_rank
        self.kv_start = self.q_start // group
        kv_end = (self.q_start + self.q_per_rank - 1) // group + 1
        self.kv_count = kv_end - self.kv_start
        # Local kv head used by each local query head.
        mapping = [(self.q_start + i) // group - self.kv_start for i in range(self.q_per_rank)]
        uniform = self.q_per_rank % self.kv_count == 0 and mapping == [
            i // (self.q_per_rank // self.kv_count) for i in range(self.q_per_rank)
        ]
        self.kv_head_index = None if uniform else torch.tensor(mapping, device=device)


def _sharded(style: str, module: nn.Module, ctx: ParallelContext, heads: HeadLayout) -> nn.Module:
    """The sharded layer of `style` that replaces the plain `module` on rank ctx.rank."""
    rows, cols = module.weight.shape
    bias = getattr(module, "bias", None) is not None
    if style == "vocab_embedding":  # nn.Embedding(vocab, hidden)
        start, size = split_evenly(rows, ctx.world_size, ctx.rank)
        return VocabParallelEmbedding(Part(rows, start, size), cols, ctx)
    if style == "vocab_lm_head":  # nn.Linear(hidden, vocab)
        start, size = split_evenly(rows, ctx.world_size, ctx.rank)
        return VocabParallelLMHead(Part(rows, start, size), cols, ctx)
    d = heads.head_dim
    if style == "colwise_qkv":  # nn.Linear(hidden, (Hq + 2 Hkv) * d): this rank's q heads and the kv heads they use
        q = Part(heads.num_heads * d, heads.q_start * d, heads.q_per_rank * d)
        kv = Part(heads.num_kv_heads * d, heads.kv_start * d, heads.kv_count * d)
        return ColumnParallelLinear(cols, [q, kv, kv], bias=bias)
    if style == "rowwise_heads":  # nn.Linear(Hq * d, hidden)
        return RowParallelLinear(Part(cols, heads.q_start * d, heads.q_per_rank * d), rows, bias=bias, parallel=ctx)
    if style == "colwise_gate_up":  # nn.Linear(hidden, 2 * intermediate): each half split alike
        start, size = split_evenly(rows // 2, ctx.world_size, ctx.rank)
        return ColumnParallelLinear(cols, [Part(rows // 2, start, size)] * 2, bias=bias)
    if style == "rowwise_intermediate":  # nn.Linear(intermediate, hidden)
        start, size = split_evenly(cols, ctx.world_size, ctx.rank)
        return RowParallelLinear(Part(cols, start, size), rows, bias=bias, parallel=ctx)
    raise ValueError(f"unknown tp style {style!r}")


def shard_model(model: nn.Module, config: ModelConfig, plan: Mapping[str, str]) -> nn.Module:
    """Apply `plan` to the plain model for model.parallel's rank (also at tp=1: one shard, same loading)."""
    ctx = model.parallel
    heads = HeadLayout(config, ctx.rank, ctx.world_size)
    for name, module in list(model.named_modules()):
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _sharded(style, module, ctx, heads))
    return model
