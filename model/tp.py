"""Tensor parallelism as a plan applied to the plain model, then sharded loading.

The plan (torchtitan style) names each sharded module and its style. ``shard_model`` swaps the plain
``nn.Linear`` / ``nn.Embedding`` for sharded layers allocated at shard size (on the meta device, so nothing is
allocated twice) and sets each attention's local head counts; ``load_checkpoint`` then fills every rank's
parameters from its slices of the safetensors files. At tp=1 the same path runs with one shard.

Query heads are split evenly (tp must divide n_heads). A rank takes the kv heads its query heads use; when
tp exceeds the kv heads, kv heads are replicated on the ranks that share them (MAX cannot do this).
Intermediate and vocabulary sizes that tp does not divide are split unevenly: the first ranks get one more.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from .config import ModelConfig
from .distributed import ParallelContext, split_evenly
from .distributed_transformer import DistributedTransformer, DistributedTransformerBlock
from .layers import ColumnParallelLinear, Part, RMSNorm, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
from .modules import MLP, Attention
from .rope import RotaryEmbedding, to_pair_order
from .weights import CheckpointReader

TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.self_attn.qkv_proj": "colwise_qkv",
    "layers.*.self_attn.o_proj": "rowwise_heads",
    "layers.*.mlp.gate_up_proj": "colwise_gate_up",
    "layers.*.mlp.down_proj": "rowwise_intermediate",
    "lm_head": "vocab_lm_head",
}


class HeadLayout:
    """Which query and kv heads rank `rank` of `world` holds."""

    def __init__(self, config: ModelConfig, rank: int, world: int) -> None:
        if config.num_heads % world:
            raise ValueError(f"tp={world} must divide the number of attention heads ({config.num_heads})")
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
        self.kv_head_index = None if uniform else torch.tensor(mapping, device="cpu")


def build_model(config: ModelConfig, parallel: ParallelContext, rope: RotaryEmbedding | None = None, **kwargs) -> DistributedTransformer:
    """The plain model: plain nn.Linear / nn.Embedding. Call on the meta device, then `shard_model`."""
    layers = [
        DistributedTransformerBlock(
            attention=Attention(config, i),
            mlp=MLP(config),
            attention_norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            mlp_norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            residual_multiplier=config.residual_multiplier,
        )
        for i in range(config.num_layers)
    ]
    return DistributedTransformer(
        dim=config.hidden_size,
        n_heads=config.num_heads,
        layers=layers,
        norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        output=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        embedding=nn.Embedding(config.vocab_size, config.hidden_size),
        parallel=parallel,
        rope=rope or RotaryEmbedding(config, parallel.device),
        logits_scaling=config.logits_scaling,
        logits_softcap=config.final_logit_softcapping,
        embedding_multiplier=config.embedding_multiplier,
        **kwargs,
    )


def _sharded(style: str, module: nn.Module, config: ModelConfig, ctx: ParallelContext, heads: HeadLayout) -> nn.Module:
    d, h = config.head_dim, config.hidden_size
    if style == "vocab_embedding":
        start, size = split_evenly(config.vocab_size, ctx.world_size, ctx.rank)
        return VocabParallelEmbedding(Part("embed_tokens", config.vocab_size, start, size), h, ctx)
    if style == "vocab_lm_head":
        start, size = split_evenly(config.vocab_size, ctx.world_size, ctx.rank)
        return VocabParallelLMHead(Part("lm_head", config.vocab_size, start, size), h, ctx)
    if style == "colwise_qkv":
        q = Part("q_proj", config.q_size, heads.q_start * d, heads.q_per_rank * d)
        k = Part("k_proj", config.kv_size, heads.kv_start * d, heads.kv_count * d)
        v = Part("v_proj", config.kv_size, heads.kv_start * d, heads.kv_count * d)
        return ColumnParallelLinear(h, [q, k, v], bias=module.bias is not None, fused_name="qkv_proj")
    if style == "rowwise_heads":
        part = Part("o_proj", config.q_size, heads.q_start * d, heads.q_per_rank * d)
        return RowParallelLinear(part, h, bias=module.bias is not None, parallel=ctx)
    start, size = split_evenly(config.intermediate_size, ctx.world_size, ctx.rank)
    if style == "colwise_gate_up":
        parts = [Part(n, config.intermediate_size, start, size) for n in ("gate_proj", "up_proj")]
        return ColumnParallelLinear(h, parts, bias=module.bias is not None, fused_name="gate_up_proj")
    if style == "rowwise_intermediate":
        part = Part("down_proj", config.intermediate_size, start, size)
        return RowParallelLinear(part, h, bias=module.bias is not None, parallel=ctx)
    raise ValueError(f"unknown tp style {style!r}")


def shard_model(model: DistributedTransformer, config: ModelConfig, plan: dict[str, str] = TP_PLAN) -> DistributedTransformer:
    """Apply `plan` to the plain model for model.parallel's rank (also at tp=1: one shard, same loading)."""
    ctx = model.parallel
    heads = HeadLayout(config, ctx.rank, ctx.world_size)
    for name, module in list(model.named_modules()):
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _sharded(style, module, config, ctx, heads))
    for layer in model.layers:
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = heads.q_per_rank, heads.kv_count
        attn.kv_head_index = heads.kv_head_index
    return model


