"""An exact prefix cache across batches: what the trunk computed for recently scored prefixes, kept per replica
and per rank, so that a sequence starting with a cached prefix computes only its remaining tokens.

Why it is exact: under prefix-stable attention (model/layers/attention_stable.py) and batch-invariant row-wise
layers (model/runtime/invariance.py) a row's bits at every layer depend on its prefix only, and the attention
cuts query blocks at multiples of ``BLOCK`` from each sequence's start. The cache therefore holds whole blocks:
a node of the trie is one ``BLOCK``-token block of a prefix, with the keys and values every layer's attention
saw for its rows (this rank's heads: under tensor parallelism each rank caches its own shard). A sequence whose
first m blocks are cached computes blocks m.. exactly as alone: the same query blocks, against the same keys and
values (those of the cached blocks read from the cache), so the same bits (tests/model/test_prefix_cache.py).

Outputs at cached positions: a node also keeps the final hidden state (the last block's output, before the final
norm) of the rows whose final state its batch computed. The lm_head outputs (logits, log-probs, top-k, ranks,
entropy) and the final layer's hidden states of a cached row are made from it. Hidden states of inner layers are
not kept (they would cost more than the keys and values): a sequence that asks for them at a position reads the
cache only before that position's block, and so does one that needs a final state the cache lacks (the batch
that computes it then stores it in the node). At least one row of every sequence is computed.

Vocabulary products: a node also keeps, per row, what the score reducer made of the whole vocabulary for it and
a later request reuses as it is: the log-sum-exp, the entropy, and the logit of the row's next token (``Products``;
row p's next token is the block's token p + 1, except the last row's, which is the next block's first token and so
differs between sequences: the node keeps it for one token, the first it saw). A cached row whose sequence asks
only for target log-probabilities and entropy takes them from there and runs no lm_head (the runner's
``_cached_vocab_outputs``); the same bits, as the reducer's result depends on the row alone under batch invariance
and the log-probability is the same float32 subtraction of the same two numbers. Rows lacking a product, or asking
for more (logits, top-k, chosen ids, ranks), run the lm_head from the kept final state as before, and fill in what
they computed.

Bytes: each node's tensors are counted exactly (``node_bytes``), the total never exceeds ``capacity``; least
recently used leaves are evicted first (a node's prefix must stay while the node does), and nodes a running batch
matched are pinned until it ends. A cache smaller than one node holds nothing. Every rank makes the same
decisions (same inputs, same node sizes: each rank holds as many heads as the others), so the ranks' batches
stay in step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.layers.attention_stable import BLOCK
from model.layers.modules import RaggedBatch
from model.runtime.invariance import padded_count
from model.runtime.prefix_sharing import SharedPrefixBatch

NEVER = 1 << 62  # a position past any sequence: "no such need"


@dataclass(frozen=True)
class Needs:
    """Where a sequence needs outputs, as positions: from `final` on, rows that need the final hidden state (its
    lm_head rows, final-layer hidden states); from `inner` on, hidden states of an inner layer (0 = embeddings)."""

    final: int = NEVER
    inner: int = NEVER


LSE, ENTROPY, TARGET_LOGIT = range(3)  # rows of Products.values


@dataclass(eq=False)
class Products:
    """A node's vocabulary products per row (see the module's docstring), valid where `has` says."""

    # float32 [3, BLOCK] on the CPU (where outputs go): log-sum-exp, entropy, logit of the row's next token; read
    # and written one row at a time through its numpy view (float32 -> Python float -> float32 keeps the bits)
    values: torch.Tensor
    has: list[list[bool]]  # [3][BLOCK]
    last_target: int = -1  # the next token whose logit TARGET_LOGIT holds for the last row (-1: none yet)

    ID_BYTES = 8  # last_target, counted as an int64

    @classmethod
    def empty(cls) -> Products:
        return cls(torch.zeros(3, BLOCK, dtype=torch.float32), [[False] * BLOCK for _ in range(3)])

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.ID_BYTES

    def target_logit(self, p: int, target: int) -> bool:
        """Whether row p holds the logit of `target` (its next token in the sequence asking)."""
        return self.has[TARGET_LOGIT][p] and (p < BLOCK - 1 or target == self.last_target)

    def keep(self, p: int, target: int, lse: float | None, entropy: float | None, target_logit: float | None) -> None:
        """Row p's products as the reducer computed them (float32 values as Python floats; None: not computed)."""
        view = self.values.numpy()
        for slot, value in ((LSE, lse), (ENTROPY, entropy)):
            if value is not None and not self.has[slot][p]:
                view[slot, p] = value
                self.has[slot][p] = True
        if target_logit is not None and target >= 0 and not self.has[TARGET_LOGIT][p]:
            view[TARGET_LOGIT, p] = target_logit
            self.has[TARGET_LOGIT][p] = True
            if p == BLOCK - 1:
                self.last_target = target


