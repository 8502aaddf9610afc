"""Assembly and loading: an architecture's model (model/architectures.py) built on the meta device, sharded by its
TP plan (model/tp.py), then filled from this rank's slices of the safetensors files."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .architectures import ARCHITECTURES, WeightNames
from .config import ModelConfig
from .distributed import ParallelContext
from .distributed_transformer import DistributedTransformer, DistributedTransformerBlock
from .layers import ACTIVATIONS, ColumnParallelLinear, RMSNorm
from .modules import MLP, Attention
from .moe import SparseMoeBlock
from .rope import RotaryEmbedding
from .tp import HeadLayout, shard_model
from .weights import CheckpointReader


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


# The kinds an Architecture names: each layer's MLP (config, layer index, this rank: a kind may be built sharded),
# the head on the final hidden states.
MLPS: dict[str, Callable[[ModelConfig, int, ParallelContext], nn.Module]] = {"gated": gated_mlp, "moe": moe_mlp}
HEADS: dict[str, Callable[[ModelConfig], nn.Module]] = {"lm_head": lm_head}


def build_model(
    config: ModelConfig,
    parallel: ParallelContext,
    rope: RotaryEmbedding | None = None,
    rotary_pairs: bool = False,
    **kwargs,
) -> DistributedTransformer:
    """The plain model of config.architecture (nn.Linear / nn.Embedding, full size), each attention built for this
    rank's heads. Call on the meta device with `rope` built outside it (its tables are real tensors), then
    `shard_model`. kwargs: DistributedTransformer's options."""
    arch = ARCHITECTURES[config.architecture]
    heads = HeadLayout(config, parallel.rank, parallel.world_size, parallel.device)
    h, eps = config.hidden_size, config.rms_norm_eps

    def attention(i: int) -> Attention:
        return Attention(
            config,
            i,
            num_heads=heads.q_per_rank,
            num_kv_heads=heads.kv_count,
            kv_head_index=heads.kv_head_index,
            rotary_pairs=rotary_pairs,
        )

    layers = [
        DistributedTransformerBlock(
            attention=attention(i),
            mlp=MLPS[arch.mlp](config, i, parallel),
            attention_norm=RMSNorm(h, eps),
            mlp_norm=RMSNorm(h, eps),
            residual_multiplier=config.residual_multiplier,
        )
        for i in range(config.num_layers)
    ]
    return DistributedTransformer(
        layers=layers,
        norm=RMSNorm(h, eps),
        output=HEADS[arch.head](config),
        embedding=nn.Embedding(config.vocab_size, h),
        parallel=parallel,
        rope=rope or RotaryEmbedding(config, parallel.device),
        logits_scaling=config.logits_scaling,
        logits_softcap=config.final_logit_softcapping,
        embedding_multiplier=config.embedding_multiplier,
        rotary_pairs=rotary_pairs,
        **kwargs,
    )


@torch.no_grad()
def load_checkpoint(model: nn.Module, reader: CheckpointReader, weights: WeightNames, tie_word_embeddings: bool) -> None:
    """Fill every parameter from this rank's slices: a sharded layer reads its slice of the tensor `weights` names
    for its module path, a module with its own `load` (an MoE block) everything beneath it, any other module each
    of its own parameters whole. Then each module's `after_loading`."""
    tied = tie_word_embeddings or f"{weights.checkpoint_name('lm_head')}.weight" not in reader
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
    q/k norm keep the checkpoint's order (the norm would sum each head's squares in another order)."""
    arch = ARCHITECTURES[config.architecture]
    if rotary_pairs is None:
        rotary_pairs = dtype in (torch.float32, torch.float64) and not config.qk_norm
    rope = RotaryEmbedding(config, parallel.device)  # real tensors: built outside the meta context
    with torch.device("meta"):
        model = build_model(config, parallel, rope=rope, rotary_pairs=rotary_pairs, **model_kwargs)
        shard_model(model, config, arch.tp_plan)
    model = model.to(dtype).to_empty(device=parallel.device)
    with CheckpointReader(checkpoint) as reader:
        load_checkpoint(model, reader, arch.weights, config.tie_word_embeddings)
    return model.eval().requires_grad_(False)
