"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE) over packed tokens, sharded like the dense MLP.

A router (replicated) picks each token's top-k experts; the (token, expert) pairs are sorted by expert so that
each expert runs one matmul over its own tokens (no compute for experts nobody chose), and the weighted outputs
are summed back in token order. It computes what transformers 5 computes by default (its ``grouped_mm`` experts
path): float32 softmax, top-k, optional renormalisation, ``proj * weight`` per pair, then each token's k pairs
summed in top-k order.

Tensor parallelism: every expert's intermediate dimension is split over the ranks like the dense MLP (gate/up
column-parallel, down row-parallel), so each rank holds a slice of every expert and the block ends in one
all-reduce. Each rank reads only its slices from the checkpoint.

Batch invariance on CPU (float32, MKL): a call of n rows gives each row the bits it would get in any larger call
when n is a multiple of 4; other small n (1-3 always, up to 27 depending on the thread count) round differently.
So each expert's row group, and the router's rows, are padded with zero rows to a multiple of ``ROW_MULTIPLE``:
a token's output does not depend on how many other tokens chose its experts (at most 3 wasted rows per expert).
The activation is the dense MLP's row-canonical one (model/invariance.activation): no thread split moves a row's
elements between vectorised and scalar silu, which round differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Rows per matmul call are padded to a multiple of ROW_MULTIPLE on CPU (see the module docstring; measured on MKL
# sgemm, checked by tests/model/test_moe.py::test_matmul_rows_keep_their_bits_in_calls_of_a_multiple_of_four_rows).
from model.runtime.invariance import ROW_MULTIPLE, activation
from model.distributed import ParallelContext, split_evenly
from model.families.moe_config import MoeConfig
from model.families.weights import CheckpointError, CheckpointReader


@dataclass(frozen=True)
class Routing:
    """Each token's chosen experts, highest probability first, and their mixing weights."""

    expert_ids: torch.Tensor  # int64 [T, k]
    weights: torch.Tensor  # [T, k]: float32 (Mixtral) or the activations' dtype (Qwen3-MoE)


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    short = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(short, *x.shape[1:])]) if short else x


class Router(nn.Module):
    """Replicated: [T, H] -> Routing (softmax in float32, top-k, optional renormalisation)."""

    def __init__(self, config: MoeConfig, hidden_size: int, row_multiple: int) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.normalize = config.normalize_top_k
        self.float32_weights = config.float32_routing_weights
        self.row_multiple = row_multiple
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> Routing:
        multiple = self.row_multiple if x.device.type == "cpu" else 1
        logits = F.linear(_pad_rows(x, multiple), self.weight)[: x.shape[0]]  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(logits.dtype)
        return Routing(expert_ids=expert_ids, weights=weights)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data.copy_(reader.read(name))


