"""Assembly and loading: an architecture's model (model/families/architectures.py) built on the meta device, sharded by its
TP plan (model/families/tp.py), then filled from this rank's slices of the safetensors files."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from model.distributed import ParallelContext
from model.distributed_transformer import DistributedTransformer
from model.families.architectures import ARCHITECTURES, WeightNames
from model.families.config import ModelConfig
from model.families.tp import shard_model
from model.families.weights import CheckpointReader, ShapeReader
from model.layers.base import ColumnParallelLinear
from model.layers.rope import RotaryEmbedding, build_ropes
from model.runtime.numerics import Numerics


def build_model(
    config: ModelConfig,
    parallel: ParallelContext,
    numerics: Numerics | None = None,
    rope: RotaryEmbedding | dict[str, RotaryEmbedding] | None = None,
    rotary_pairs: bool = False,
    **kwargs,
) -> DistributedTransformer:
    """The plain model of config.architecture for this rank (DistributedTransformer builds it from the entry's
    kinds, model/families/blocks.py). Call on the meta device with `rope` (rope.build_ropes) built outside it (its
    tables are real tensors), then `shard_model`. kwargs: DistributedTransformer's MAX options."""
    return DistributedTransformer(config, parallel, numerics, rope=rope, rotary_pairs=rotary_pairs, **kwargs)


def checkpoint_names(reader: CheckpointReader, weights: WeightNames) -> WeightNames:
    """The tensor names as this checkpoint writes them. A backbone saved headless (sentence-transformers saves
    AutoModel's state: Qwen3-Embedding, gte-Qwen2, e5-mistral) has its decoder's keys without the `model.` prefix
    and no lm_head (which is then tied to the embeddings, as a checkpoint without one is)."""
    embed = weights.checkpoint_name("embed_tokens")
    if weights.prefix and f"{embed}.weight" not in reader and f"{embed.removeprefix(weights.prefix)}.weight" in reader:
        return replace(weights, prefix="")
    return weights


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
    if isinstance(reader, ShapeReader):
        return  # a check of names and shapes: nothing was loaded to finish
    for module in model.modules():
        if hasattr(module, "after_loading"):
            module.after_loading()


def load_model(
    checkpoint: str,
    config: ModelConfig,
    parallel: ParallelContext,
    numerics: Numerics,
    rotary_pairs: bool | None = None,
    **model_kwargs,
) -> DistributedTransformer:
    """This rank's shard of the checkpoint's model, in the numerics' dtype and with its kernels, for inference.

    rotary_pairs (None: wherever it keeps transformers' bits): q/k heads in pair order, so that rotary embedding is
    one complex multiply (rope.apply_rotary_pairs). Complex dtypes exist for float32/float64 only, and models with
    q/k norm keep the checkpoint's order (the norm would sum each head's squares in another order), as do partial
    rotary (its pass-through dims) and layers without rotary."""
    arch = ARCHITECTURES[config.architecture]
    dtype = numerics.torch_dtype
    if rotary_pairs is None:
        rotary_pairs = (
            dtype in (torch.float32, torch.float64) and not config.qk_norm and config.rotary_dim == config.head_dim
        )
    rope = build_ropes(config, parallel.device)  # real tensors: built outside the meta context
    with torch.device("meta"):
        model = build_model(config, parallel, numerics, rope=rope, rotary_pairs=rotary_pairs, **model_kwargs)
        shard_model(model, config, arch.tp_plan)
    model = model.to(dtype).to_empty(device=parallel.device)
    with CheckpointReader(checkpoint) as reader:
        load_checkpoint(model, reader, checkpoint_names(reader, arch.weights), config.tie_word_embeddings, arch.head)
    return model.eval().requires_grad_(False)


def check_checkpoint_tensors(checkpoint: str, config: ModelConfig) -> None:
    """Raise CheckpointError naming the first tensor the model reads that the checkpoint lacks (a missing tensor,
    or one named another way), before any worker starts: the model is built on the meta device and loaded through
    a ShapeReader, so no weight is read."""
    arch = ARCHITECTURES[config.architecture]
    parallel = ParallelContext.single("cpu")
    rope = build_ropes(config, parallel.device)
    with torch.device("meta"):
        model = build_model(config, parallel, rope=rope)
        shard_model(model, config, arch.tp_plan)
    with ShapeReader(checkpoint) as reader:
        load_checkpoint(model, reader, checkpoint_names(reader, arch.weights), config.tie_word_embeddings, arch.head)
