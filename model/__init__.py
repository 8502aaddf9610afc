"""logitserve's model: a PyTorch re-creation of MAX's distributed transformer over ragged batches."""

from .config import ModelConfig, UnsupportedModelError
from .distributed import ParallelContext, init_process_group, launch_local
from .distributed_transformer import (
    DistributedLogitsPostprocessMixin,
    DistributedTransformer,
    DistributedTransformerBlock,
    ShardableCallable,
    distributed_logits_postprocess,
    forward_sharded_layers,
    take,
)
from .outputs import OutputSpec, ReturnHiddenStates, ReturnLogits, SequenceOutput
from .runner import ModelRunner

__all__ = [
    "DistributedLogitsPostprocessMixin",
    "DistributedTransformer",
    "DistributedTransformerBlock",
    "ModelConfig",
    "ModelRunner",
    "OutputSpec",
    "ParallelContext",
    "ReturnHiddenStates",
    "ReturnLogits",
    "SequenceOutput",
    "ShardableCallable",
    "UnsupportedModelError",
    "distributed_logits_postprocess",
    "forward_sharded_layers",
    "init_process_group",
    "launch_local",
    "take",
]
