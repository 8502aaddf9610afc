"""Batch invariance on CPU: a sequence's outputs are the same bits whatever else shares its batch, wherever it sits.

A packed batch runs every sequence's rows through shared kernel calls, and three things in torch's CPU kernels let
a row's bits depend on the call around it (measured on torch 2.13, MKL / oneDNN; docs/batch_invariance.md):

- Matmuls. MKL's sgemm gives a row the bits it has in any other call unless the call's row count is not a multiple of
  4 and under a thread-dependent bound (12 rows at 2 threads, 4 at 1, 3 and 4, 28 at 16): then the last M % 4 rows
  take a kernel that sums in another order. oneDNN (the lm_head) differs at 1 row only. So every matmul of the
  serving path gets a row count that is a multiple of 4 (``ROW_MULTIPLE``): a filler sequence pads the batch's
  tokens (``pad_batch``), duplicate rows pad the last block's row subset and the lm_head's rows (``pad_rows``).
- Element-wise kernels whose vector and scalar code round differently (silu, sigmoid, complex multiply; exp, log,
  tanh, rsqrt, cos and sin round the same in both). torch runs each contiguous run of elements in vector blocks
  and finishes the run's last ``len % block`` elements in scalar code; above 32768 elements it cuts the work into
  one range per thread at offsets that follow the total size, and a cut inside a row starts new runs there.
  ``rowwise`` splits such a call into row blocks whose cuts fall where they change no element's code path.
- Reductions. A reduction with a single output over 32768 elements or more is split across threads (two-pass);
  with several outputs each is summed in one thread. The lm_head's row padding keeps at least 4 rows per call.

Elsewhere the bits already follow the sequence alone: attention is one SDPA call per distinct length whose batch
dimension changes no bit (its query blocks follow the length only), RMSNorm sums each row alone, and top-k, gather
and index_select copy values. Under tensor parallelism the all-reduce of 2 ranks is one commutative addition, but
gloo's ring sums 3 or more ranks in an order that follows an element's offset in the buffer
(``all_reduce_in_rank_order``). Two results followed the neighbours' requests, not kernels: top-k ties
(``top_k_as_alone``) and the log-sum-exp formula (one formula now, ``scores.ScoreReducer._normalizers``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# A matmul whose row count is a multiple of this gives each row the bits it has in any other such call.
ROW_MULTIPLE = 4

# at::internal::GRAIN_SIZE: element-wise work above this many elements is cut into one range per thread.
_GRAIN = 32768
# torch's GELU kernel takes its own grain: above this many elements, numel / threads (one range per thread).
_GELU_PER_THREAD_ABOVE = 6144
# Bytes per vector block, with margin: torch's CPU loops take 2 vectors per step (128 bytes with AVX-512) and
# finish a shorter remainder in scalar code.
_VECTOR_BLOCK_BYTES = 256


def resolve(batch_invariant: bool | None, device: torch.device) -> bool:
    """The switch as it applies: None means on for the CPU, where it was measured and costs nothing noticeable;
    CUDA's kernels need other means (fixed-tile matmuls, see docs/batch_invariance.md)."""
    if batch_invariant is None:
        return device.type == "cpu"
    if batch_invariant and device.type != "cpu":
        raise ValueError(f"batch invariance is implemented for the CPU only, not {device.type}")
    return batch_invariant


