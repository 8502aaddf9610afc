"""Prefix-stable causal attention on CPU: a row's output depends only on its own query and on the keys and values
of the rows up to it, never on how many rows follow it or on what else shares the batch.

torch's CPU flash kernel, called once per sequence as transformers does, does not have that property: it walks the
queries in 32-, 64- or 256-row blocks chosen by the call's length, and every block multiplies its softmax weights
by all of the call's keys up to the sequence's end (the masked ones as zeros), so the sums of a row's
``softmax(q.k) v`` run over a number of terms, and in a summation order, that follow the sequence's length. Two
sequences that share a prefix therefore get different bits for the prefix rows, and a prefix could not be computed
once for both.

Here the geometry is fixed by the row alone. Queries go in ``BLOCK``-row blocks aligned at each sequence's
position 0; block j is one flash call of exactly ``BLOCK`` query rows against the keys ``[lo_j, BLOCK * (j + 1))``
(``lo_j`` is 0, or the first key the block's first row sees under a sliding window), with an additive mask for the
causal diagonal (and the window). A sequence's rows are laid out in a zero-padded buffer, so the last block of a
sequence has the same shape as that block of a longer one: the padded rows are masked (weight exactly 0, finite
values), and a row's sums run over the same terms in the same order whatever the sequence's length. The kernel
computes every (sequence, head, 32-row query slice) of a call on its own with the same gemm shapes, so calls batch
the sequences that need block j together (tests/model/test_prefix_stable_attention.py checks both properties bit
for bit). The price: the rows of a partial last block and the masked half of each diagonal block are computed and
dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .modules import RaggedBatch

# Query rows per block. Every block is one flash call of BLOCK query rows; the kernel then walks them in 32-row
# slices against key chunks of 512.
BLOCK = 64


@dataclass(frozen=True)
class BlockLayout:
    """Where the rows of one batch lie in prefix_stable_attention's padded buffers, and which of the buffer's
    sequences compute each query block.

    The buffer holds S sequences of L = BLOCK * (most blocks) rows: slot ``s * L + p`` is position p of buffer
    sequence s. The rows are those of q/k/v: the packed tokens of a plain batch, or the de-duplicated rows of a
    shared-prefix batch (model/prefix_sharing.py), where several slots hold the same row."""

    num_rows: int  # T: rows of q, k, v and of the output
    num_seqs: int  # S
    padded_len: int  # L
    key_slots: torch.Tensor  # int64 [K]: the slots that hold a key/value row (every position of every sequence)
    key_rows: torch.Tensor | None  # int64 [K]: the row in each key slot; None: key_slots[t] holds row t
    query_slots: torch.Tensor  # int64 [Q]: the slots whose query rows a computed block reads
    query_rows: torch.Tensor | None  # int64 [Q]: the row in each query slot; None: query_slots[t] holds row t
    out_slots: torch.Tensor  # int64 [T]: for every row, one computed slot holding its output
    block_seqs: tuple[slice | torch.Tensor, ...]  # per block j: the buffer sequences that compute it

    @classmethod
    def build(cls, seq_rows: list[list[int]], first_blocks: list[int], num_rows: int, device: torch.device) -> BlockLayout:
        """seq_rows[b]: the row of each position of sequence b; first_blocks[b]: its first block to compute (the
        earlier ones are another sequence's: their rows are owned elsewhere). Every row must be owned by one
        computed block of some sequence."""
        blocks = [-(-len(rows) // BLOCK) for rows in seq_rows]
        # Longest first: a plain batch's block j is then computed by buffer sequences [0, count_j), a view.
        order = sorted(range(len(seq_rows)), key=lambda b: (first_blocks[b], -blocks[b]))
        padded_len = BLOCK * max(blocks)
        key_slots, key_rows, query_slots, query_rows = [], [], [], []
        out_slot = [-1] * num_rows
        for s, b in enumerate(order):
            rows, base, first = seq_rows[b], s * padded_len, BLOCK * first_blocks[b]
            key_slots.extend(range(base, base + len(rows)))
            key_rows.extend(rows)
            query_slots.extend(range(base + first, base + len(rows)))
            query_rows.extend(rows[first:])
            for p in range(first, len(rows)):
                if out_slot[rows[p]] < 0:
                    out_slot[rows[p]] = base + p
        if min(out_slot, default=0) < 0:
            raise ValueError("a row is computed by no block")
        block_seqs = []
        for j in range(max(blocks)):
            seqs = [s for s, b in enumerate(order) if first_blocks[b] <= j < blocks[b]]
            contiguous = seqs == list(range(seqs[0], seqs[-1] + 1)) if seqs else True
            block_seqs.append(slice(seqs[0], seqs[-1] + 1) if contiguous and seqs else torch.tensor(seqs, device=device))

        def fill(slots: list[int], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
            """(slots, rows) as index tensors in row order; rows None when they are 0..T-1 (the source as is)."""
            pairs = sorted(zip(rows, slots))
            in_order = [r for r, _ in pairs] == list(range(num_rows))
            slots_t = torch.tensor([s for _, s in pairs], dtype=torch.int64, device=device)
            return slots_t, None if in_order else torch.tensor([r for r, _ in pairs], dtype=torch.int64, device=device)

        key_slots_t, key_rows_t = fill(key_slots, key_rows)
        query_slots_t, query_rows_t = fill(query_slots, query_rows)
        return cls(
            num_rows=num_rows,
            num_seqs=len(order),
            padded_len=padded_len,
            key_slots=key_slots_t,
            key_rows=key_rows_t,
            query_slots=query_slots_t,
            query_rows=query_rows_t,
            out_slots=torch.tensor(out_slot, dtype=torch.int64, device=device),
            block_seqs=tuple(block_seqs),
        )

    @classmethod
    def for_ragged(cls, batch: RaggedBatch) -> BlockLayout:
        """A plain packed batch: sequence b's position p is token row bounds[b] + p."""
        return _ragged_layout(batch.bounds, batch.offsets.device)


@functools.lru_cache(maxsize=8)  # one per batch; every layer asks again
def _ragged_layout(bounds: tuple[int, ...], device: torch.device) -> BlockLayout:
    rows = [list(range(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]
    return BlockLayout.build(rows, [0] * len(rows), bounds[-1], device)


def block_keys(j: int, window: int | None) -> tuple[int, int]:
    """The key positions [lo, hi) that query block j is computed against (a function of j and the window only)."""
    hi = BLOCK * (j + 1)
    lo = max(0, BLOCK * j - window + 1) if window else 0
    return lo, hi


@functools.lru_cache(maxsize=512)
def block_mask(j: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [BLOCK, hi - lo] of block j: 0 where query row i sees key c (c <= i, i - c < window), -inf
    elsewhere (padded rows included: they are never seen by a real row)."""
    lo, hi = block_keys(j, window)
    i = torch.arange(BLOCK * j, BLOCK * (j + 1), device=device)[:, None]
    c = torch.arange(lo, hi, device=device)[None, :]
    visible = (c <= i) & ((i - c < window) if window else True)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def layout_of(batch) -> BlockLayout:
    """The BlockLayout of what Attention.forward passes on as `batch`: a RaggedBatch, or an object that carries its
    layout (model.prefix_sharing.SharedPrefixBatch)."""
    layout = getattr(batch, "block_layout", None)
    return layout if layout is not None else BlockLayout.for_ragged(batch)


def _fill(rows_src: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None, layout: BlockLayout) -> torch.Tensor:
    """[S, L, H, D] zeros with `rows_src`'s rows (of [T, H, D]) copied into their slots."""
    buf = rows_src.new_zeros(layout.num_seqs * layout.padded_len, *rows_src.shape[1:])
    buf.index_copy_(0, slots, rows_src if rows is None else rows_src.index_select(0, rows))
    return buf.view(layout.num_seqs, layout.padded_len, *rows_src.shape[1:])


def prefix_stable_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, scale: float, window: int | None
) -> torch.Tensor:
    """``modules.ragged_attention``'s contract (q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], causal within each
    sequence, optional sliding window) with prefix-stable bits: see the module docstring. `batch` is a RaggedBatch
    or carries a `block_layout` (shared prefixes)."""
    layout = layout_of(batch)
    gqa = q.shape[1] != k.shape[1]
    qs = _fill(q, layout.query_slots, layout.query_rows, layout)  # [S, L, Hq, D]
    ks = _fill(k, layout.key_slots, layout.key_rows, layout)  # [S, L, Hkv, D]
    vs = _fill(v, layout.key_slots, layout.key_rows, layout)
    out = q.new_empty(layout.num_seqs, layout.padded_len, *q.shape[1:])  # only computed blocks are read back
    for j, seqs in enumerate(layout.block_seqs):
        lo, hi = block_keys(j, window)
        rows = slice(BLOCK * j, hi)
        # [count, H, BLOCK or hi - lo, D] views (a slice of sequences) or gathers (an index of sequences)
        qb, kb, vb = qs[seqs, rows].transpose(1, 2), ks[seqs, lo:hi].transpose(1, 2), vs[seqs, lo:hi].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=block_mask(j, window, q.dtype, q.device), scale=scale, enable_gqa=gqa
        )
        out[seqs, rows] = o.transpose(1, 2)
    return out.view(-1, *q.shape[1:]).index_select(0, layout.out_slots)
