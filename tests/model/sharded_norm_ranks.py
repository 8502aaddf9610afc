"""Rank functions of the sharded-norm test, in a module light to import: each spawned rank imports the module of
the function it runs, and the test module's transformers imports would cost every rank seconds."""

from __future__ import annotations

import torch

from model.families.config import ModelConfig
from model.distributed import ParallelContext
from model.layers.base import Part, ShardedRMSNorm
from model.families.tp import HeadLayout


def olmo2_qk_norm_rank(ctx: ParallelContext, cases):
    """Per case (hq, hkv, d, x_q, x_k, w_q, w_k): this rank's q and k norm outputs, with the head layout of tp.py
    (kv heads replicated when tp exceeds them). Returns (q rows, k rows, replicated k rows, q out, k out) each."""
    results = []
    for hq, hkv, d, x_q, x_k, w_q, w_k in cases:
        cfg = ModelConfig(architecture="Olmo2ForCausalLM", vocab_size=8, hidden_size=hq * d, intermediate_size=8,
                          num_layers=1, num_heads=hq, num_kv_heads=hkv, head_dim=d, sliding_windows=(None,))
        me = HeadLayout(cfg, ctx.rank, ctx.world_size)
        # kv heads this rank shares with the rank before it are counted there
        prev = HeadLayout(cfg, ctx.rank - 1, ctx.world_size) if ctx.rank else None
        replicated = max(0, prev.kv_start + prev.kv_count - me.kv_start) * d if prev else 0
        q_rows = slice(me.q_start * d, (me.q_start + me.q_per_rank) * d)
        k_rows = slice(me.kv_start * d, (me.kv_start + me.kv_count) * d)
        q_norm = ShardedRMSNorm(Part(hq * d, q_rows.start, q_rows.stop - q_rows.start), 1e-6, ctx)
        k_norm = ShardedRMSNorm(Part(hkv * d, k_rows.start, k_rows.stop - k_rows.start), 1e-6, ctx, replicated)
        q_norm.weight.data.copy_(w_q[q_rows])
        k_norm.weight.data.copy_(w_k[k_rows])
        with torch.inference_mode():
            results.append((q_rows, k_rows, replicated, q_norm(x_q[:, q_rows]), k_norm(x_k[:, k_rows])))
    return results
