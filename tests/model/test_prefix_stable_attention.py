"""Prefix-stable attention (a row's bits follow only its prefix) and shared-prefix forwards that change no bit."""

import random

import pytest
import torch
import torch.nn.functional as F

from model import ModelRunner
from model.layers import attention_stable
from model.layers.attention_stable import BLOCK, BlockLayout, prefix_stable_attention
from model.layers.modules import RaggedBatch
from model.runtime.prefix_sharing import ROW_MULTIPLE, SharedPrefixBatch, can_share, shared_trunk

HQ, HKV, D = 4, 2, 16
CPU = torch.device("cpu")


def ragged_batch(lengths: list[int]) -> RaggedBatch:
    return RaggedBatch.from_offsets(torch.tensor([0, *lengths]).cumsum(0), CPU)


def qkv(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype) for h in (HQ, HKV, HKV))


def naive(q, k, v, lengths, scale, window):
    """softmax(q.k^T) v per sequence in float64, with the causal (and sliding-window) mask."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].double() for t in (q, k, v))
        group = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = (j <= i) & ((i - j < window) if window else True)
        probs = (torch.einsum("ihd,jhd->hij", qs, ks) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hij,jhd->ihd", probs, vs))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 16, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_rows_after_it(dtype, window):
    """Every prefix of a 5-block sequence, alone, has the bits of the whole sequence's first rows; torch's one causal
    call per sequence does not (tests the test: a row's bits there follow the call's length)."""
    n_max = 5 * BLOCK - 7
    q, k, v = qkv(n_max, dtype)
    full = prefix_stable_attention(q, k, v, ragged_batch([n_max]), 0.25, window)
    lengths = [*range(1, 2 * BLOCK + 2), *range(2 * BLOCK + 2, n_max, 5)] if dtype == torch.float32 else \
        range(1, n_max, 9)
    for n in lengths:
        got = prefix_stable_attention(q[:n], k[:n], v[:n], ragged_batch([n]), 0.25, window)
        assert torch.equal(got, full[:n]), n
    if window is None and dtype == torch.float32:
        one_call = [
            F.scaled_dot_product_attention(
                *(t[:n].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=0.25, enable_gqa=True
            )[0].transpose(0, 1)
            for n in (20, 40)
        ]
        assert not torch.equal(one_call[0], one_call[1][:20])


@pytest.mark.parametrize("window", [None, 16, 200])
def test_a_rows_bits_do_not_depend_on_the_batch(window):
    """A sequence alone and packed among others (longer, shorter, equal) at any place: the same bits."""
    n_max = 4 * BLOCK + 3
    q, k, v = qkv(n_max, torch.float32)
    alone = prefix_stable_attention(q, k, v, ragged_batch([n_max]), 0.25, window)
    rng = random.Random(0)
    for _ in range(6):
        lengths = [rng.randint(1, n_max) for _ in range(rng.randint(2, 7))]
        others = [qkv(n, torch.float32, seed=rng.randint(1, 99)) for n in lengths]
        at = rng.randint(0, len(lengths))
        parts = others[:at] + [(q, k, v)] + others[at:]
        lengths = lengths[:at] + [n_max] + lengths[at:]
        got = prefix_stable_attention(*(torch.cat(t) for t in zip(*parts)), ragged_batch(lengths), 0.25, window)
        start = sum(lengths[:at])
        assert torch.equal(got[start : start + n_max], alone), lengths


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_stable_attention_is_causal_attention(dtype, window):
    lengths = [1, 7, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 100]
    q, k, v = qkv(sum(lengths), dtype)
    got = prefix_stable_attention(q, k, v, ragged_batch(lengths), 0.3, window)
    expected = naive(q, k, v, lengths, 0.3, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)


def test_plain_layout_calls_are_views_over_groups_of_similar_lengths():
    """Sequences pad to whole blocks in groups of 1, 2, 3-4, 5-8... blocks (a long sequence does not make every short
    one as long); within a group the longest come first, so a block's sequences are a slice (views, no gather)."""
    lengths = [5, 3 * BLOCK, BLOCK + 1, 4 * BLOCK, 40, 20 * BLOCK]
    layout = BlockLayout.for_ragged(ragged_batch(lengths))
    assert [(g.num_seqs, g.padded_len) for g in layout.groups] == [(2, BLOCK), (2, 4 * BLOCK), (1, 2 * BLOCK),
                                                                  (1, 20 * BLOCK)]
    assert layout.num_slots == sum(g.num_seqs * g.padded_len for g in layout.groups)
    assert all(isinstance(call.seqs, slice) for call in layout.calls)
    assert [(c.block, c.seqs) for c in layout.calls if c.group == 1] == [(0, slice(0, 2)), (1, slice(0, 2)),
                                                                        (2, slice(0, 2)), (3, slice(0, 1))]
    assert len(layout.calls) == 1 + 4 + 2 + 20