@dataclass(eq=False)
class _Node:
    """One cached block: tokens [BLOCK * depth, BLOCK * (depth + 1)) of the prefix that its ancestors spell."""

    tokens: tuple[int, ...]  # the block's BLOCK tokens: the key under its parent
    parent: _Node | None
    depth: int  # block index
    kv: list[torch.Tensor]  # per layer [2, BLOCK, H, D]: keys and values as the attention reads them
    final: torch.Tensor  # [BLOCK, hidden]: final hidden states, valid where has_final
    has_final: list[bool]
    products: Products | None = None  # None only at the root
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    pins: int = 0

    def keep_products(self, p: int, target: int, lse: float | None, entropy: float | None,
                      target_logit: float | None) -> None:
        """Row p's products from a sequence whose next token there is `target`: its target logit is the row's
        only where that is the block's own next token (a row shared with a sequence that leaves the block's
        tokens after it predicts another), or for the last row, the first next token kept."""
        if p < BLOCK - 1 and target != self.tokens[p + 1]:
            target_logit = None
        self.products.keep(p, target, lse, entropy, target_logit)

    @property
    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for t in self.kv) + self.final.numel() * self.final.element_size()
                + (self.products.nbytes if self.products is not None else 0))


@dataclass
class CachePlan:
    """One batch's use of the cache: the nodes it reads, the nodes it fills, the rows it reads from them."""

    matched: list[list[_Node]]  # per sequence: its path of cached nodes (pinned for the batch)
    hits: list[int]  # per sequence: cached blocks it reads (m)
    used: list[_Node]  # distinct nodes read, in row order: cached row c is used[c // BLOCK] position c % BLOCK
    cached: list[list[int]]  # per sequence: the cached row of each of its first BLOCK * m positions
    new: list[tuple[_Node, int, int]]  # nodes to fill: (node, sequence, block) where the sequence computes it

    @property
    def hit_rows(self) -> int:
        return len(self.used) * BLOCK


