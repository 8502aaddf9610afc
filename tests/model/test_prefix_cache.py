"""The prefix cache across batches (model/runtime/prefix_cache.py) through ModelRunner.run: every output of a
sequence has the same bits cold, warm, after eviction, with the cache off and alone, at tp 1 and 2, for families
with sliding windows and experts; the bytes stay within the bound; what the runner reports."""

from __future__ import annotations

import random

import pytest
import torch

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, launch_local
from model.layers.attention_stable import BLOCK
from service.packing import pack_ids
from tests.checkpoints import make_checkpoint
from tests.model.test_prefix_sharing import SPECS, assert_same_bits

# Specs that ask only for what a cached row's kept vocabulary products give (its log-sum-exp, entropy and target
# logit): their cached rows run no lm_head on a warm request.
REUSING = {
    "target log-probs all rows": OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True),
    "entropy all rows": OutputSpec(return_logits=ReturnLogits.ALL, logits=False, entropy=True),
    "target log-probs + entropy, last 3 rows": OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=3,
                                                          logits=False, target_logprobs=True, entropy=True),
}
CACHE_SPECS = {**SPECS, **REUSING}

# Specs whose hidden states of an inner layer cover every row: the cache keeps no inner layer, so those
# sequences read nothing from it (and compute every row, exactly).
NO_HIT = {"hidden all", "hidden all normalized + logits"}


def tokens(rng: random.Random, n: int, vocab: int = 300) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def run(runner: ModelRunner, seqs: list[list[int]], spec: OutputSpec | list[OutputSpec]):
    ids, offsets = pack_ids(seqs)
    specs = spec if isinstance(spec, list) else [spec] * len(seqs)
    return runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), specs)


def without_cache(runner: ModelRunner, seqs, spec, alone: bool = True):
    """Each sequence alone (or the batch) with the cache off: the reference bits."""
    cache, runner.prefix_cache = runner.prefix_cache, None
    try:
        if alone:
            specs = spec if isinstance(spec, list) else [spec] * len(seqs)
            return [run(runner, [s], [sp])[0] for s, sp in zip(seqs, specs)]
        return run(runner, seqs, spec)
    finally:
        runner.prefix_cache = cache


def make_runner(path, capacity: int = 1 << 30) -> ModelRunner:
    runner = ModelRunner.load(path, dtype="float32", prefix_cache_bytes=capacity)
    assert runner.batch_invariant and runner.prefix_sharing
    return runner


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cache"), "llama", with_tokenizer=False, hidden_size=128,
                           num_heads=4, num_kv_heads=2, intermediate_size=256, num_layers=4, vocab_size=300)


@pytest.fixture(scope="module")
def runner(checkpoint):
    return make_runner(checkpoint)


@pytest.mark.parametrize("kind", CACHE_SPECS)
def test_every_output_is_the_same_bits_cold_warm_off_and_alone(runner, kind):
    """A context of 2 blocks and a bit, its continuations cold (the cache empty), the same batch warm, new
    continuations of the cached context, each against the sequence alone with the cache off and the batch off."""
    rng = random.Random(len(kind))
    spec = CACHE_SPECS[kind]
    runner.prefix_cache.clear()
    context = tokens(rng, 2 * BLOCK + 22)
    first = [context + tokens(rng, n) for n in (3, 20, BLOCK + 6)] + [tokens(rng, 40)]
    later = [context + tokens(rng, n) for n in (1, 9)] + [context[: BLOCK + 1], first[2] + tokens(rng, 5)]
    cold = run(runner, first, spec)
    assert runner.last_run.prefix_cache_hit_tokens == 0 and runner.prefix_cache.nodes == 3
    warm = run(runner, first, spec)
    warm_hits = runner.last_run.prefix_cache_hit_tokens
    again = run(runner, later, spec)
    later_hits = runner.last_run.prefix_cache_hit_tokens
    if kind in NO_HIT:
        assert warm_hits == later_hits == 0
    else:
        assert warm_hits == 3 * BLOCK and later_hits == 3 * BLOCK
    alone, off = without_cache(runner, first, spec), without_cache(runner, first, spec, alone=False)
    for b in range(len(first)):
        assert_same_bits(cold[b], alone[b], (kind, b, "cold"))
        assert_same_bits(warm[b], alone[b], (kind, b, "warm"))
        assert_same_bits(warm[b], off[b], (kind, b, "off"))
    for b, want in enumerate(without_cache(runner, later, spec)):
        assert_same_bits(again[b], want, (kind, b, "later"))


