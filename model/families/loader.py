"""Assembly and loading: an architecture's model (model/families/architectures.py) built on the meta device, sharded by its
TP plan (model/families/tp.py), then filled from this rank's slices of the safetensors files."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.families.architectures import ARCHITECTURES, WeightNames
from model.families.config import ModelConfig
from model.distributed import ParallelContext
from model.distributed_transformer import NORM_SLOTS, DistributedTransformer, DistributedTransformerBlock
from model.layers.base import ACTIVATIONS, ColumnParallelLinear, Part, ShardedRMSNorm
from model.layers.modules import MLP, Attention, make_norm
from model.layers.moe import SparseMoeBlock
from model.layers.rope import RotaryEmbedding, build_ropes
from model.families.tp import HeadLayout, shard_model
from model.families.weights import CheckpointReader
from model.task import Task


def gated_mlp(config: ModelConfig, layer_idx: int, parallel: ParallelContext) -> nn.Module:
    return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias, ACTIVATIONS[config.hidden_act])


def moe_mlp(config: ModelConfig, layer_idx: int, parallel: ParallelContext) -> nn.Module:
    """The sparse block where config.moe marks the layer sparse (built at this rank's shard size: the TP plan
    names none of its modules), else the dense gated MLP of `intermediate_size`."""
    if config.moe.sparse_layers[layer_idx]:
        return SparseMoeBlock(config.moe, config.hidden_size, parallel)
    return gated_mlp(config, layer_idx, parallel)


def lm_head(config: ModelConfig) -> nn.Module:
    return nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def score_head(config: ModelConfig) -> nn.Module:
    """A sequence classifier's `score` (hidden -> num_labels, no bias). Replicated under tensor parallelism (the
    classifier's plan leaves it out): num_labels columns are too few to split, and every rank gets whole rows."""
    return nn.Linear(config.hidden_size, config.num_labels, bias=False)


# The kinds an Architecture names: each layer's MLP (config, layer index, this rank: a kind may be built sharded),
# the head on the final hidden states.
MLPS: dict[str, Callable[[ModelConfig, int, ParallelContext], nn.Module]] = {"gated": gated_mlp, "moe": moe_mlp}
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


def build_model(
    config: ModelConfig,
    parallel: ParallelContext,
    rope: RotaryEmbedding | dict[str, RotaryEmbedding] | None = None,
    rotary_pairs: bool = False,
    **kwargs,
) -> DistributedTransformer:
    """The plain model of config.architecture (nn.Linear / nn.Embedding, full size), each attention built for this
    rank's heads, its blocks as the entry's traits declare them (norm placement and kind, q/k norm, attention
    function, each layer's rope table). Call on the meta device with `rope` (rope.build_ropes) built outside it
    (its tables are real tensors), then `shard_model`. kwargs: DistributedTransformer's options."""
    arch = ARCHITECTURES[config.architecture]
    heads = HeadLayout(config, parallel.rank, parallel.world_size, parallel.device)
    whole_qk_norm = config.qk_norm and config.qk_norm_scope == "projection"

    def attention(i: int) -> Attention:
        return Attention(
            config,
            i,
            num_heads=heads.q_per_rank,
            num_kv_heads=heads.kv_count,
            kv_head_index=heads.kv_head_index,
            # a layer without rotary keeps the checkpoint's order: nothing would restore it before q.k
            rotary_pairs=rotary_pairs and config.layer_rope_kind(i) is not None,
            qk_norms=projection_qk_norms(config, parallel, heads) if whole_qk_norm else None,
        )

    layers = [
        DistributedTransformerBlock(
            attention=attention(i),
            mlp=MLPS[arch.mlp](config, i, parallel),
            residual_multiplier=config.residual_multiplier,
            norm_placement=config.norm_placement,
            **block_norms(config),
        )
        for i in range(config.num_layers)
    ]
    classifier = arch.task == Task.CLASSIFICATION  # the score head reads the normed hidden state as it is
    return DistributedTransformer(
        layers=layers,
        norm=make_norm(config, config.hidden_size),
        output=HEADS[arch.head](config),
        embedding=nn.Embedding(config.vocab_size, config.hidden_size),
        parallel=parallel,
        rope=rope or build_ropes(config, parallel.device),
        logits_scaling=1.0 if classifier else config.logits_scaling,
        logits_softcap=None if classifier else config.final_logit_softcapping,
        embedding_multiplier=config.embedding_multiplier,
        rotary_pairs=rotary_pairs,
        layer_rope=tuple(config.layer_rope_kind(i) for i in range(config.num_layers)),
        scale_embeddings=config.scale_embeddings,
        classifier=classifier,
        classifier_pad_token_id=config.pad_token_id,
        rotary_in_float32=config.rotary_in_float32,
        **kwargs,
    )