class CachedKV:
    """What the attention of every layer reads from the cache (``extend``: the batch's computed keys and values
    followed by the cached ones) and writes into the nodes being filled."""

    def __init__(self, used: Sequence[_Node], new: Sequence[_Node]) -> None:
        self.used = list(used)
        self.new = list(new)
        self.insert_rows: torch.Tensor | None = None  # int64 [BLOCK * len(new)]: unique rows of the new nodes

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, H, D] of the computed rows -> [T + C, H, D] with the cached rows after them."""
        if self.new:
            for i, (kk, vv) in enumerate(zip(k.index_select(0, self.insert_rows).split(BLOCK),
                                             v.index_select(0, self.insert_rows).split(BLOCK))):
                self.new[i].kv[layer][0].copy_(kk)
                self.new[i].kv[layer][1].copy_(vv)
        if not self.used:
            return k, v
        return (torch.cat([k, *(n.kv[layer][0] for n in self.used)]),
                torch.cat([v, *(n.kv[layer][1] for n in self.used)]))


class PrefixCache:
    """A trie of cached blocks, bounded to `capacity` bytes.

    kv_shapes: per layer, the (heads, head_dim) of the keys and values its attention reads on this rank; hidden:
    the hidden size; dtype/device: the model's."""

    def __init__(self, capacity: int, kv_shapes: Sequence[tuple[int, int]], hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.capacity = capacity
        self.kv_shapes = list(kv_shapes)
        self.hidden = hidden
        self.dtype = dtype
        self.device = device
        self.root = _Node((), None, -1, [], torch.empty(0), [])
        self.lru: OrderedDict[_Node, None] = OrderedDict()  # every node, least recently used first
        self.bytes = 0
        element = torch.empty((), dtype=dtype).element_size()
        self.node_bytes = (element * BLOCK * (2 * sum(h * d for h, d in self.kv_shapes) + hidden)
                           + Products.empty().nbytes)

    @classmethod
    def for_model(cls, model, capacity: int) -> PrefixCache:
        """A cache for `model` (a DistributedTransformer) of `capacity` bytes on this rank."""
        shapes = []
        for layer in model.layers:
            attn = layer.self_attn
            heads = len(attn.kv_head_index) if attn.kv_head_index is not None else attn.num_kv_heads
            shapes.append((heads, attn.head_dim))
        weight = model.embed_tokens.weight
        return cls(capacity, shapes, weight.shape[-1], weight.dtype, model.parallel.device)

    @property
    def nodes(self) -> int:
        return len(self.lru)

    # ------------------------------------------------------------------ a batch's plan

    def _path(self, seq: Sequence[int]) -> list[_Node]:
        path, node = [], self.root
        for j in range(len(seq) // BLOCK):
            node = node.children.get(tuple(seq[BLOCK * j : BLOCK * (j + 1)]))
            if node is None:
                break
            path.append(node)
        return path

    @staticmethod
    def _hit(path: list[_Node], n: int, needs: Needs) -> int:
        """Cached blocks a sequence of n tokens reads: at least one row computed, no inner-layer hidden state
        asked before the hit's end, every final state it needs there kept."""
        m = min(len(path), (n - 1) // BLOCK, needs.inner // BLOCK)
        for j in range(needs.final // BLOCK, m):
            if not all(path[j].has_final[max(0, needs.final - BLOCK * j):]):
                return j
        return m

    def plan(self, seqs: Sequence[Sequence[int]], needs: Sequence[Needs], fill: bool) -> CachePlan:
        """Match every sequence, pin what it matched, and (with `fill`: the batch runs every layer) make room for
        and allocate the whole blocks it computes that the cache lacks, as far as the capacity allows."""
        matched = [self._path(s) for s in seqs]
        for path in matched:
            for node in path:
                node.pins += 1
        hits = [self._hit(path, len(s), need) for path, s, need in zip(matched, seqs, needs)]
        used, slot = [], {}
        cached = []
        for path, m in zip(matched, hits):
            rows = []
            for node in path[:m]:
                if node not in slot:
                    slot[node] = len(used)
                    used.append(node)
                rows.extend(range(BLOCK * slot[node], BLOCK * (slot[node] + 1)))
            cached.append(rows)
        plan = CachePlan(matched, hits, used, cached, [])
        if fill and self.capacity >= self.node_bytes:
            try:
                self._add_new(plan, seqs)
            except BaseException:  # out of memory allocating a node: the batch holds nothing of the cache
                self.bytes -= self.node_bytes  # the reservation of the node that failed
                self.release(plan, committed=False)
                raise
        return plan

    def _add_new(self, plan: CachePlan, seqs: Sequence[Sequence[int]]) -> None:
        """Reserve and allocate the whole blocks the batch computes that the cache lacks, shallowest first, as far
        as the capacity allows (a block whose prefix is not kept is not kept either)."""
        pending: dict[tuple[int, tuple[int, ...]], _Node] = {}  # (id of parent, tokens) -> new node
        for b, (seq, path) in enumerate(zip(seqs, plan.matched)):
            parent = path[-1] if path else self.root
            for j in range(len(path), len(seq) // BLOCK):
                key = tuple(seq[BLOCK * j : BLOCK * (j + 1)])
                node = pending.get((id(parent), key))
                if node is None:
                    if not self._make_room():
                        break
                    node = self._allocate(key, parent, j)
                    pending[(id(parent), key)] = node
                    plan.new.append((node, b, j))
                parent = node

    def _make_room(self) -> bool:
        """Evict least recently used unpinned leaves until one more node fits; False if it cannot."""
        while self.bytes + self.node_bytes > self.capacity:
            victim = next((n for n in self.lru if not n.children and not n.pins), None)
            if victim is None:
                return False
            self._evict(victim)
        self.bytes += self.node_bytes  # reserved for the node about to be allocated
        return True

    def _evict(self, node: _Node) -> None:
        del node.parent.children[node.tokens]
        del self.lru[node]
        self.bytes -= node.nbytes

    def _allocate(self, tokens: tuple[int, ...], parent: _Node, depth: int) -> _Node:
        kv = [torch.empty(2, BLOCK, h, d, dtype=self.dtype, device=self.device) for h, d in self.kv_shapes]
        final = torch.empty(BLOCK, self.hidden, dtype=self.dtype, device=self.device)
        return _Node(tokens, parent, depth, kv, final, [False] * BLOCK, Products.empty())

    def commit(self, plan: CachePlan) -> None:
        """The batch ran: its new nodes join the trie (a node whose parent could not be filled is dropped), and
        every node it matched or filled becomes the most recently used (leaves before their ancestors, so that
        the least recently used node with no children is always a leaf's turn)."""
        for node, _, _ in plan.new:
            parent = node.parent
            if parent is self.root or parent in self.lru:
                parent.children[node.tokens] = node
                self.lru[node] = None
            else:
                self.bytes -= self.node_bytes
        touched: dict[_Node, None] = {}
        for path in plan.matched:
            for node in reversed(path):
                touched[node] = None
        for node, _, _ in reversed(plan.new):
            if node in self.lru:
                touched[node] = None
        for node in sorted(touched, key=lambda n: -n.depth):
            self.lru.move_to_end(node)

    def release(self, plan: CachePlan, committed: bool) -> None:
        """Unpin what the batch matched; a batch that failed gives its reserved bytes back."""
        for path in plan.matched:
            for node in path:
                node.pins -= 1
        if not committed:
            self.bytes -= self.node_bytes * len(plan.new)

    def clear(self) -> None:
        self.root.children.clear()
        self.lru.clear()
        self.bytes = 0


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.unique(rows, sorted=True, return_inverse=True)


@dataclass
class TrunkResult:
    """What ``cached_trunk`` gives the runner."""

    h: torch.Tensor  # [T or R, dim]: the final block's output for every packed row, or for final_rows, in order
    captured: dict[int, torch.Tensor]  # layer -> [rows, dim], as DistributedTransformer.trunk's
    # int64 [T or R]: which rows of h are one row (the same key: the same prefix, hence the same bits), so that
    # what follows the trunk runs once per distinct row; None: every row is its own
    row_keys: torch.Tensor | None
    shared_tokens: int  # token rows not recomputed because the batch shares their prefix
    cache_hit_tokens: int  # token rows not recomputed because the cache holds them
    # row key -> the cache node holding that row and its position in the block: the rows read from the cache
    # and those this batch computed for nodes it filled or matched (the runner keeps their vocabulary products)
    slots: dict[int, tuple[_Node, int]] = field(default_factory=dict)
    cached_from: int = NEVER  # keys from here on are rows read from the cache (no lm_head run for them yet)


def cached_trunk(
    model,
    cache: PrefixCache | None,
    tokens: torch.Tensor,
    batch: RaggedBatch,
    needs: Sequence[Needs],
    capture: dict[int, torch.Tensor] | None = None,
    depth: int | None = None,
    final_rows: torch.Tensor | None = None,
) -> TrunkResult:
    """``prefix_sharing.shared_trunk`` reading and filling `cache` (None: sharing within the batch only): the same
    arguments, and the keys of the distinct rows of h. needs[b]: where sequence b needs outputs (sequences past
    len(needs), the runner's filler, need none)."""
    depth = len(model.layers) if depth is None else depth
    ids = tokens.tolist()
    seqs = [ids[s:e] for s, e in zip(batch.bounds[:-1], batch.bounds[1:])]
    if cache is None:
        plan = CachePlan([[] for _ in seqs], [0] * len(seqs), [], [[] for _ in seqs], [])
    else:
        needs = list(needs) + [Needs()] * (len(seqs) - len(needs))
        plan = cache.plan(seqs, needs, fill=depth == len(model.layers))
    committed = False
    try:
        kv = CachedKV(plan.used, [node for node, _, _ in plan.new])
        shared = SharedPrefixBatch.build(tokens, batch, plan.cached, kv if plan.used or plan.new else None)
        if shared.shared_tokens == 0 and not plan.used and not plan.new:
            h, captured = model.trunk(tokens, batch, capture, depth, final_rows)
            committed = True
            return TrunkResult(h, captured, None, 0, 0)
        dev = tokens.device
        if plan.new:
            kv.insert_rows = torch.tensor(
                [r for _, b, j in plan.new for r in shared.seq_rows[b][BLOCK * j : BLOCK * (j + 1)]], device=dev)
        computed = shared.num_tokens  # rows >= computed are cached rows computed - N
        index = shared.row_index  # packed row -> unique row
        wanted = index if final_rows is None else index.index_select(0, final_rows)  # [T or R]
        final_unique = _computed_final_rows(index, wanted, computed)
        # Inner layers' rows are computed ones (the hit ends before them); the last layer's come from h below.
        unique_capture, inverses = {}, {}
        for layer, rows in (capture or {}).items():
            if layer != depth:
                unique_capture[layer], inverses[layer] = _unique_rows(index.index_select(0, rows))
        h_fresh, captured = model.trunk(shared.tokens, shared, unique_capture, depth, final_unique)
        captured = {layer: t.index_select(0, inverses[layer]) for layer, t in captured.items()}
        h, where = _final_states(plan, h_fresh, final_unique, wanted, computed)
        if capture and depth in capture:
            captured[depth] = h.index_select(0, capture[depth])
        slots: dict[int, tuple[_Node, int]] = {}
        if depth == len(model.layers) and cache is not None:
            slots = _keep_final_states(plan, shared, where, h_fresh, len(final_unique))
            slots.update((computed + BLOCK * i + p, (node, p)) for i, node in enumerate(plan.used) for p in range(BLOCK))
            cache.commit(plan)
        committed = True
    finally:
        if cache is not None:
            cache.release(plan, committed)
    return TrunkResult(h, captured, wanted, shared.shared_tokens, plan.hit_rows, slots, computed)


def _computed_final_rows(index: torch.Tensor, wanted: torch.Tensor, computed: int) -> torch.Tensor:
    """The computed unique rows whose final state someone reads, padded so that the last block's o_proj and MLP
    run on a multiple of ROW_MULTIPLE rows, as without the cache (rows >= computed come from the cache)."""
    fresh = wanted[wanted < computed]
    final_unique = torch.unique(fresh) if len(fresh) else index[-1:]  # some computed row, read by nobody
    return torch.cat([final_unique, final_unique[-1:].expand(padded_count(len(final_unique)) - len(final_unique))])


def _final_states(plan: CachePlan, h_fresh: torch.Tensor, final_unique: torch.Tensor, wanted: torch.Tensor,
                  computed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each wanted row's final state [len(wanted), dim]: computed (its place in final_unique, h_fresh's rows) or
    read from its cached node; and `where`, unique row -> its row in [h_fresh; cached states]."""
    dev = h_fresh.device
    where = torch.full((computed + plan.hit_rows,), -1, dtype=torch.int64, device=dev)
    where[final_unique] = torch.arange(len(final_unique), device=dev)
    cached_wanted = torch.unique(wanted[wanted >= computed])
    parts = [h_fresh]
    if len(cached_wanted):
        c = (cached_wanted - computed).tolist()
        parts.append(torch.stack([plan.used[r // BLOCK].final[r % BLOCK] for r in c]))
        where[cached_wanted] = len(final_unique) + torch.arange(len(c), device=dev)
    return torch.cat(parts).index_select(0, where.index_select(0, wanted)), where


def _keep_final_states(plan: CachePlan, shared: SharedPrefixBatch, where: torch.Tensor, h_fresh: torch.Tensor,
                       computed_finals: int) -> dict[int, tuple[_Node, int]]:
    """Store in the nodes the batch filled or matched the final states it computed for their rows; returns the
    key of each of those rows -> (node, position in its block)."""
    where = where.tolist()
    jobs = [(node, b, j) for node, b, j in plan.new]
    for b, (path, m) in enumerate(zip(plan.matched, plan.hits)):
        jobs.extend((node, b, node.depth) for node in path[m:])  # matched, computed here
    slots: dict[int, tuple[_Node, int]] = {}
    for node, b, j in jobs:
        rows = shared.seq_rows[b][BLOCK * j : BLOCK * (j + 1)]
        slots.update((r, (node, p)) for p, r in enumerate(rows))
        if all(node.has_final):
            continue
        for p, r in enumerate(rows):
            at = where[r]
            if not node.has_final[p] and 0 <= at < computed_finals:
                node.final[p].copy_(h_fresh[at])
                node.has_final[p] = True
    return slots