def test_mixed_needs_in_one_batch_share_the_batch_and_hit_the_cache(runner):
    """Sequences of one context asking different things: some read the whole cached context, one asks an inner
    layer's hidden states at every row (reads nothing: computes the context again, in the same batch as the
    others that read it from the cache), one needs every row's log-probs after a batch that kept only the last
    rows' final states (reads less, and fills the final states in)."""
    rng = random.Random(7)
    runner.prefix_cache.clear()
    context = tokens(rng, 3 * BLOCK + 5)
    run(runner, [context + tokens(rng, 4)], SPECS["last token"])  # caches 3 blocks, no final state kept
    seqs = [context + tokens(rng, n) for n in (2, 30, 7, 11)]
    specs = [SPECS["last token"], SPECS["hidden all"], SPECS["scores, no logits"], SPECS["last 3 rows"]]
    got = run(runner, seqs, specs)
    assert runner.last_run.prefix_cache_hit_tokens == 3 * BLOCK
    assert runner.last_run.prefix_shared_tokens > 0
    for b, want in enumerate(without_cache(runner, seqs, specs)):
        assert_same_bits(got[b], want, b)
    # The final states of the context were computed for the all-rows sequence: the next one reads them.
    seq = context + tokens(rng, 3)
    again = run(runner, [seq], SPECS["scores, no logits"])
    assert runner.last_run.prefix_cache_hit_tokens == 3 * BLOCK
    assert_same_bits(again[0], without_cache(runner, [seq], SPECS["scores, no logits"])[0], "all rows")