def load_checkpoint(model: DistributedTransformer, reader: CheckpointReader, config: ModelConfig) -> None:
    """Fill every parameter from this rank's slices. HF names: model.embed_tokens, model.layers.i.*, lm_head."""
    model.embed_tokens.load(reader, "model.embed_tokens")
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        layer.input_layernorm.load(reader, f"{prefix}.input_layernorm")
        layer.post_attention_layernorm.load(reader, f"{prefix}.post_attention_layernorm")
        attn = layer.self_attn
        attn.qkv_proj.load(reader, f"{prefix}.self_attn")
        attn.o_proj.load(reader, f"{prefix}.self_attn")
        if attn.q_norm is not None:
            attn.q_norm.load(reader, f"{prefix}.self_attn.q_norm")
            attn.k_norm.load(reader, f"{prefix}.self_attn.k_norm")
        layer.mlp.gate_up_proj.load(reader, f"{prefix}.mlp")
        layer.mlp.down_proj.load(reader, f"{prefix}.mlp")
    model.norm.load(reader, "model.norm")
    if config.tie_word_embeddings or "lm_head.weight" not in reader:
        # Tied: the head shares the embedding's shard (both are split by the same vocabulary range).
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.load(reader, "lm_head")


def load_model(
    checkpoint: str,
    config: ModelConfig,
    parallel: ParallelContext,
    dtype: torch.dtype,
    plan: dict[str, str] = TP_PLAN,
    **model_kwargs,
) -> DistributedTransformer:
    rope = RotaryEmbedding(config, parallel.device)  # real tensors: built outside the meta context
    with torch.device("meta"):
        model = build_model(config, parallel, rope=rope, **model_kwargs)
        shard_model(model, config, plan)
    model = model.to(dtype).to_empty(device=parallel.device)
    for layer in model.layers:
        if layer.self_attn.kv_head_index is not None:
            layer.self_attn.kv_head_index = layer.self_attn.kv_head_index.to(parallel.device)
    with CheckpointReader(checkpoint) as reader, torch.no_grad():
        load_checkpoint(model, reader, config)
    if dtype in (torch.float32, torch.float64):  # complex dtypes exist for these only
        use_rotary_pairs(model, config)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def use_rotary_pairs(model: DistributedTransformer, config: ModelConfig) -> None:
    """Store every q/k head's dims in pair order (dim i beside its rotate-half partner i + head_dim/2), as
    gpt-fast and Meta's checkpoints do, so that rotary embedding is one complex multiply (rope.apply_rotary_pairs).
    That multiply hands q and k back in the checkpoint's order, with rotate-half's bits: attention, v, o_proj and
    the residual stream see exactly what transformers computes. Applied to a loaded model (this rank's heads).

    Models with q/k norm keep the checkpoint's order: the norm would sum each head's squares in another order."""
    if config.qk_norm:
        return
    d = config.head_dim
    for layer in model.layers:
        attn = layer.self_attn
        qk_rows = (attn.num_heads + attn.num_kv_heads) * d  # q then k heads lead the fused output
        for p in (attn.qkv_proj.weight, attn.qkv_proj.bias):
            if p is not None:
                p.data[:qk_rows] = to_pair_order(p.data[:qk_rows], d)
        attn.rotary_pairs = True
    model.rotary_pairs = True
