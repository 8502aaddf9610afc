"""Shared-prefix forwards: sequences of one batch that start with the same tokens compute those tokens once.

A token row's hidden states depend only on its own token, its position and the rows before it in its sequence.
Two sequences with a common prefix therefore have the same prefix rows, provided every operation gives a row the
same bits whatever else is computed beside it: the row-wise ones (projections, norms, MLP) under batch-invariant
matmuls, and attention when it is prefix-stable (model/layers/attention_stable.py). Then the batch is de-duplicated
into one row per distinct (prefix, token) -- the nodes of the batch's token trie -- the row-wise layers run on those
rows once, and attention gathers each sequence's rows from them, computing a query block only where the sequence
has rows of its own. The results are the same bits as without sharing and as each sequence alone
(tests/model/test_prefix_stable_attention.py, tests/model/test_prefix_sharing.py).

Not shareable: rotary embeddings whose frequencies follow the sequence's length (dynamic NTK past the trained
context, LongRoPE), where the same prefix row differs between sequences of different lengths; transformers' eager
attention with a soft-cap (Gemma 2), which has no prefix-stable form here; CUDA, whose flash varlen kernel is not
prefix-stable (``numerics.why_not_prefix_stable``). Whether a model shares is decided once, with its attention kind,
by model/runtime/numerics.py.

Extra memory: the attention's padded buffers, one group of at most ``attention_stable.MAX_GROUP_SLOTS`` slots at a
time, hold every sequence's full length (a shared prefix is copied into each sequence's keys); the index tensors
of the trie (O(tokens)); the masks' cache (``attention_stable.MASK_CACHE_BYTES``). The row-wise layers hold fewer
rows than without sharing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.layers.attention_kernels import AttentionKind
from model.layers.attention_stable import BLOCK, BlockLayout
from model.layers.modules import RaggedBatch
from model.runtime.invariance import ROW_MULTIPLE, padded_count
from model.runtime.numerics import why_not_prefix_stable


def _trie_rows(seqs: list[list[int]], cached: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int], int]:
    """Each sequence's rows in the batch's token trie (before renumbering; cached position c is row -1 - c), the
    first query block with a row of its own per sequence, and the number of computed rows."""
    arrays = [np.asarray(seq, dtype=np.int64) for seq in seqs]
    # In lexicographic order, a sequence's longest common prefix with any earlier sequence is the one with
    # its predecessor: the rows of that prefix exist already, the rest are new trie nodes. A cached position
    # is row -1 - c here; a sequence takes its predecessor's row only where that one is computed (a sequence
    # reads the cache no further than its own hit, which may be shorter than its predecessor's).
    order = sorted(range(len(seqs)), key=seqs.__getitem__)
    trie_rows: list[list[int]] = [[] for _ in seqs]
    first_blocks = [0] * len(seqs)
    count = 0
    for prev, b in zip([None, *order], order):
        n, m = len(seqs[b]), len(cached[b])
        shared = 0 if prev is None else _common_prefix(arrays[prev], arrays[b])
        mp = 0 if prev is None else len(cached[prev])
        reuse_lo = min(n, max(m, mp))  # [m, reuse_lo): new (the predecessor reads these from the cache)
        reuse_hi = max(reuse_lo, min(shared, n))  # [reuse_lo, reuse_hi): the predecessor's computed rows
        rows = [-1 - c for c in cached[b]]
        rows += range(count, count + reuse_lo - m)
        count += reuse_lo - m
        rows += trie_rows[prev][reuse_lo:reuse_hi] if reuse_hi > reuse_lo else []
        rows += range(count, count + n - reuse_hi)
        count += n - reuse_hi
        trie_rows[b] = rows
        # Query blocks without a row of its own are skipped: their rows are an earlier sequence's or cached
        # (all of them, for a sequence that another one contains).
        first_new = m if reuse_lo > m else reuse_hi
        first_blocks[b] = first_new // BLOCK if first_new < n else -(-n // BLOCK)
    return trie_rows, first_blocks, count


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class SharedPrefixBatch:
    """A ragged batch de-duplicated along its token trie. Stands in for the RaggedBatch that the trunk and the
    attention see (positions(), seq_lens, block_layout): the trunk then runs on the U unique rows.

    With a prefix cache (model/runtime/prefix_cache.py) a sequence's first positions may be cached rows: their
    keys and values come from the cache (`cached_kv`, appended after the computed rows as rows
    [num_tokens, num_tokens + C)), and no block of the batch computes them."""

    tokens: torch.Tensor  # int64 [N]: token of each unique row, then of the filler rows (N = num_tokens)
    row_positions: torch.Tensor  # int64 [N]: its position in every sequence that holds it
    row_index: torch.Tensor  # int64 [T]: packed token row -> unique row (>= N: cached row N + c)
    seq_rows: tuple[tuple[int, ...], ...]  # per sequence (batch order): the unique row of each position
    seq_lens: list[int]  # the sequences' lengths (as RaggedBatch.seq_lens)
    unique_rows: int  # U: the trie's computed nodes; rows [U, num_tokens) are filler
    block_layout: BlockLayout  # the prefix-stable attention's geometry over the unique rows and the filler
    cached_rows: int = 0  # C: distinct cached rows the batch reads
    cached_kv: Any = None  # the cache's keys and values per layer (prefix_cache.CachedKV); None: no cache

    @property
    def num_tokens(self) -> int:
        """Rows the trunk runs on: the unique rows and the filler, a multiple of ROW_MULTIPLE."""
        return int(self.tokens.shape[0])

    @property
    def shared_tokens(self) -> int:
        """Token rows not recomputed thanks to the batch's own sharing: packed rows minus distinct rows (computed
        or cached)."""
        return int(self.row_index.shape[0]) - self.unique_rows - self.cached_rows

    def positions(self) -> torch.Tensor:
        return self.row_positions

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        batch: RaggedBatch,
        cached: Sequence[Sequence[int]] = (),
        cached_kv: Any = None,
    ) -> SharedPrefixBatch:
        """input_ids int64 [T] packed as `batch` says. cached[b] (optional): the cached row c (0 <= c < C, rows of
        `cached_kv`) of each of sequence b's first positions, a whole number of blocks, and fewer than its length;
        equal prefixes must name equal rows."""
        ids = input_ids.tolist()
        seqs = [ids[s:e] for s, e in zip(batch.bounds[:-1], batch.bounds[1:])]
        cached = list(cached) or [()] * len(seqs)
        trie_rows, first_blocks, count = _trie_rows(seqs, cached)
        # Number the unique rows in order of first appearance in the packed batch: no sharing is then the identity.
        renumber: dict[int, int] = {}
        for rows in trie_rows:
            for r in rows:
                if r >= 0:
                    renumber.setdefault(r, len(renumber))
        # Filler rows (token 0, a sequence of their own, read by nobody) make the row count a multiple of
        # ROW_MULTIPLE, so that the row-wise matmuls give every row the bits it has without sharing.
        filler = tuple(range(count, padded_count(count)))
        num_rows = count + len(filler)
        seq_rows = tuple(tuple(renumber[r] if r >= 0 else num_rows - 1 - r for r in rows) for rows in trie_rows)
        layout_rows = [list(r) for r in seq_rows] + ([list(filler)] if filler else [])
        layout_first = first_blocks + ([0] if filler else [])
        tokens, positions = [0] * num_rows, [*([0] * count), *range(len(filler))]
        for b, (seq, rows) in enumerate(zip(seqs, seq_rows)):
            for p in range(len(cached[b]), len(rows)):
                r = rows[p]
                tokens[r], positions[r] = seq[p], p
        device = batch.offsets.device
        flat = [r for rows in seq_rows for r in rows]
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.int64, device=device),
            row_positions=torch.tensor(positions, dtype=torch.int64, device=device),
            row_index=torch.tensor(flat, dtype=torch.int64, device=device),
            seq_rows=seq_rows,
            seq_lens=list(batch.seq_lens),
            unique_rows=count,
            block_layout=BlockLayout.build(layout_rows, layout_first, num_rows, device),
            cached_rows=len({r for rows in cached for r in rows}),
            cached_kv=cached_kv,
        )


def supports_sharing(model) -> bool:
    """Whether `model` (a DistributedTransformer) could share prefixes had it been built with prefix-stable
    attention: on the CPU, not the soft-capped eager attention, rotary tables that depend on a row's position only
    (numerics.why_not_prefix_stable)."""
    return why_not_prefix_stable(model.config, model.parallel.device) is None


def can_share(model) -> bool:
    """Whether a row's hidden states depend only on its prefix in this model: it was built with the prefix-stable
    attention in every layer (its numerics say so; resolve_numerics chose it only where the rotary frequencies do
    not follow the sequence's length)."""
    return model.numerics.attention == AttentionKind.PREFIX_STABLE


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows int64 [R] -> (distinct rows [R'] ascending, inverse [R]: rows == distinct[inverse])."""
    return torch.unique(rows, sorted=True, return_inverse=True)


def shared_trunk(
    model,
    tokens: torch.Tensor,
    batch: RaggedBatch,
    capture: dict[int, torch.Tensor] | None = None,
    depth: int | None = None,
    final_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """``DistributedTransformer.trunk`` with shared prefixes computed once: the same arguments (`capture` and
    `final_rows` index packed token rows) and the same results, plus the count of token rows not recomputed.

    Requires `can_share(model)`; the results are then the bits of the unshared trunk when the row-wise layers are
    batch-invariant. A batch with no common prefix runs the plain trunk."""
    shared = SharedPrefixBatch.build(tokens, batch)
    if shared.shared_tokens == 0:
        h, captured = model.trunk(tokens, batch, capture, depth, final_rows)
        return h, captured, 0
    index = shared.row_index  # packed row -> unique row
    depth = len(model.layers) if depth is None else depth
    if final_rows is None:
        final_unique, final_inverse = None, index
    else:
        final_unique, final_inverse = _unique_rows(index.index_select(0, final_rows))
        # The last block's o_proj and MLP run on these rows: a multiple of ROW_MULTIPLE of them, as without sharing
        # (copies of the last one, computed and not read).
        final_unique = torch.cat([final_unique, final_unique[-1:].expand(padded_count(len(final_unique)) -
                                                                        len(final_unique))])
    unique_capture, inverses = {}, {}
    for layer, rows in (capture or {}).items():
        # capture[depth] indexes into final_rows when those are given (DistributedTransformer.trunk): its unique
        # rows are then positions in final_unique.
        into = final_inverse if layer == depth and final_rows is not None else index
        unique_capture[layer], inverses[layer] = _unique_rows(into.index_select(0, rows))
    h, captured = model.trunk(shared.tokens, shared, unique_capture, depth, final_unique)
    h = h.index_select(0, final_inverse)  # [T or R, dim], packed order
    captured = {layer: t.index_select(0, inverses[layer]) for layer, t in captured.items()}
    return h, captured, shared.shared_tokens