def test_a_prefix_evicted_between_batches_is_computed_again_with_the_same_bits(checkpoint):
    runner = make_runner(checkpoint)
    node = runner.prefix_cache.node_bytes
    runner.use_prefix_cache(2 * node)
    rng = random.Random(3)
    x, y = tokens(rng, 2 * BLOCK + 10), tokens(rng, 2 * BLOCK + 10)
    spec = SPECS["logits all + scores"]
    first = run(runner, [x + [5]], spec)
    assert runner.prefix_cache.nodes == 2
    run(runner, [y + [5]], spec)  # x's two blocks are evicted for y's
    assert runner.prefix_cache.nodes == 2 and runner.prefix_cache.bytes == 2 * node
    again = run(runner, [x + [5]], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 0  # evicted: computed again
    warm = run(runner, [x + [5]], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 2 * BLOCK
    alone = without_cache(runner, [x + [5]], spec)[0]
    for out in (first[0], again[0], warm[0]):
        assert_same_bits(out, alone, "x")


def test_a_cache_smaller_than_one_block_holds_nothing_and_changes_nothing(checkpoint):
    runner = make_runner(checkpoint)
    runner.use_prefix_cache(runner.prefix_cache.node_bytes - 1)
    rng = random.Random(4)
    context = tokens(rng, 3 * BLOCK)
    seqs = [context + tokens(rng, 6), context + tokens(rng, 2)]
    spec = SPECS["logits all + scores"]
    for _ in range(2):
        got = run(runner, seqs, spec)
        assert runner.prefix_cache.nodes == 0 and runner.prefix_cache_bytes == 0
        assert runner.last_run.prefix_cache_hit_tokens == 0
    for b, want in enumerate(without_cache(runner, seqs, spec)):
        assert_same_bits(got[b], want, b)


def test_bytes_stay_within_the_bound_and_the_batch_pins_what_it_reads(checkpoint):
    """Counted exactly (the nodes' tensors), never above the bound, least recently used evicted first; a batch
    that reads a cached prefix keeps it while it adds to it (no room: its new blocks are not kept)."""
    runner = make_runner(checkpoint)
    node = runner.prefix_cache.node_bytes
    capacity = 3 * node + node // 2
    runner.use_prefix_cache(capacity)
    cache = runner.prefix_cache
    rng = random.Random(5)
    spec = SPECS["last 3 rows"]
    contexts = [tokens(rng, BLOCK + 3) for _ in range(5)]
    for c in contexts:
        run(runner, [c + [1]], spec)
        assert cache.bytes <= capacity
        assert cache.bytes == cache.nodes * node == sum(n.nbytes for n in cache.lru)
    assert cache.nodes == 3
    # the three most recent contexts are cached; the oldest two were evicted
    for c, cached in zip(contexts, (False, False, True, True, True)):
        assert (cache._path(c)[:1] != []) == cached
    # a 3-block context filling the cache, then a batch reading it and adding 2 more blocks: its path is
    # pinned, the other (unpinned) nodes go, and only what fits is added
    long = tokens(rng, 3 * BLOCK + 1)
    run(runner, [long], spec)
    assert len(cache._path(long)) == 3 and cache.nodes == 3
    longer = long + tokens(rng, 2 * BLOCK + 3)
    got = run(runner, [longer], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 3 * BLOCK
    assert len(cache._path(longer)) == 3 and cache.bytes <= capacity
    assert_same_bits(got[0], without_cache(runner, [longer], spec)[0], "longer")
    assert all(n.pins == 0 for n in cache.lru)


def _tp_rank(ctx, path: str, batches: list[list[list[int]]], spec: OutputSpec):
    torch.set_num_threads(1)
    runner = ModelRunner.load(path, parallel=ctx, dtype="float32", prefix_cache_bytes=1 << 30)
    outs = []
    for seqs in batches:
        outs.append(run(runner, seqs, spec))
        outs[-1] = (outs[-1], runner.last_run)
    alone = [without_cache(runner, seqs, spec) for seqs in batches]
    return outs, alone, runner.prefix_cache.bytes


TP_SPECS = {
    "every output": OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=4, vocab_ids=(3, 1),
                               entropy=True, target_ranks=True, return_hidden_states=ReturnHiddenStates.LAST,
                               layers=(1, -1)),
    # the second batch's cached rows take these from the products each rank kept (reduced across ranks)
    "kept products": OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, entropy=True),
}


@pytest.mark.parametrize("kind", TP_SPECS)
def test_tp2_each_rank_caches_its_shard_with_the_same_bits(tmp_path, kind):
    path = make_checkpoint(tmp_path / "tp", "llama", with_tokenizer=False, hidden_size=128, num_heads=4,
                           num_kv_heads=2, intermediate_size=256, num_layers=2, vocab_size=300)
    rng = random.Random(11)
    context = tokens(rng, 2 * BLOCK + 9)
    batches = [[context + tokens(rng, n) for n in (4, 12)], [context + tokens(rng, n) for n in (1, 30, 7)]]
    spec = TP_SPECS[kind]
    per_rank = launch_local(_tp_rank, 2, str(path), batches, spec)
    for outs, alone, nbytes in per_rank:
        assert outs[0][1].prefix_cache_hit_tokens == 0 and outs[1][1].prefix_cache_hit_tokens == 2 * BLOCK
        for (got, _), want in zip(outs, alone):
            for b in range(len(want)):
                assert_same_bits(got[b], want[b], b)
    assert per_rank[0][2] == per_rank[1][2] > 0
    for b in range(3):
        assert_same_bits(per_rank[0][0][1][0][b], per_rank[1][0][1][0][b], (b, "ranks"))


@pytest.mark.parametrize("arch", ["mistral", "qwen3_moe", "gemma3"])
def test_families_with_windows_and_experts_hit_with_the_same_bits(tmp_path, arch):
    """Sliding windows (Mistral; Gemma 3's local layers beside global ones) and a mixture of experts."""
    path = make_checkpoint(tmp_path / arch, arch, with_tokenizer=False, hidden_size=128, num_heads=4,
                           num_kv_heads=2, intermediate_size=256, vocab_size=300)
    runner = make_runner(path)
    rng = random.Random(9)
    context = tokens(rng, 2 * BLOCK + 30)
    spec = SPECS["logits all + scores"]
    run(runner, [context + tokens(rng, 5)], spec)
    seqs = [context + tokens(rng, n) for n in (3, 17)]
    got = run(runner, seqs, spec)
    assert runner.last_run.prefix_cache_hit_tokens == 2 * BLOCK
    for b, want in enumerate(without_cache(runner, seqs, spec)):
        assert_same_bits(got[b], want, (arch, b))


def test_models_that_cannot_share_run_uncached(tmp_path):
    path = make_checkpoint(tmp_path / "gemma2", "gemma2", with_tokenizer=False)
    runner = ModelRunner.load(path, prefix_cache_bytes=1 << 30)
    assert runner.prefix_cache is None and runner.prefix_cache_bytes == 0
    off = ModelRunner.load(make_checkpoint(tmp_path / "llama", "llama", with_tokenizer=False), prefix_sharing=False,
                           prefix_cache_bytes=1 << 30)
    assert off.prefix_cache is None


def test_negative_control_cached_keys_one_ulp_off_change_the_bits(checkpoint, monkeypatch):
    """The comparisons above see a cache that is off by one ulp: the bits they check do come from the cache."""
    from model.runtime import prefix_cache

    runner = make_runner(checkpoint)
    rng = random.Random(12)
    context = tokens(rng, 2 * BLOCK + 4)
    spec = SPECS["last token"]
    run(runner, [context + [7]], spec)
    extend = prefix_cache.CachedKV.extend

    def off_by_one_ulp(self, layer, k, v):
        k2, v2 = extend(self, layer, k, v)
        if self.used:
            k2 = k2.clone()
            k2[k.shape[0]:] = torch.nextafter(k2[k.shape[0]:], torch.tensor(float("inf")))
        return k2, v2

    monkeypatch.setattr(prefix_cache.CachedKV, "extend", off_by_one_ulp)
    seq = context + [9, 9]
    got = run(runner, [seq], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 2 * BLOCK
    assert not torch.equal(got[0].logits, without_cache(runner, [seq], spec)[0].logits)


class LmHeadRows:
    """Counts the rows the score reducer's lm_head runs on."""

    def __init__(self, runner: ModelRunner) -> None:
        self.rows = 0
        inner = runner.scores.compute_logits

        def counted(h: torch.Tensor) -> torch.Tensor:
            self.rows += h.shape[0]
            return inner(h)

        runner.scores.compute_logits = counted


def test_cached_rows_asking_only_kept_products_run_no_lm_head(checkpoint):
    """Every row's target log-prob and entropy of a conversation growing by a turn: the second request runs the
    lm_head only on the rows the cache does not hold (padded to a row group), and its outputs are the same bits
    as alone; the last row of a cached block whose next token differs from the one kept runs the lm_head again."""
    from model.runtime.invariance import padded_count

    runner = make_runner(checkpoint)
    count = LmHeadRows(runner)
    spec = REUSING["target log-probs all rows"]
    both = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, entropy=True)
    rng = random.Random(21)
    turn = tokens(rng, 2 * BLOCK + 9)
    run(runner, [turn], both)
    grown = turn + tokens(rng, 40)
    count.rows = 0
    got = run(runner, [grown], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 2 * BLOCK
    assert count.rows == padded_count(len(grown) - 2 * BLOCK)
    assert_same_bits(got[0], without_cache(runner, [grown], spec)[0], "grown")
    count.rows = 0
    got = run(runner, [grown], REUSING["entropy all rows"])  # entropy was kept too
    assert count.rows == padded_count(len(grown) - 2 * BLOCK)
    assert_same_bits(got[0], without_cache(runner, [grown], REUSING["entropy all rows"])[0], "entropy")
    # a branch at a block's end: row 2 * BLOCK - 1 predicts another token than the one its node kept
    branch = turn[: 2 * BLOCK] + [turn[2 * BLOCK] % 299 + 1] + tokens(rng, 30)
    count.rows = 0
    got = run(runner, [branch], spec)
    assert runner.last_run.prefix_cache_hit_tokens == 2 * BLOCK
    assert count.rows == padded_count(len(branch) - 2 * BLOCK + 1)
    assert_same_bits(got[0], without_cache(runner, [branch], spec)[0], "branch")
    # the products count in the cache's bytes
    assert runner.prefix_cache.bytes == sum(n.nbytes for n in runner.prefix_cache.lru)
    assert all(n.products.nbytes == 3 * 4 * BLOCK + 8 for n in runner.prefix_cache.lru)


def test_products_are_filled_by_a_later_batch_and_mixed_with_computed_rows(checkpoint):
    """A context cached by a last-token request (no final states, no products kept), then a batch mixing
    sequences that reuse products with one asking for top-k: it computes the context again (one row for the
    three), keeps the final states and the products; a later request reads them. All the same bits as alone."""
    from model.runtime.invariance import padded_count
    from model.runtime.prefix_cache import ENTROPY, LSE, TARGET_LOGIT

    runner = make_runner(checkpoint)
    count = LmHeadRows(runner)
    rng = random.Random(22)
    context = tokens(rng, 3 * BLOCK + 2)
    run(runner, [context + [3]], SPECS["last token"])
    path = runner.prefix_cache._path(context)
    assert len(path) == 3 and not any(any(row) for node in path for row in node.products.has)
    seqs = [context + tokens(rng, n) for n in (4, 9, 13)]
    specs = [REUSING["target log-probs all rows"], SPECS["scores, no logits"], REUSING["entropy all rows"]]
    got = run(runner, seqs, specs)
    assert runner.last_run.prefix_cache_hit_tokens == 0  # no final state kept: the context is computed again
    for b, want in enumerate(without_cache(runner, seqs, specs)):
        assert_same_bits(got[b], want, b)
    assert all(all(node.products.has[slot]) for node in path for slot in (LSE, ENTROPY, TARGET_LOGIT))
    seq = context + tokens(rng, 6)
    both = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, entropy=True)
    count.rows = 0
    got = run(runner, [seq], both)
    assert runner.last_run.prefix_cache_hit_tokens == 3 * BLOCK
    assert count.rows == padded_count(len(seq) - 3 * BLOCK)
    assert_same_bits(got[0], without_cache(runner, [seq], both)[0], "later")


def test_negative_control_kept_products_one_ulp_off_change_the_bits(checkpoint):
    """The comparisons above see products that are off by one ulp: the bits they check do come from them."""
    runner = make_runner(checkpoint)
    rng = random.Random(23)
    context = tokens(rng, 2 * BLOCK + 4)
    spec = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, entropy=True)
    run(runner, [context + [7]], spec)
    for node in runner.prefix_cache.lru:
        with torch.inference_mode():  # made by the runner's inference
            node.products.values.copy_(torch.nextafter(node.products.values, torch.tensor(float("inf"))))
    seq = context + [9, 9]
    got = run(runner, [seq], spec)[0]
    want = without_cache(runner, [seq], spec)[0]
    cached = slice(0, 2 * BLOCK)
    assert not torch.equal(got.target_logprobs[cached], want.target_logprobs[cached])
    assert not torch.equal(got.entropy[cached], want.entropy[cached])
    assert torch.equal(got.entropy[2 * BLOCK:], want.entropy[2 * BLOCK:])
