"""Building blocks: activations, RMSNorm and the sharded linear / embedding layers that the tensor-parallel plan
swaps in.

Each sharded layer is allocated at shard size (vLLM's way) and knows which slice of the full tensor it holds
(a ``Part``), so loading reads only a rank's bytes; the loader hands it the tensor's checkpoint name. A fused layer
(q/k/v, gate/up) is a list of ``Part``s; it loads from the separate tensors (``q_proj``...) or, for fused
checkpoints, from the slices of the fused tensor given by the layout of its parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.distributed import ParallelContext, split_evenly
from model.families.weights import CheckpointReader


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_pytorch_tanh`` (Gemma's MLP activation)."""
    return F.gelu(x, approximate="tanh")


# transformers' activation names (config.json's `hidden_act`, Gemma 2/3's `hidden_activation`) and the functions
# they name: the gate's activation of the gated MLP.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def head_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for the lm_head; float32 on CPU goes through oneDNN instead of MKL's sgemm.

    oneDNN runs the wide, short head matmul faster than MKL on the same plain weight (no packed copy; figures in
    docs/benchmarks.md). Only the head: its summation order differs from MKL's, and in the decoder matmuls that
    difference grows through the layers (SmolLM2-135M logits 3-4e-4 from transformers with every linear on oneDNN,
    against 8e-5 with the head alone, the bar being 1e-4). No autograd kernel and no compiler lowering: a call that
    needs gradients, or a traced one, keeps ``F.linear``."""
    if (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as transformers computes them
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.device.type == "cpu":
                # torch's CPU rms_norm runs pow, mean and two muls as separate slow passes; these four ops are
                # faster and give the same bits.
                inv = torch.mul(x, x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(self.eps).rsqrt_()
                return torch.mul(x, inv).mul_(self.weight)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused kernel on accelerators
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)  # transformers' order for half precision: cast, then scale


@dataclass(frozen=True)
class Part:
    """One logical piece of a (possibly fused) weight: `size` rows from `start` of a `full`-row tensor."""

    full: int  # rows of the whole part in the checkpoint
    start: int  # this rank's first row
    size: int  # this rank's rows


def _read_parts(reader: CheckpointReader, name: str, part_names: Sequence[str], parts: list[Part], suffix: str):
    """Each part's rows: from the separate tensors beside `name` (``...self_attn.q_proj`` beside
    ``...self_attn.qkv_proj``) where the checkpoint has them, else from the fused tensor `name` by its layout."""
    parent = name.rpartition(".")[0]
    separate = [f"{parent}.{part}.{suffix}" for part in part_names]
    if separate and all(s in reader for s in separate):
        return torch.cat([reader.read(s, 0, p.start, p.size) for s, p in zip(separate, parts, strict=True)])
    fused = f"{name}.{suffix}"
    if fused in reader:
        chunks, offset = [], 0
        for p in parts:
            chunks.append(reader.read(fused, 0, offset + p.start, p.size))
            offset += p.full
        return torch.cat(chunks)
    from model.families.weights import CheckpointError

    missing = next((s for s in separate if s not in reader), fused)
    raise CheckpointError(f"tensor {missing!r} is missing from the checkpoint (nor is there the fused {fused!r})")


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T (+ b_local): output features split across ranks; no communication."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool) -> None:
        super().__init__()
        self.parts = parts
        out = sum(p.size for p in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, reader: CheckpointReader, name: str, part_names: Sequence[str]) -> None:
        """name: the fused tensor's checkpoint name; part_names: the separate tensors' (one per part)."""
        self.weight.data.copy_(_read_parts(reader, name, part_names, self.parts, "weight"))
        if self.bias is not None:
            self.bias.data.copy_(_read_parts(reader, name, part_names, self.parts, "bias"))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: input features split; one all-reduce; bias added once."""

    def __init__(self, part: Part, out_features: int, bias: bool, parallel: ParallelContext) -> None:
        super().__init__()
        self.part = part
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(out_features, part.size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight", 1, self.part.start, self.part.size))
        if self.bias is not None:
            self.bias.data.copy_(reader.read(f"{name}.bias"))


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids of its vocabulary range [start, start+size); an all-reduce joins them."""

    def __init__(self, vocab: Part, dim: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.vocab = vocab
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(vocab.size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab.start
        mine = (local >= 0) & (local < self.vocab.size)
        out = F.embedding(local.clamp(0, self.vocab.size - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.parallel.all_reduce(out)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight", 0, self.vocab.start, self.vocab.size))


class VocabParallelLMHead(nn.Module):
    """Local logits [R, vocab_local] for this rank's vocabulary range; `gather` assembles full rows when asked."""

    def __init__(self, vocab: Part, dim: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.vocab = vocab
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(vocab.size, dim))
        # Every rank's vocabulary share, for gathering uneven shards.
        self.sizes = [split_evenly(vocab.full, parallel.world_size, r)[1] for r in range(parallel.world_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_linear(x, self.weight)

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """[R, vocab_local] on each rank -> [R, vocab] on every rank."""
        return self.parallel.all_gather_uneven(local_logits, self.sizes, dim=-1)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight", 0, self.vocab.start, self.vocab.size))


# --- Norms, activations and scales of the Gemma, OLMo 2 and Phi-3 families (transformers' bits) ---


def _upcast_rms_norm(x: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    """normalize(x.float()) * scale, cast back to x's dtype: the order of transformers' Gemma and OLMo 2 norms
    (scale in float32, then cast; Llama's casts first). x: [..., dim]; scale: float32 [dim]."""
    xf = x.float()
    if xf.device.type == "cpu":
        # RMSNorm's four CPU ops: transformers' x * rsqrt(x.pow(2).mean(-1) + eps) bits, fewer passes
        inv = torch.mul(xf, xf).sum(-1, keepdim=True).div_(xf.shape[-1]).add_(eps).rsqrt_()
    else:
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv * scale).to(x.dtype)


class UpcastRMSNorm(nn.Module):
    """RMSNorm that multiplies by its weight in float32 and casts last.

    ``weight_offset=1.0`` is Gemma's norm (Gemma, Gemma 2, Gemma 3, their q/k norms): the checkpoint stores w and
    the norm scales by (1 + w), computed in float32 as transformers does (``1.0 + weight.float()``), zeros at init.
    ``weight_offset=0.0`` is OLMo 2's (``(weight * normed).to(dtype)``). In float32 OLMo 2's equals ``RMSNorm``;
    in half precision the two differ by where the cast happens."""

    def __init__(self, dim: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if weight_offset else torch.ones(dim))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + self.weight_offset if self.weight_offset else self.weight.float()
        return _upcast_rms_norm(x, self.eps, scale)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight"))


class ShardedRMSNorm(nn.Module):
    """OLMo 2's q/k norm: one RMSNorm over a whole projection (all heads, q_norm of size heads x head_dim, applied
    before the heads are split), whose features tensor parallelism splits across ranks.

    Each rank holds the `part` of the weight that matches its rows of the projection. The mean of squares needs
    every rank's rows: one all-reduce of the per-token float32 sum of squares [T, 1], then each rank scales its own
    rows. Rows a rank holds as replicas of another rank's (kv heads replicated when tp exceeds them) must count
    once: `replicated_rows` leading local rows are left out of this rank's sum (the ranks holding a kv head are
    consecutive, so a rank's replicas are the heads it shares with the rank before it).

    On one rank this is ``UpcastRMSNorm(weight_offset=0)``: transformers' bits. Across ranks the sum of squares is
    added in another order (each rank's partial sum, then the all-reduce): within float32 rounding of it."""

    def __init__(self, part: Part, eps: float, parallel: ParallelContext, replicated_rows: int = 0) -> None:
        super().__init__()
        self.part = part
        self.eps = eps
        self.parallel = parallel
        self.replicated_rows = replicated_rows
        self.weight = nn.Parameter(torch.ones(part.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, part.size] (this rank's rows of the projection) -> same shape and dtype."""
        if not self.parallel.is_distributed:
            return _upcast_rms_norm(x, self.eps, self.weight.float())
        xf = x.float()
        counted = xf[:, self.replicated_rows :]
        sum_sq = self.parallel.all_reduce(torch.mul(counted, counted).sum(-1, keepdim=True))  # [T, 1]
        inv = sum_sq.div_(self.part.full).add_(self.eps).rsqrt_()
        return (xf * inv * self.weight.float()).to(x.dtype)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight", 0, self.part.start, self.part.size))


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """Gemma's embedding multiplier sqrt(hidden_size) with transformers' rounding: a float32 tensor cast to the
    model's dtype (in bfloat16 sqrt(3072) = 55.43 becomes 55.5). The returned Python float is exact in `dtype`, so
    ``h * embedding_scale(...)`` gives transformers' ``h * embed_scale.to(dtype)`` bits."""
    return torch.tensor(hidden_size**0.5).to(dtype).item()
