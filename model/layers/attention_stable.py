"""Prefix-stable causal attention on CPU: a row's output depends only on its own query and on the keys and values
of the rows up to it, never on how many rows follow it or on what else shares the batch.

torch's CPU flash kernel, called once per sequence as transformers does, does not have that property: it walks the
queries in 32-, 64- or 256-row blocks chosen by the call's length, and each block's chunk of up to 512 keys runs to
the sequence's end (the masked keys as zeros, the keys past the last multiple of the vector width through a scalar
exp), so the sums of a row's ``softmax(q.k) v`` run over a number of terms, and in an order, that follow the
sequence's length. Two sequences that share a prefix get different bits for the prefix rows, and a prefix could not
be computed once for both. For the same reason no prefix-stable attention can give every sequence transformers'
bits: a row's bits there change with the length of the sequence it ends up in.

Here the geometry is fixed by the row alone. Queries go in ``BLOCK``-row blocks aligned at each sequence's
position 0; block j is one flash call of exactly ``BLOCK`` query rows against the keys ``[lo_j, BLOCK * (j + 1))``
(``lo_j`` is 0, or the first key the block's first row sees under a sliding window), with an additive mask for the
causal diagonal (and the window). A sequence's rows are laid out in a padded buffer (the padding repeats its last
row), so the last block of a sequence has the same shape as that block of a longer one: the padded rows are masked
(weight exactly 0, finite values), and a row's sums run over the same terms in the same order whatever the sequence's length. The kernel
computes every (sequence, head, 32-row query slice) of a call on its own with the same gemm shapes, so calls batch
the sequences that need block j together (tests/model/test_prefix_stable_attention.py checks both properties bit
for bit). The price: the rows of a partial last block and the masked half of each diagonal block are computed and
dropped.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.layers.modules import RaggedBatch

# Query rows per block. Every block is one flash call of BLOCK query rows (the kernel walks them in 32-row slices
# against key chunks of 512). 64 is the kernel's own block for 192-767-token calls; other sizes were measured no
# closer to transformers' logits (bench/prefix_sharing.py accuracy) and 32 doubles the calls.
BLOCK = 64


# Most slots (padded rows) one group of buffers holds: the attention allocates one group's q/k/v/out buffers at a
# time, so its extra memory is at most this many rows of q, k, v and out (the default model: 6 KiB a slot, 48 MiB),
# or one sequence's padded length where a single sequence is longer. Splitting a group changes no bit (the kernel
# computes every sequence of a call on its own).
MAX_GROUP_SLOTS = 8192


@dataclass(frozen=True)
class BufferGroup:
    """Sequences of similar block counts that share one rectangular [S, L, H, D] set of padded buffers, and where
    their rows come from and go to. Slot ``s * L + p`` is position p of the group's sequence s."""

    num_seqs: int  # S
    padded_len: int  # L = BLOCK * (the group's most blocks)
    slot_rows: torch.Tensor  # int64 [S * L]: the row of k/v each slot holds; past a sequence's end, its last row
    # int64 [S * L]: the row of q each slot holds. The same as slot_rows unless k/v have rows past q's (a prefix
    # cache's, model/runtime/prefix_cache.py): those slots lie in blocks nobody computes here, and take the
    # sequence's last row (read by no call).
    query_slot_rows: torch.Tensor
    out_rows: torch.Tensor  # int64 [O]: the rows whose output this group computes (each row in one group only)
    out_slots: torch.Tensor  # int64 [O]: the slot holding each one's output

    @property
    def num_slots(self) -> int:
        return self.num_seqs * self.padded_len


@dataclass(frozen=True)
class BlockCall:
    """One flash call: query block `block` of the sequences `seqs` of group `group`."""

    block: int
    group: int
    seqs: slice | torch.Tensor  # indices into the group's sequences: a slice (views) or an index (gathers)


