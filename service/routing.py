"""Cache-aware routing (SGLang's cache-aware router): which replica a request goes to when there are several.

Every replica keeps an exact prefix cache of what it scored (--prefix-cache-bytes); the front end cannot see it, so
the router keeps, per replica, an approximate copy: a token trie (`ShadowTree`) of the sequences it dispatched
there, holding at most as many tokens as the replica's byte limit does at `cached_token_bytes` a token, least
recently used dropped first, and emptied when the replica restarts (its cache starts empty).

SGLang sends a request to the worker with the longest prefix match unless the load is imbalanced by more than a
threshold, then to the least loaded. Here the threshold is the work itself: a request is placed on the ready replica
where it would finish first, that replica's pending work (the uncached tokens of the batches it holds) plus the
request's tokens it has not cached. So the replica holding a prefix gets the request unless it is busier by more
than the tokens its cache saves; with nothing cached anywhere that is the least busy one, and between equals the one
whose cache holds the fewest tokens, so that distinct prefixes spread over the replicas' caches instead of all
evicting one. A request whose best replica has no free slot waits for it (the batcher places the next one
meanwhile), and a batch takes only requests that no other replica caches more of.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .workers.protocol import Batch

# The shadow tree spends about 150 bytes of front-end memory a token; a bound whatever the replica's byte limit.
MAX_SHADOW_TOKENS = 1 << 18


def cached_token_bytes(config, dtype: str) -> int:
    """Bytes the replica's prefix cache keeps for one token: every layer's keys and values, all ranks' shards
    together, in the dtype of the weights (model.families.config.ModelConfig; dtype as torch names it)."""
    itemsize = getattr(torch, dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


@dataclass(eq=False)
class _Node:
    parent: _Node | None
    token: int
    last_used: int = 0
    children: dict[int, _Node] = field(default_factory=dict)


class ShadowTree:
    """The token prefixes one replica was sent, at most `capacity` tokens (one node a token), least recently used
    leaves evicted first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0  # tokens (nodes below the root)
        self._root = _Node(None, -1)
        self._clock = itertools.count(1)

    def match(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the tree holds."""
        node, n = self._root, 0
        for t in tokens:
            node = node.children.get(t)
            if node is None:
                break
            n += 1
        return n

    def insert(self, tokens: list[int]) -> None:
        """Record `tokens` as just scored (a sequence longer than the capacity: its leading `capacity` tokens)."""
        now = next(self._clock)
        node = self._root
        for t in tokens[: self.capacity]:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node(node, t)
                self.size += 1
            child.last_used = now
            node = child
        if self.size > self.capacity:
            self._evict(self.size - self.capacity)

    def clear(self) -> None:
        self._root.children.clear()
        self.size = 0

    def _evict(self, count: int) -> None:
        """Drop `count` tokens, least recently used leaves first (a parent becomes a leaf once its children go)."""
        leaves, stack = [], [self._root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if child.children:
                    stack.append(child)
                else:
                    leaves.append((child.last_used, id(child), child))
        heapq.heapify(leaves)
        while count > 0 and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.token]
            self.size -= 1
            count -= 1
            if parent is not self._root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))


@dataclass
class Route:
    """A batch's replica and the work it was counted as there (released when the batch is answered)."""

    replica: object  # workers.Replica
    work: int  # the batch's tokens that replica had not cached
    restarts: int  # the replica's restarts when the batch was sent


class PrefixRouter:
    """Per-replica shadow trees and pending work; owned by the batcher's task (no locking)."""

    def __init__(self, config, enabled: bool = True):
        self.config = config
        self.enabled = enabled
        self._trees: dict[int, ShadowTree] = {}
        self._restarts: dict[int, int] = {}
        self._pending: dict[int, int] = {}

    def _tree(self, replica) -> ShadowTree | None:
        """The replica's shadow tree, emptied if it restarted since; None where it keeps no cache."""
        loaded = replica.loaded
        if loaded is None or not loaded.prefix_cache_bytes:
            return None
        tree = self._trees.get(replica.index)
        if tree is None or self._restarts[replica.index] != replica.restarts:
            capacity = min(MAX_SHADOW_TOKENS,
                           loaded.prefix_cache_bytes // cached_token_bytes(self.config, loaded.dtype))
            tree = self._trees[replica.index] = ShadowTree(capacity)
            self._restarts[replica.index] = replica.restarts
            self._pending[replica.index] = 0
        return tree

    def _caching(self, pool) -> list:
        """The ready replicas that keep a prefix cache."""
        return [r for r in pool.replicas if r.state == "ready" and self._tree(r) is not None]

    def active(self, pool) -> bool:
        """Whether requests are placed by their cached prefixes: routing is on and several replicas cache."""
        return self.enabled and len(self._caching(pool)) > 1

    def _uncached(self, replica, seqs: list[list[int]]) -> int:
        tree = self._trees[replica.index]
        return sum(len(s) - tree.match(s) for s in seqs)

    def place(self, pool, waiting: list) -> tuple[int, object] | None:
        """The first of the `waiting` requests ((queue index, Work) in arrival order) whose best replica (where it
        would finish first: the module docstring) has a free slot, and that replica; None if every one waits."""
        replicas = self._caching(pool)
        for index, work in waiting:
            seqs = _sequences(work)
            best = min(replicas, key=lambda r: (self._pending[r.index] + self._uncached(r, seqs),
                                                self._trees[r.index].size, len(r.inflight), r.index))
            if best.free_slots > 0:
                return index, best
        return None

    def joiner(self, pool, replica, first) -> Callable[[object], bool]:
        """For a batch being formed for `replica` from the Work `first`: a predicate, asked of each further queued
        request that fits the batch, whether it joins (it is then counted as taken). It joins unless another ready
        replica would finish it sooner (counting the batch formed so far as pending here) and either caches a
        different part of it (it waits for that replica, as `place` would) or is free (it takes the request next)."""
        others = [r for r in self._caching(pool) if r is not replica]
        forming = self._uncached(replica, _sequences(first))

        def joins(work) -> bool:
            nonlocal forming
            seqs = _sequences(work)
            here = self._uncached(replica, seqs)
            cost = self._pending[replica.index] + forming + here
            for r in others:
                there = self._uncached(r, seqs)
                if self._pending[r.index] + there < cost and (there != here or r.free_slots > 0):
                    return False
            forming += here
            return True

        return joins

    def dispatched(self, replica, batch: Batch) -> Route:
        """The batch was sent: its work waits on the replica, its sequences are (approximately) in the replica's
        cache from now on."""
        tree = self._tree(replica) if self.enabled else None
        if tree is None:
            return Route(replica, 0, replica.restarts)
        seqs = _split(batch.input_ids.tolist(), np.diff(batch.offsets).tolist())
        route = Route(replica, self._uncached(replica, seqs), replica.restarts)
        self._pending[replica.index] += route.work
        for s in seqs:
            tree.insert(s)
        return route

    def answered(self, route: Route) -> None:
        """The batch was answered or failed: its work no longer waits on the replica."""
        index = route.replica.index
        if route.work and self._restarts.get(index) == route.restarts:
            self._pending[index] -= route.work


def _sequences(work) -> list[list[int]]:
    """A queued request's (batcher.Work) sequences."""
    return _split(work.input_ids.tolist(), work.lengths)


def _split(ids: list[int], lengths: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in lengths:
        out.append(ids[start : start + n])
        start += n
    return out
