"""Building blocks: RMSNorm and the sharded linear / embedding layers that the tensor-parallel plan swaps in.

Each sharded layer is allocated at shard size (vLLM's way) and knows which slices of which checkpoint tensors
fill it, so loading reads only a rank's bytes. A fused layer (q/k/v, gate/up) is a list of ``Part``s; it loads
from the separate tensors (``q_proj``...) or, for fused checkpoints, from the slices of the fused tensor
given by the layout of its parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import ParallelContext
from .weights import CheckpointReader


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def head_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for the lm_head; float32 on CPU goes through oneDNN instead of MKL's sgemm.

    On the benchmark machine (AVX2 AMD EPYC, 2 threads) oneDNN runs the [rows, 576] x [576, 49152] head 10-25%
    faster, on the same plain weight (no packed copy). Only the head: its summation order differs from MKL's,
    and in the decoder matmuls that difference grows through the layers (SmolLM2-135M logits 3-4e-4 from
    transformers with every linear on oneDNN, against 8e-5 with the head alone, the bar being 1e-4). No autograd
    kernel and no compiler lowering: a call that needs gradients, or a traced one, keeps ``F.linear``."""
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
                # torch's CPU rms_norm runs pow, mean and two muls as separate slow passes: 6-9 ms for [4260, 576]
                # on the benchmark machine; these four ops take 2.6-3.2 ms and give the same bits.
                inv = torch.mul(x, x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(self.eps).rsqrt_()
                return torch.mul(x, inv).mul_(self.weight)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused kernel on accelerators
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)  # transformers' order for half precision: cast, then scale

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(f"{name}.weight"))


@dataclass(frozen=True)
class Part:
    """One logical piece of a (possibly fused) weight: `size` rows from `start` of a `full`-row tensor `name`."""

    name: str  # checkpoint tensor stem, e.g. "q_proj"
    full: int  # rows of the whole part in the checkpoint
    start: int  # this rank's first row
    size: int  # this rank's rows


def _read_parts(reader: CheckpointReader, prefix: str, parts: list[Part], fused_name: str | None, suffix: str, dim: int):
    """Read each part's slice along `dim` from separate tensors, or from the fused tensor's layout."""
    if all(f"{prefix}.{p.name}.{suffix}" in reader for p in parts):
        return torch.cat([reader.read(f"{prefix}.{p.name}.{suffix}", dim, p.start, p.size) for p in parts], dim=dim)
    fused = f"{prefix}.{fused_name}.{suffix}"
    if fused_name and fused in reader:
        chunks, offset = [], 0
        for p in parts:
            chunks.append(reader.read(fused, dim, offset + p.start, p.size))
            offset += p.full
        return torch.cat(chunks, dim=dim)
    names = ", ".join(f"{prefix}.{p.name}.{suffix}" for p in parts)
    raise KeyError(f"checkpoint has neither {names} nor {fused}")


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T (+ b_local): output features split across ranks; no communication."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool, fused_name: str | None = None) -> None:
        super().__init__()
        self.parts = parts
        self.fused_name = fused_name
        out = sum(p.size for p in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.data.copy_(_read_parts(reader, prefix, self.parts, self.fused_name, "weight", 0))
        if self.bias is not None:
            self.bias.data.copy_(_read_parts(reader, prefix, self.parts, self.fused_name, "bias", 0))


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

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        name = f"{prefix}.{self.part.name}"
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
        from .distributed import split_evenly

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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_pytorch_tanh`` (Gemma's MLP activation)."""
    return F.gelu(x, approximate="tanh")


# transformers' activation names (config `hidden_act` / `hidden_activation`) -> the function of a gated MLP's gate
GATED_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """Gemma's embedding multiplier sqrt(hidden_size) with transformers' rounding: a float32 tensor cast to the
    model's dtype (in bfloat16 sqrt(3072) = 55.43 becomes 55.5). The returned Python float is exact in `dtype`, so
    ``h * embedding_scale(...)`` gives transformers' ``h * embed_scale.to(dtype)`` bits."""
    return torch.tensor(hidden_size**0.5).to(dtype).item()