def test_buffers_are_capped_and_the_cap_changes_no_bit(monkeypatch):
    """Groups split at MAX_GROUP_SLOTS (one sequence longer than it is a group of its own): the attention's padded
    buffers never hold more, and the rows have the bits of the uncapped layout."""
    lengths = [5, 3 * BLOCK, BLOCK + 1, 4 * BLOCK, 40, 7 * BLOCK + 3, 2 * BLOCK, 9, BLOCK]
    q, k, v = qkv(sum(lengths), torch.float32)
    batch = ragged_batch(lengths)
    uncapped = prefix_stable_attention(q, k, v, batch, 0.25, None)
    cap = 3 * BLOCK
    monkeypatch.setattr(attention_stable, "MAX_GROUP_SLOTS", cap)
    attention_stable._ragged_layout.cache_clear()
    layout = BlockLayout.build([list(range(s, e)) for s, e in zip(batch.bounds[:-1], batch.bounds[1:])],
                               [0] * len(lengths), sum(lengths), CPU, max_group_slots=cap)
    assert layout.max_group_slots == 8 * BLOCK  # the 7-block sequence (8 blocks padded), alone
    assert all(g.num_seqs == 1 for g in layout.groups if g.num_slots > cap)
    assert all(len(g.slot_rows) == g.num_slots for g in layout.groups)  # the buffers' rows, one group at a time
    capped = prefix_stable_attention(q, k, v, batch, 0.25, None)
    attention_stable._ragged_layout.cache_clear()
    assert torch.equal(capped, uncapped)


def test_mask_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(attention_stable, "_masks", attention_stable.OrderedDict())
    for j in range(200):
        mask = attention_stable.block_mask(j, None, torch.float32, CPU)
        assert mask.shape == (BLOCK, BLOCK * (j + 1))
        assert attention_stable.mask_cache_bytes() <= max(attention_stable.MASK_CACHE_BYTES, mask.numel() * 4)


# ------------------------------------------------------------------------------------------------ sharing


def trie_nodes(seqs: list[list[int]]) -> int:
    return len({tuple(s[: p + 1]) for s in seqs for p in range(len(s))})


def packed(seqs: list[list[int]]) -> tuple[torch.Tensor, RaggedBatch]:
    return torch.tensor([t for s in seqs for t in s]), ragged_batch([len(s) for s in seqs])


SHARING_CASES = {
    "two groups": [[5, 6, 7, 8], [1, 2, 3, 4, 5], [5, 6, 7, 9, 9], [1, 2, 3, 7], [5, 6]],
    "nested prefixes": [[1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2], [1, 2, 3, 4]],
    "identical": [[4, 4, 4], [4, 4, 4], [4, 4, 4]],
    "one token": [[9, 1], [9, 2], [9]],
    "none": [[1, 2], [2, 1], [3]],
}


@pytest.mark.parametrize("case", SHARING_CASES)
def test_shared_prefix_batch_is_the_batchs_token_trie(case):
    seqs = SHARING_CASES[case]
    ids, batch = packed(seqs)
    shared = SharedPrefixBatch.build(ids, batch)
    assert shared.unique_rows == trie_nodes(seqs)
    # filler rows (a sequence of their own) make the trunk's row count a multiple of 4: the matmuls' row invariance
    assert shared.num_tokens % ROW_MULTIPLE == 0 and 0 <= shared.num_tokens - shared.unique_rows < ROW_MULTIPLE
    assert shared.shared_tokens == len(ids) - trie_nodes(seqs)
    assert torch.equal(shared.tokens[shared.row_index], ids)
    assert torch.equal(shared.positions()[shared.row_index], batch.positions())
    if case == "none":
        assert torch.equal(shared.row_index, torch.arange(len(ids)))


