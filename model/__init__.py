"""logitserve's model: a PyTorch re-creation of MAX's distributed transformer over ragged batches."""

from model.families.config import ModelConfig, UnsupportedModelError
from model.distributed import ParallelContext, init_process_group, launch_local
from model.distributed_transformer import (
    DistributedLogitsPostprocessMixin,
    DistributedTransformer,
    DistributedTransformerBlock,
    ShardableCallable,
    distributed_logits_postprocess,
    forward_sharded_layers,
    take,
)
from model.runtime.outputs import OutputSpec, ReturnHiddenStates, ReturnLogits, SequenceOutput
from model.runtime.runner import ModelRunner
from model.task import Task

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
    "Task",
    "UnsupportedModelError",
    "distributed_logits_postprocess",
    "forward_sharded_layers",
    "init_process_group",
    "launch_local",
    "take",
]