@torch.no_grad()
def load_checkpoint(
    model: nn.Module, reader: CheckpointReader, weights: WeightNames, tie_word_embeddings: bool, head: str = "lm_head"
) -> None:
    """Fill every parameter from this rank's slices: a sharded layer reads its slice of the tensor `weights` names
    for its module path, a module with its own `load` (an MoE block) everything beneath it, any other module each
    of its own parameters whole. Then each module's `after_loading`. Only an lm_head can be tied to the embeddings
    (a classifier's `score` never is, whatever the config says)."""
    tied = head == "lm_head" and (
        tie_word_embeddings or f"{weights.checkpoint_name('lm_head')}.weight" not in reader
    )
    if tied:  # the head shares the embedding's shard (both are split by the same vocabulary range)
        model.lm_head.weight = model.embed_tokens.weight
    loaded_whole: list[str] = []  # paths of modules that loaded their submodules too
    for path, module in model.named_modules():
        if (tied and path == "lm_head") or any(path.startswith(f"{done}.") for done in loaded_whole):
            continue
        name = weights.checkpoint_name(path)
        if isinstance(module, ColumnParallelLinear):
            module.load(reader, name, weights.parts(path))
        elif hasattr(module, "load"):
            module.load(reader, name)
            loaded_whole.append(path)
        else:
            for param_name, param in module.named_parameters(recurse=False):
                param.copy_(reader.read(f"{name}.{param_name}"))
    for module in model.modules():
        if hasattr(module, "after_loading"):
            module.after_loading()


def load_model(
    checkpoint: str,
    config: ModelConfig,
    parallel: ParallelContext,
    dtype: torch.dtype,
    rotary_pairs: bool | None = None,
    **model_kwargs,
) -> DistributedTransformer:
    """This rank's shard of the checkpoint's model, in `dtype`, for inference.

    rotary_pairs (None: wherever it keeps transformers' bits): q/k heads in pair order, so that rotary embedding is
    one complex multiply (rope.apply_rotary_pairs). Complex dtypes exist for float32/float64 only, and models with
    q/k norm keep the checkpoint's order (the norm would sum each head's squares in another order), as do partial
    rotary (its pass-through dims) and layers without rotary."""
    arch = ARCHITECTURES[config.architecture]
    if rotary_pairs is None:
        rotary_pairs = (
            dtype in (torch.float32, torch.float64) and not config.qk_norm and config.rotary_dim == config.head_dim
        )
    rope = build_ropes(config, parallel.device)  # real tensors: built outside the meta context
    with torch.device("meta"):
        model = build_model(config, parallel, rope=rope, rotary_pairs=rotary_pairs, **model_kwargs)
        shard_model(model, config, arch.tp_plan)
    model = model.to(dtype).to_empty(device=parallel.device)
    with CheckpointReader(checkpoint) as reader:
        load_checkpoint(model, reader, arch.weights, config.tie_word_embeddings, arch.head)
    return model.eval().requires_grad_(False)