def shared_qkv_case(rng: random.Random, vocab: int = 3) -> list[list[int]]:
    """Sequences over a tiny vocabulary (long shared prefixes): a context with continuations, a copy, a prefix."""
    context = [rng.randrange(vocab) for _ in range(rng.randint(1, 3 * BLOCK))]
    seqs = [context + [rng.randrange(vocab) for _ in range(rng.randint(0, BLOCK + 9))] for _ in range(4)]
    seqs.append(context[: rng.randint(1, len(context))])
    seqs.append(list(seqs[0]))
    seqs.append([rng.randrange(vocab) for _ in range(rng.randint(1, 2 * BLOCK))])
    rng.shuffle(seqs)
    return [s for s in seqs if s]


@pytest.mark.parametrize("window", [None, 16, 100])
def test_shared_attention_has_the_unshared_bits(window):
    """Attention over the de-duplicated rows (each sequence's q/k/v gathered from them, query blocks of rows that
    another sequence owns skipped) equals attention over the packed batch, bit for bit, row by row."""
    rng = random.Random(window or 0)
    for _ in range(5):
        seqs = shared_qkv_case(rng)
        ids, batch = packed(seqs)
        shared = SharedPrefixBatch.build(ids, batch)
        # a row's q/k/v are a function of its trie node (token and prefix): random per unique row
        q, k, v = qkv(shared.num_tokens, torch.float32, seed=rng.randint(0, 99))
        got = prefix_stable_attention(q, k, v, shared, 0.25, window)  # [U, HQ, D]
        index = shared.row_index
        expected = prefix_stable_attention(q[index], k[index], v[index], batch, 0.25, window)  # [T, HQ, D]
        assert torch.equal(got[index], expected)


def row_invariant_linear(linear):
    """F.linear whose row bits do not follow the row count: MKL's kernels for under 16 rows round otherwise (the
    batch-invariant serving path pads such matmuls)."""

    def padded(x, weight, bias=None):
        rows = x.reshape(-1, x.shape[-1])
        if 0 < rows.shape[0] < 16:
            full = torch.cat([rows, rows.new_zeros(16 - rows.shape[0], rows.shape[1])])
            return linear(full, weight, bias)[: rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])
        return linear(x, weight, bias)

    return padded


@pytest.fixture
def stable_runner(checkpoint_factory, monkeypatch):
    # Widths of multiples of 16 (no scalar tails in element-wise kernels), head_dim 32, three blocks of 64 rows.
    path = checkpoint_factory("llama", hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    runner = ModelRunner.load(path, dtype="float32")  # prefix-stable attention: the CPU default
    assert can_share(runner.model)
    monkeypatch.setattr(F, "linear", row_invariant_linear(F.linear))
    return runner


@torch.inference_mode()
def test_shared_trunk_has_the_bits_of_the_unshared_trunk_and_of_each_sequence_alone(stable_runner):
    model = stable_runner.model
    rng = random.Random(7)
    for case in [*SHARING_CASES.values(), shared_qkv_case(rng, vocab=4), shared_qkv_case(rng, vocab=2)]:
        ids, batch = packed(case)
        plain, _ = model.trunk(ids, batch)
        h, _, saved = shared_trunk(model, ids, batch)
        assert saved == len(ids) - trie_nodes(case)
        assert torch.equal(h, plain)
        for b, seq in enumerate(case):
            alone, _ = model.trunk(torch.tensor(seq), ragged_batch([len(seq)]))
            assert torch.equal(h[batch.bounds[b] : batch.bounds[b + 1]], alone), (case, b)


@torch.inference_mode()
def test_shared_trunk_serving_shortcuts(stable_runner):
    """`final_rows` and `capture` (the runner's pruning) index packed rows and come back in their order, duplicates
    of shared rows included."""
    model = stable_runner.model
    seqs = shared_qkv_case(random.Random(3), vocab=2)
    ids, batch = packed(seqs)
    last = torch.tensor(batch.bounds[1:]) - 1
    first = torch.tensor(batch.bounds[:-1])
    capture = {0: first, 1: torch.cat([first, last]), model_depth(model): torch.arange(len(last)).flip(0)}
    plain, plain_captured = model.trunk(ids, batch, capture, final_rows=last)
    h, captured, saved = shared_trunk(model, ids, batch, capture, final_rows=last)
    assert saved > 0
    assert torch.equal(h, plain)
    assert captured.keys() == plain_captured.keys()
    for layer in captured:
        assert torch.equal(captured[layer], plain_captured[layer]), layer


def model_depth(model) -> int:
    return len(model.layers)
