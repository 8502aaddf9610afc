"""The module kinds an architecture entry names, built for one rank: each layer's attention, MLP and norms, and the
head. ``DistributedTransformer(config, parallel, numerics)`` builds its blocks from here; every module gets its
kernel at construction (the numerics' attention kind, the MoE block's batch-invariance switch)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.distributed import ParallelContext
from model.families.architectures import ARCHITECTURES, NORM_SLOTS
from model.families.config import ModelConfig
from model.families.tp import HeadLayout
from model.layers.attention_kernels import attention_kernel
from model.layers.base import ACTIVATIONS, Part, ShardedRMSNorm
from model.layers.modules import MLP, Attention, make_norm
from model.layers.moe import SparseMoeBlock
from model.runtime.numerics import Numerics


def gated_mlp(config: ModelConfig, layer_idx: int, parallel: ParallelContext, numerics: Numerics) -> nn.Module:
    return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias, ACTIVATIONS[config.hidden_act])


def moe_mlp(config: ModelConfig, layer_idx: int, parallel: ParallelContext, numerics: Numerics) -> nn.Module:
    """The sparse block where config.moe marks the layer sparse (built at this rank's shard size: the TP plan
    names none of its modules; padded row groups only under batch invariance), else the dense gated MLP."""
    if config.moe.sparse_layers[layer_idx]:
        return SparseMoeBlock(config.moe, config.hidden_size, parallel, batch_invariant=numerics.batch_invariant)
    return gated_mlp(config, layer_idx, parallel, numerics)


def lm_head(config: ModelConfig) -> nn.Module:
    return nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def score_head(config: ModelConfig) -> nn.Module:
    """A sequence classifier's `score` (hidden -> num_labels, no bias). Replicated under tensor parallelism (the
    classifier's plan leaves it out): num_labels columns are too few to split, and every rank gets whole rows."""
    return nn.Linear(config.hidden_size, config.num_labels, bias=False)


# The kinds an Architecture names: each layer's MLP (config, layer index, this rank, the numerics: a kind may be
# built sharded, or with the batch-invariance switch), the head on the final hidden states.
MLPS: dict[str, Callable[[ModelConfig, int, ParallelContext, Numerics], nn.Module]] = {
    "gated": gated_mlp, "moe": moe_mlp}
HEADS: dict[str, Callable[[ModelConfig], nn.Module]] = {"lm_head": lm_head, "score": score_head}


def projection_qk_norms(config: ModelConfig, parallel: ParallelContext, heads: HeadLayout) -> tuple[nn.Module, nn.Module]:
    """OLMo 2's q/k norms over the whole projections, each rank holding its heads' rows. kv heads a rank shares
    with the rank before it (replicated when tp exceeds them, or a kv group straddling two ranks) lead its k rows
    and are counted once in the sum of squares."""
    d, eps = config.head_dim, config.rms_norm_eps
    replicated = 0
    if parallel.rank > 0:
        prev = HeadLayout(config, parallel.rank - 1, parallel.world_size)
        replicated = max(0, prev.kv_start + prev.kv_count - heads.kv_start) * d
    q = Part(config.q_size, heads.q_start * d, heads.q_per_rank * d)
    k = Part(config.kv_size, heads.kv_start * d, heads.kv_count * d)
    return ShardedRMSNorm(q, eps, parallel), ShardedRMSNorm(k, eps, parallel, replicated)


def block_norms(config: ModelConfig) -> dict[str, nn.Module | None]:
    """A block's norms for the entry's placement (DistributedTransformerBlock's keyword arguments)."""
    slots = NORM_SLOTS[config.norm_placement]
    keywords = ("attention_norm", "attention_out_norm", "mlp_norm", "mlp_out_norm")
    return {k: None if name is None else make_norm(config, config.hidden_size) for k, name in zip(keywords, slots)}


def build_attention(
    config: ModelConfig, i: int, parallel: ParallelContext, numerics: Numerics, rotary_pairs: bool, out_of_graph: bool
) -> Attention:
    """Layer i's attention for this rank's heads, with the numerics' kernel (`out_of_graph`: kept out of a
    compiled block's graph)."""
    heads = HeadLayout(config, parallel.rank, parallel.world_size, parallel.device)
    whole_qk_norm = config.qk_norm and config.qk_norm_scope == "projection"
    return Attention(
        config,
        i,
        num_heads=heads.q_per_rank,
        num_kv_heads=heads.kv_count,
        kv_head_index=heads.kv_head_index,
        # a layer without rotary keeps the checkpoint's order: nothing would restore it before q.k
        rotary_pairs=rotary_pairs and config.layer_rope_kind(i) is not None,
        qk_norms=projection_qk_norms(config, parallel, heads) if whole_qk_norm else None,
        kernel=attention_kernel(numerics.attention, config.attention_softcap, out_of_graph),
    )


def block_parts(
    config: ModelConfig, i: int, parallel: ParallelContext, numerics: Numerics, rotary_pairs: bool,
    out_of_graph: bool = False,
) -> dict:
    """Layer i's DistributedTransformerBlock keyword arguments, as the entry's traits declare them (norm placement
    and kind, q/k norm, MLP kind) and the numerics pick the kernels."""
    return dict(
        attention=build_attention(config, i, parallel, numerics, rotary_pairs, out_of_graph),
        mlp=MLPS[ARCHITECTURES[config.architecture].mlp](config, i, parallel, numerics),
        residual_multiplier=config.residual_multiplier,
        norm_placement=config.norm_placement,
        **block_norms(config),
    )


def head(config: ModelConfig) -> nn.Module:
    return HEADS[ARCHITECTURES[config.architecture].head](config)
