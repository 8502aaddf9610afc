"""How sequences are packed: the token-budget rule that groups requests into batches, and the ragged layout the
model reads (ids of every sequence concatenated, offsets [B+1]). The batcher, the benchmarks and the tests all
pack through here, so that a change of rule is made once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def fits(batch_tokens: int, tokens: int, budget: int, batch_bytes: int = 0, nbytes: int = 0,
         bytes_budget: int | None = None) -> bool:
    """Whether an item of `tokens` (whose results take `nbytes`) joins a batch that holds `batch_tokens` and
    `batch_bytes`: whole items up to the token `budget` and the result `bytes_budget` (full-vocabulary logits make
    a few tokens' results large), and an item larger than either runs alone (an empty batch takes anything)."""
    if batch_tokens == 0:
        return True
    return batch_tokens + tokens <= budget and (bytes_budget is None or batch_bytes + nbytes <= bytes_budget)


def budget_batches(sizes: Iterable[int], budget: int) -> list[list[int]]:
    """Indices of items of these token counts, packed in arrival order into batches by `fits`."""
    batches: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(sizes):
        if not batches or not fits(tokens, n, budget):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += n
    return batches


def row_offsets(lengths: Sequence[int]) -> np.ndarray:
    """int64 [B+1]: where each of B sequences of these lengths starts in the packed ids, and the total last."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def pack_ids(sequences: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [T], offsets int64 [B+1]) of these sequences, concatenated in order."""
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    ids = arrays[0] if len(arrays) == 1 else np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return ids, row_offsets([len(a) for a in arrays])