class Experts(nn.Module):
    """This rank's slice [start, start+size) of every expert's intermediate dimension.

    gate_up_proj [E, 2*size, H] holds each expert's gate rows then its up rows; down_proj [E, H, size]."""

    def __init__(self, config: MoeConfig, hidden_size: int, parallel: ParallelContext, row_multiple: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.intermediate_size = config.expert_intermediate_size  # the whole expert's
        self.start, size = split_evenly(config.expert_intermediate_size, parallel.world_size, parallel.rank)
        self.row_multiple = row_multiple
        # Inference only (the grouped matmuls write into preallocated outputs, which autograd does not allow).
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * size, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, hidden_size, size), requires_grad=False)

    @property
    def local_size(self) -> int:
        return self.down_proj.shape[-1]

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, H] -> this rank's share [T, H] of sum_k weight_k * expert_k(x) (the caller all-reduces)."""
        t, k = routing.expert_ids.shape
        pairs = routing.expert_ids.reshape(-1)  # [S = T*k] expert of each (token, choice) pair
        # order: pair indices grouped by expert, within a group as transformers' (unstable) sort leaves them
        pair_experts, order = torch.sort(pairs)
        counts = torch.bincount(pairs, minlength=self.num_experts).tolist()  # the one host sync
        multiple = self.row_multiple if x.device.type == "cpu" else 1
        group_rows = [-(-n // multiple) * multiple for n in counts]
        tokens = x.index_select(0, order // k)  # [S, H], grouped by expert
        if group_rows != counts:
            # Pad each group with zero rows: pair j of the sorted order lands on row j + (padding of earlier groups).
            shift, pad_before = 0, []
            for n, rows in zip(counts, group_rows):
                pad_before.append(shift)
                shift += rows - n
            dest = torch.arange(len(pairs), device=x.device) + torch.tensor(pad_before, device=x.device)[pair_experts]
            grouped = x.new_zeros(sum(group_rows), x.shape[1]).index_copy_(0, dest, tokens)  # [P, H]
        else:
            dest, grouped = None, tokens
        h = _silu_and_mul(_grouped_linear(grouped, self.gate_up_proj, group_rows))  # [P, size]
        y = _grouped_linear(h, self.down_proj, group_rows)  # [P, H]
        if dest is not None:
            y = y.index_select(0, dest)  # [S, H] in sorted pair order
        weighted = y * routing.weights.reshape(-1)[order].unsqueeze(-1)  # [S, H]
        in_token_order = torch.empty_like(weighted).index_copy_(0, order, weighted)  # row t*k + j: token t, choice j
        return in_token_order.view(t, k, x.shape[1]).sum(dim=1).to(x.dtype)  # [T, H]

    def load(self, reader: CheckpointReader, block: str, names: ExpertWeightNames) -> None:
        """Read this rank's slice of every expert under `block` (e.g. ``model.layers.3.mlp``): the stacked tensors
        when the checkpoint has them, else one tensor per expert."""
        start, size, full = self.start, self.local_size, self.intermediate_size
        if f"{block}.experts.gate_up_proj" in reader:
            gate_up = f"{block}.experts.gate_up_proj"  # [E, 2*full, H]
            self.gate_up_proj.data[:, :size].copy_(reader.read(gate_up, 1, start, size))
            self.gate_up_proj.data[:, size:].copy_(reader.read(gate_up, 1, full + start, size))
            self.down_proj.data.copy_(reader.read(f"{block}.experts.down_proj", 2, start, size))  # [E, H, full]
            return
        for e in range(self.num_experts):
            expert = f"{block}.experts.{e}"
            self.gate_up_proj.data[e, :size].copy_(reader.read(f"{expert}.{names.gate}.weight", 0, start, size))
            self.gate_up_proj.data[e, size:].copy_(reader.read(f"{expert}.{names.up}.weight", 0, start, size))
            self.down_proj.data[e].copy_(reader.read(f"{expert}.{names.down}.weight", 1, start, size))


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped matmul wants 16-byte aligned data and strides (e.g. float32 widths that are multiples of 4)."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


def _can_group(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    if _GROUPED_MM is None or not (_aligned(x) and _aligned(weight_t)):
        return False
    if x.is_cuda:  # the dtype and devices torch's grouped GEMM kernels cover (transformers uses the same test)
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_rows: list[int]) -> torch.Tensor:
    """x [P, in] in consecutive row groups (group e: group_rows[e] rows, for expert e), weight [E, out, in] ->
    [P, out] with group e multiplied by weight[e]: one matmul per expert that has rows, none for the others.

    torch's grouped matmul where it has a kernel (on CPU it makes one MKL call per group, with F.linear's bits,
    without a Python call per expert); otherwise one call per group."""
    weight_t = weight.transpose(-2, -1)  # [E, in, out]
    if _can_group(x, weight_t):
        ends = torch.tensor(group_rows, device=x.device).cumsum(0).to(torch.int32)
        return _GROUPED_MM(x, weight_t, offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(group_rows):
        if n:
            torch.mm(x[start : start + n], weight[e].t(), out=out[start : start + n])  # F.linear's bits
            start += n
    return out


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[P, 2I] (gate | up) -> silu(gate) * up [P, I], transformers' ``act_fn(gate) * up``, each row's silu with the
    bits it has alone (invariance.activation: a call torch splits across threads may cut a row, and the vectorised
    silu rounds the cut-off part of that row differently)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(F.silu, gate).mul_(up)


class SparseMoeBlock(nn.Module):
    """The MoE feed-forward of one decoder layer: x [T, H] -> [T, H], one all-reduce under tensor parallelism.

    Built at shard size for `parallel`'s rank (no plan step needed); `load` reads this rank's slices.
    `batch_invariant` (CPU) pads every matmul to a multiple of ROW_MULTIPLE rows so that a token's output does
    not depend on the rest of the batch; without it the block computes transformers' bits exactly (its experts
    run one call per expert over exactly that expert's tokens)."""

    def __init__(
        self, config: MoeConfig, hidden_size: int, parallel: ParallelContext, batch_invariant: bool = True
    ) -> None:
        super().__init__()
        row_multiple = ROW_MULTIPLE if batch_invariant else 1
        self.weight_names = config.weight_names
        self.parallel = parallel
        self.gate = Router(config, hidden_size, row_multiple)
        self.experts = Experts(config, hidden_size, parallel, row_multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.experts(x, self.gate(x)))

    def load(self, reader: CheckpointReader, name: str) -> None:
        """`name`: the block's module path in checkpoint spelling, e.g. ``model.layers.3.mlp`` (as
        loader.load_checkpoint passes it); the family's block name replaces its last part (Mixtral's
        ``block_sparse_moe``)."""
        names, layer = self.weight_names, name.rpartition(".")[0]
        routers = [f"{layer}.{block}.{names.router}.weight" for block in names.blocks]
        router = next((name for name in routers if name in reader), None)
        if router is None:
            raise CheckpointError(f"checkpoint has no MoE router weight ({' or '.join(routers)})")
        self.gate.load(reader, router)
        self.experts.load(reader, router.removesuffix(f".{names.router}.weight"), names)