def padded_count(n: int, multiple: int = ROW_MULTIPLE) -> int:
    """The row count a matmul over n rows runs with: a multiple of `multiple` (n = 0 stays 0)."""
    return -(-n // multiple) * multiple


def pad_rows(rows: list[int], multiple: int = ROW_MULTIPLE) -> list[int]:
    """``rows`` (token indices) and copies of its last one up to ``padded_count``: the extra rows' results are
    computed and never read. `multiple` 1 leaves them as they are."""
    return rows + rows[-1:] * (padded_count(len(rows), multiple) - len(rows))


def pad_batch(input_ids: torch.Tensor, input_row_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch with a filler sequence appended so that its token count is a multiple of ROW_MULTIPLE.

    The filler (token 0, 1 to 3 tokens) is a sequence of its own: it attends to itself only and changes no other
    sequence's rows; its outputs are never read. input_ids int64 [T]; input_row_offsets int64 [B+1]."""
    total = int(input_row_offsets[-1])
    fill = padded_count(total) - total
    if fill == 0:
        return input_ids, input_row_offsets
    ids = torch.cat([input_ids, input_ids.new_zeros(fill)])
    offsets = torch.cat([input_row_offsets, input_row_offsets.new_tensor([total + fill])])
    return ids, offsets


def _threads_used(numel: int, threads: int, per_thread_grain: bool = False) -> int:
    """How many ranges at::parallel_for cuts numel elements into (OpenMP build: min(threads, numel / grain));
    `per_thread_grain`: the GELU kernel's grain, numel / threads above 6144 elements."""
    grain = _GRAIN
    if per_thread_grain and numel > _GELU_PER_THREAD_ABOVE:
        grain = max(1, numel // threads)
    if threads == 1 or numel < grain:
        return 1
    return min(threads, -(-numel // grain))


def _cuts_keep_runs(numel: int, run: int, element_size: int, threads: int, per_thread_grain: bool = False) -> bool:
    """Whether the per-thread cuts of an element-wise call over numel elements, made of runs of `run` contiguous
    elements, leave every element on the code path (vector or scalar) it takes in an uncut run: a cut must fall on
    a run boundary, or on a vector block boundary inside runs that are whole vector blocks."""
    used = _threads_used(numel, threads, per_thread_grain)
    chunk = -(-numel // used)
    block = _VECTOR_BLOCK_BYTES // element_size
    return all(c % run == 0 or (run % block == 0 and c % block == 0) for c in range(chunk, numel, chunk))


def row_blocks(
    rows: int,
    row_numel: int,
    run: int,
    element_size: int,
    threads: int | None = None,
    per_thread_grain: bool = False,
) -> list[tuple[int, int]]:
    """[start, end) row blocks of an element-wise call over `rows` rows of `row_numel` elements (each row made of
    whole runs of `run` elements) such that no block's thread cuts move an element to another code path. One
    block when the whole call keeps its runs (the usual case: widths that are multiples of 64 at 2 threads)."""
    threads = threads or torch.get_num_threads()
    blocks, start = [], 0
    while start < rows:
        b = rows - start
        while b > 1 and not _cuts_keep_runs(b * row_numel, run, element_size, threads, per_thread_grain):
            used = _threads_used(b * row_numel, threads, per_thread_grain)
            # a multiple of the ranges' count puts every cut at a row start
            b = b - b % used if b > used else b - 1
        blocks.append((start, start + b))
        start += b
    return blocks


def rowwise(op: Callable[..., torch.Tensor], out: torch.Tensor, *inputs: torch.Tensor, run: int) -> torch.Tensor:
    """``op(*inputs, out=out)`` in row blocks (dim 0) that keep every element on its uncut code path; inputs are
    indexed by the same rows (a broadcast input has size 1 there). Returns out."""
    rows = out.shape[0]
    blocks = row_blocks(rows, out[0].numel() if rows else 0, run, out.element_size())
    if len(blocks) == 1:
        return op(*inputs, out=out)
    for a, b in blocks:
        op(*(x[a:b] if x.shape[0] == rows else x for x in inputs), out=out[a:b])
    return out


def activation(
    act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, per_thread_grain: bool = False
) -> torch.Tensor:
    """``act(x)`` (silu, gelu-tanh: element-wise, with torch's vector and scalar code rounding differently) for x
    [T, W] whose rows are rows of a wider tensor (the gate half of a fused gate|up output), each row's elements on
    the code path they take when the row is computed alone: the same bits whatever T. `per_thread_grain`: act is
    torch's GELU, whose kernel cuts its work by another rule (``_threads_used``). Returns a fresh [T, W]."""
    if x.dim() != 2 or x.device.type != "cpu" or x.shape[0] < 2 or torch.compiler.is_compiling():
        return act(x)
    t, w = x.shape
    block = _VECTOR_BLOCK_BYTES // x.element_size()
    if x.stride(-1) != 1 or (x.stride(0) == w and w % block):
        # contiguous rows of an odd width would run as one stretch across rows: give them a row stride
        x = x.new_empty(t, w + 1)[:, :w].copy_(x)
    blocks = row_blocks(t, w, w, x.element_size(), per_thread_grain=per_thread_grain)
    if len(blocks) == 1:
        return act(x)
    out = x.new_empty(t, w)
    for a, b in blocks:
        out[a:b] = act(x[a:b])
    return out


def complex_mul_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` for complex a [T, heads, n] and b [T, 1, n] (rotary): each (row, head) run of n elements on the
    code path it takes alone (torch's vector and scalar complex multiply round differently)."""
    if torch.compiler.is_compiling() or a.device.type != "cpu":
        return a * b
    out = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    return rowwise(torch.mul, out, a, b, run=a.shape[-1])


def top_k_as_alone(
    values: torch.Tensor,
    ids: torch.Tensor,
    row_k: torch.Tensor,
    k_max: int,
    top_k: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row as the row's own k gives it, from a top-k taken with one more than the largest k.

    torch's top-k orders equal values in a way that follows k, and the batch's largest k follows the other
    sequences. Where a row's first k + 1 values are strictly decreasing, its first k entries are the only top-k
    there is; any other row (ties, NaN) is taken again with its own k by ``top_k(row_index, k)``.
    values / ids [R, k_max + 1] (or [R, vocab] when the vocabulary is smaller), sorted; row_k int64 [R], each at
    most k_max (0: no top-k wanted). Returns values and ids [R, k_max]; a row's entries past its k are not
    meaningful."""
    if values.shape[1] > 1:
        falls = values[:, :-1] > values[:, 1:]  # [R, kk - 1]
        within = torch.arange(falls.shape[1], device=values.device)[None, :] < row_k[:, None]
        redo = ((within & ~falls).any(1) & (row_k > 0)).nonzero().squeeze(1)
        if redo.numel():
            values, ids = values.clone(), ids.clone()
            for k in sorted(set(row_k[redo].tolist())):
                rows = redo[row_k[redo] == k]
                v, i = top_k(rows, k)
                values[rows, :k], ids[rows, :k] = v, i
    return values[:, :k_max], ids[:, :k_max]


def all_reduce_in_rank_order(x: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """Sum ``x`` over the ranks as ((x_0 + x_1) + x_2) + ..., in place: every element in the same order, wherever
    it lies in the buffer. An all-gather moves (world - 1) x the data of a ring all-reduce's 2 (world - 1) / world
    share per rank."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    total = parts[0]
    for p in parts[1:]:
        total.add_(p)
    return x.copy_(total)


__all__ = [
    "ROW_MULTIPLE",
    "activation",
    "all_reduce_in_rank_order",
    "complex_mul_rows",
    "pad_batch",
    "pad_rows",
    "padded_count",
    "resolve",
    "row_blocks",
    "rowwise",
    "top_k_as_alone",
]
