"""How sequences are packed: the rule that forms batches out of queued requests, and the ragged layout the model
reads (ids of every sequence concatenated, offsets [B+1]). The batcher (`batcher.Batcher._take`), the benchmarks
and the tests all form batches through `take_batch`, so that a change of rule is made here once.

The rule: a batch starts with the oldest request; then it takes, among the next ``SHARING_LOOKAHEAD`` queued
requests, those whose sequences start with the same ``SHARING_KEY_TOKENS`` tokens as one already taken (the
workers compute a prefix shared within a batch once); then the rest in arrival order. Whole requests only, up to
the token budget and the result-bytes share of a batch (`fits`); a request larger than either runs alone. A
request that the results budget cannot hold yet stops the batch at the head of the queue (so that a large one is
not starved) and is skipped further back. Every batch starts with the oldest request, so a request waits at most
one batch per request queued before it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

# Leading tokens that mark two sequences as sharing a prefix worth grouping (a context's continuations, few-shot
# prompts); shorter sequences are packed in arrival order.
SHARING_KEY_TOKENS = 16
# Queued requests searched for ones that share a prefix with the batch being formed.
SHARING_LOOKAHEAD = 256


def fits(batch_tokens: int, tokens: int, budget: int, batch_bytes: int = 0, nbytes: int = 0,
         bytes_budget: int | None = None) -> bool:
    """Whether an item of `tokens` (whose results take `nbytes`) joins a batch that holds `batch_tokens` and
    `batch_bytes`: whole items up to the token `budget` and the result `bytes_budget` (full-vocabulary logits make
    a few tokens' results large), and an item larger than either runs alone (an empty batch takes anything)."""
    if batch_tokens == 0:
        return True
    return batch_tokens + tokens <= budget and (bytes_budget is None or batch_bytes + nbytes <= bytes_budget)


def prefix_keys(ids: np.ndarray, lengths: Sequence[int]) -> frozenset[bytes]:
    """The first SHARING_KEY_TOKENS tokens of each of these packed sequences that has as many."""
    keys, start = set(), 0
    for n in lengths:
        if n >= SHARING_KEY_TOKENS:
            keys.add(np.asarray(ids[start : start + SHARING_KEY_TOKENS], dtype=np.int64).tobytes())
        start += n
    return frozenset(keys)


class Packable(Protocol):
    """What the rule reads of a queued request."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def result_bytes(self) -> int: ...

    @property
    def prefix_keys(self) -> frozenset[bytes]: ...


Item = TypeVar("Item", bound=Packable)


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # --max-batch-tokens
    max_result_bytes: int | None = None  # results one batch may hold (budget.ResultBudget.batch_limit)
    free_result_bytes: int | None = None  # bytes the results budget can reserve now; None: no budget


@dataclass
class _Forming:
    """The batch being formed: its items and what they add up to."""

    limits: BatchLimits
    items: list = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    tokens: int = 0
    nbytes: int = 0

    def joins(self, item: Packable) -> bool:
        return fits(self.tokens, item.num_tokens, self.limits.max_tokens, self.nbytes, item.result_bytes,
                    self.limits.max_result_bytes)

    def affords(self, item: Packable) -> bool:
        free = self.limits.free_result_bytes
        return free is None or self.nbytes + item.result_bytes <= free

    def add(self, item: Packable) -> None:
        self.items.append(item)
        self.keys |= item.prefix_keys
        self.tokens += item.num_tokens
        self.nbytes += item.result_bytes

    def sharing(self, queue: deque, live: Callable[[Packable], bool]) -> int | None:
        """Queue index of the first live request among the next SHARING_LOOKAHEAD that shares a prefix key with
        the batch and joins it within its budgets; None if there is none."""
        if not self.keys:
            return None
        for i, item in enumerate(itertools.islice(queue, SHARING_LOOKAHEAD)):
            if live(item) and not self.keys.isdisjoint(item.prefix_keys) and self.joins(item) and self.affords(item):
                return i
        return None


def take_batch(queue: deque[Item], limits: BatchLimits, live: Callable[[Item], bool] = lambda _item: True) -> list[Item]:
    """Remove the next batch from `queue` (oldest first) and return it; requests that are no longer `live` (their
    client is gone) are dropped from its head. Empty when the head waits for the results budget."""
    batch = _Forming(limits)
    while queue:
        head = queue[0]
        if not live(head):
            queue.popleft()
            continue
        if not batch.affords(head):
            break  # held back until responses being sent release their bytes
        pick = batch.sharing(queue, live)
        if pick is None:
            if not batch.joins(head):
                break
            pick = 0
        item = queue[pick]
        del queue[pick]
        batch.add(item)
    return batch.items


@dataclass(eq=False)
class _Sequence:
    index: int
    num_tokens: int
    prefix_keys: frozenset[bytes]
    result_bytes: int = 0


def plan_batches(sequences: Sequence[Sequence[int] | np.ndarray], max_batch_tokens: int) -> list[list[int]]:
    """Indices of these sequences, each sent as a request of its own, in the batches the server forms of them
    when all are queued at once (`take_batch`); for benchmarks and tests that run the model in-process."""
    queue = deque(_Sequence(i, len(s), prefix_keys(np.asarray(s), [len(s)])) for i, s in enumerate(sequences))
    batches = []
    while queue:
        batches.append([item.index for item in take_batch(queue, BatchLimits(max_batch_tokens))])
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