@dataclass(frozen=True)
class BlockLayout:
    """Where the rows of one batch lie in prefix_stable_attention's padded buffers, and the flash calls over them.

    The buffers hold every sequence padded to whole blocks, in groups whose block counts are within a factor
    of two (``BufferGroup``) and of at most ``MAX_GROUP_SLOTS`` slots: one group per batch would make a batch of one
    long and many short sequences pay the long one's length for every short one, and would hold the whole batch's
    padded copy of q/k/v at once. The rows are those of q/k/v: the packed tokens of a plain batch, or the
    de-duplicated rows of a shared-prefix batch (model/runtime/prefix_sharing.py), where several slots hold the same row."""

    num_rows: int  # T: rows of q and of the output; k and v may have more (cached rows, read only as keys)
    groups: tuple[BufferGroup, ...]
    calls: tuple[BlockCall, ...]

    @property
    def num_slots(self) -> int:
        return sum(g.num_slots for g in self.groups)

    @property
    def max_group_slots(self) -> int:
        """The slots of the largest group: the attention's buffers hold this many rows at a time."""
        return max((g.num_slots for g in self.groups), default=0)

    @classmethod
    def build(
        cls,
        seq_rows: list[list[int]],
        first_blocks: list[int],
        num_rows: int,
        device: torch.device,
        max_group_slots: int = MAX_GROUP_SLOTS,
    ) -> BlockLayout:
        """seq_rows[b]: the row of each position of sequence b; first_blocks[b]: its first block to compute (the
        earlier ones are another sequence's, or a prefix cache's: their rows are owned elsewhere). Every row below
        `num_rows` must be owned by one computed block of some sequence; rows from `num_rows` on are k/v rows only
        (a prefix cache's keys and values, appended after the computed rows), never in a computed block."""
        blocks = [-(-len(rows) // BLOCK) for rows in seq_rows]
        by_size: dict[int, list[int]] = {}
        for b in range(len(seq_rows)):
            by_size.setdefault((blocks[b] - 1).bit_length(), []).append(b)  # 1, 2, 3-4, 5-8, ... blocks
        owned = [False] * num_rows
        groups, calls = [], []
        for members in by_size.values():
            # Longest first: a plain batch's block j is then computed by the group's sequences [0, count_j), a view.
            order = sorted(members, key=lambda b: (first_blocks[b], -blocks[b]))
            while order:
                take = max(1, max_group_slots // (BLOCK * max(blocks[b] for b in order)))
                part, order = order[:take], order[take:]
                padded_len = BLOCK * max(blocks[b] for b in part)
                group = _group(part, seq_rows, first_blocks, padded_len, owned, num_rows, device)
                for j in range(padded_len // BLOCK):
                    seqs = [s for s, b in enumerate(part) if first_blocks[b] <= j < blocks[b]]
                    if not seqs:
                        continue
                    contiguous = seqs == list(range(seqs[0], seqs[-1] + 1))
                    index = slice(seqs[0], seqs[-1] + 1) if contiguous else torch.tensor(seqs, device=device)
                    calls.append(BlockCall(j, len(groups), index))
                groups.append(group)
        if not all(owned):
            raise ValueError("a row is computed by no block")
        return cls(num_rows=num_rows, groups=tuple(groups), calls=tuple(calls))

    @classmethod
    def for_ragged(cls, batch: RaggedBatch) -> BlockLayout:
        """A plain packed batch: sequence b's position p is token row bounds[b] + p."""
        return _ragged_layout(batch.bounds, batch.offsets.device)


def _group(
    part: list[int],
    seq_rows: list[list[int]],
    first_blocks: list[int],
    padded_len: int,
    owned: list[bool],
    num_rows: int,
    device: torch.device,
) -> BufferGroup:
    """The buffer group of sequences `part` (in slot order); marks the rows whose output it computes in `owned`."""
    slot_rows, out_rows, out_slots = [], [], []
    query_slot_rows: list[int] = []
    for s, b in enumerate(part):
        rows, base = seq_rows[b], s * padded_len
        # Past the sequence's end its slots repeat its last row: finite values under a -inf mask, which add exact
        # zeros to every sum (and depend on the sequence alone).
        slot_rows.extend(rows)
        slot_rows.extend([rows[-1]] * (padded_len - len(rows)))
        query_slot_rows.extend(r if r < num_rows else rows[-1] for r in rows)
        query_slot_rows.extend([rows[-1]] * (padded_len - len(rows)))
        for p in range(BLOCK * first_blocks[b], len(rows)):
            if not owned[rows[p]]:
                owned[rows[p]] = True
                out_rows.append(rows[p])
                out_slots.append(base + p)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    slots = tensor(slot_rows)
    query_slots = slots if query_slot_rows == slot_rows else tensor(query_slot_rows)
    return BufferGroup(len(part), padded_len, slots, query_slots, tensor(out_rows), tensor(out_slots))


@functools.lru_cache(maxsize=8)  # one per batch; every layer asks again
def _ragged_layout(bounds: tuple[int, ...], device: torch.device) -> BlockLayout:
    rows = [list(range(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]
    return BlockLayout.build(rows, [0] * len(rows), bounds[-1], device)


def block_keys(j: int, window: int | None) -> tuple[int, int]:
    """The key positions [lo, hi) that query block j is computed against (a function of j and the window only)."""
    hi = BLOCK * (j + 1)
    lo = max(0, BLOCK * j - window + 1) if window else 0
    return lo, hi


# Bytes of masks kept for the next layer and batch. Block j's mask is [BLOCK, BLOCK (j + 1)] (16 KiB (j + 1) in
# float32): the masks of every block of an 8192-token sequence would take 135 MB, so only recent ones stay.
MASK_CACHE_BYTES = 32 << 20
_masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def block_mask(j: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [BLOCK, hi - lo] of block j: 0 where query row i sees key c (c <= i, i - c < window), -inf
    elsewhere (padded rows included: they are never seen by a real row). Least recently used masks are dropped past
    MASK_CACHE_BYTES."""
    key = (j, window, dtype, device)
    mask = _masks.get(key)
    if mask is not None:
        _masks.move_to_end(key)
        return mask
    lo, hi = block_keys(j, window)
    i = torch.arange(BLOCK * j, BLOCK * (j + 1), device=device)[:, None]
    c = torch.arange(lo, hi, device=device)[None, :]
    visible = (c <= i) & ((i - c < window) if window else True)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    _masks[key] = mask
    while mask_cache_bytes() > MASK_CACHE_BYTES and len(_masks) > 1:
        _masks.popitem(last=False)
    return mask


def mask_cache_bytes() -> int:
    return sum(m.numel() * m.element_size() for m in _masks.values())


def layout_of(batch) -> BlockLayout:
    """The BlockLayout of what Attention.forward passes on as `batch`: a RaggedBatch, or an object that carries its
    layout (model.runtime.prefix_sharing.SharedPrefixBatch)."""
    layout = getattr(batch, "block_layout", None)
    return layout if layout is not None else BlockLayout.for_ragged(batch)


def _fill(src: torch.Tensor, group: BufferGroup, slot_rows: torch.Tensor) -> torch.Tensor:
    """[S, L, H, D]: the group's buffer of `src` ([T, H, D]) rows, one gather."""
    return src.index_select(0, slot_rows).view(group.num_seqs, group.padded_len, *src.shape[1:])


def prefix_stable_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, scale: float, window: int | None
) -> torch.Tensor:
    """``modules.ragged_attention``'s contract (q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], causal within each
    sequence, optional sliding window) with prefix-stable bits: see the module docstring. `batch` is a RaggedBatch
    or carries a `block_layout` (shared prefixes). k/v may hold rows past q's (a prefix cache's keys and values:
    [T + C, Hkv, D]); the output has q's rows. One group's padded buffers exist at a time."""
    layout = layout_of(batch)
    gqa = q.shape[1] != k.shape[1]
    result = q.new_empty(q.shape)
    calls_by_group: dict[int, list[BlockCall]] = {}
    for call in layout.calls:
        calls_by_group.setdefault(call.group, []).append(call)
    for g, group in enumerate(layout.groups):
        qs = _fill(q, group, group.query_slot_rows)  # [S, L, Hq, D]
        ks, vs = _fill(k, group, group.slot_rows), _fill(v, group, group.slot_rows)  # [S, L, Hkv, D]
        out = q.new_empty(qs.shape)  # only computed blocks are read back
        for call in calls_by_group.get(g, ()):
            lo, hi = block_keys(call.block, window)
            rows, seqs = slice(BLOCK * call.block, hi), call.seqs
            # [count, H, BLOCK or hi - lo, D]: views for a slice of sequences, gathers for an index
            qb, kb, vb = (qs[seqs, rows].transpose(1, 2), ks[seqs, lo:hi].transpose(1, 2),
                          vs[seqs, lo:hi].transpose(1, 2))
            o = F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=block_mask(call.block, window, q.dtype, q.device), scale=scale, enable_gqa=gqa
            )
            out[seqs, rows] = o.transpose(1, 2)
        result.index_copy_(0, group.out_rows, out.view(-1, *q.shape[1:]).index_select(0, group.out_slots))
    return result
