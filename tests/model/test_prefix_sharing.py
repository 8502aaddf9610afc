"""Shared prefixes through the serving path (ModelRunner.run): every output of a sequence has the same bits with
sharing on, with it off and alone, at tp 1 and tp 2; which models share; the count of tokens not recomputed."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, launch_local
from model.layers.attention_stable import BLOCK, prefix_stable_attention
from model.layers.modules import ragged_attention
from model.runtime.prefix_sharing import can_share, supports_sharing
from service.packing import pack_ids
from tests.checkpoints import make_checkpoint

# Every output kind, in the row selections that reach the serving shortcuts (all rows, the last n, the last token;
# hidden states of several layers, normalized or not).
SPECS = {
    "logits all + scores": OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=5,
                                      vocab_ids=(0, 7, 250), target_ranks=True, entropy=True),
    "scores, no logits": OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, top_k=3,
                                    target_ranks=True, entropy=True),
    "last 3 rows": OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=3, target_logprobs=True, top_k=2),
    "last token": OutputSpec(),
    "hidden all": OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, -1)),
    "hidden last normalized": OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST_NORMALIZED,
                                         layers=(-1, 2)),
    "hidden all normalized + logits": OutputSpec(return_logits=ReturnLogits.ALL,
                                                 return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED, layers=(2,)),
}
FIELDS = ("positions", "logits", "target_logprobs", "top_k_ids", "top_k_logprobs", "vocab_logprobs", "target_ranks",
          "entropy", "hidden_states", "hidden_positions")


def sharing_batch(seed: int = 0, vocab: int = 300) -> list[list[int]]:
    """Shared prefixes of 1 token to the whole sequence, several groups, a sequence that is a prefix of another,
    a duplicate, sequences sharing nothing; contexts crossing the attention's 64-row blocks."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    long_context, short_context = tokens(2 * BLOCK + 17), tokens(BLOCK - 3)
    seqs = [long_context + tokens(n) for n in (1, 5, 12, BLOCK)]  # a context and its continuations
    seqs += [short_context + tokens(n) for n in (3, 9)]  # another group
    seqs += [long_context[: BLOCK + 1], list(seqs[1])]  # a prefix of the others; a duplicate
    seqs += [seqs[0][:1] + tokens(20), seqs[0][:1] + tokens(7)]  # one shared token
    seqs += [tokens(30), tokens(1)]  # nothing shared
    rng.shuffle(seqs)
    return seqs


def trie_nodes(seqs: list[list[int]]) -> int:
    return len({tuple(s[: p + 1]) for s in seqs for p in range(len(s))})


def run(runner: ModelRunner, seqs: list[list[int]], spec: OutputSpec):
    ids, offsets = pack_ids(seqs)
    return runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), [spec] * len(seqs))


def on_off_alone(runner: ModelRunner, seqs: list[list[int]], spec: OutputSpec):
    """(outputs with sharing on, with it off, each sequence alone (sharing on), tokens not recomputed). The runner
    is batch-invariant (the CPU default: every matmul on whole groups of 4 rows, model/runtime/invariance.py), without which
    a sequence alone runs other matmul shapes than in a batch, shared or not."""
    assert runner.batch_invariant
    before = runner.prefix_shared_tokens
    on = run(runner, seqs, spec)
    shared = runner.prefix_shared_tokens - before
    off = run(unshared(runner), seqs, spec)
    alone = [run(runner, [s], spec)[0] for s in seqs]
    return on, off, alone, shared


def unshared(runner: ModelRunner) -> ModelRunner:
    """The same model (its prefix-stable attention) run without sharing prefixes."""
    return runner.with_numerics(replace(runner.numerics, prefix_sharing=False))


def assert_same_bits(got, want, where):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), (where, name)
        if a is not None:
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
                                         and torch.equal(a.isnan(), b.isnan())), (where, name)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    # Widths of multiples of 64 (element-wise kernels take no scalar tail inside a row), 4 layers.
    path = make_checkpoint(tmp_path_factory.mktemp("share"), "llama", with_tokenizer=False, hidden_size=128,
                           num_heads=4, num_kv_heads=2, intermediate_size=256, num_layers=4, vocab_size=300)
    runner = ModelRunner.load(path, dtype="float32")
    assert runner.prefix_sharing and can_share(runner.model)
    return runner


@pytest.mark.parametrize("kind", SPECS)
def test_every_output_has_the_same_bits_with_sharing_on_off_and_alone(runner, kind):
    seqs = sharing_batch(seed=len(kind))
    on, off, alone, shared = on_off_alone(runner, seqs, SPECS[kind])
    assert shared == sum(map(len, seqs)) - trie_nodes(seqs) > 0
    for b in range(len(seqs)):
        assert_same_bits(on[b], off[b], (kind, b, "off"))
        assert_same_bits(on[b], alone[b], (kind, b, "alone"))


def test_mixed_specs_in_one_batch_share_and_keep_their_bits(runner):
    """Requests asking different things share one forward: on and off give the same bits per sequence."""
    seqs = sharing_batch(seed=5)
    specs = [list(SPECS.values())[b % len(SPECS)] for b in range(len(seqs))]
    ids, offsets = pack_ids(seqs)
    on = runner.run(torch.from_numpy(ids), torch.from_numpy(offsets), specs)
    off = unshared(runner).run(torch.from_numpy(ids), torch.from_numpy(offsets), specs)
    for b in range(len(seqs)):
        assert_same_bits(on[b], off[b], b)


def test_a_whole_sequence_shared_and_a_one_token_prefix(runner):
    seqs = [[5, 6, 7, 8, 9] * 20, [5, 6, 7, 8, 9] * 20, [5] + [1] * 70, [5]]
    on, off, alone, shared = on_off_alone(runner, seqs, SPECS["logits all + scores"])
    assert shared == 100 + 1 + 1
    for b in range(len(seqs)):
        assert_same_bits(on[b], off[b], b)
        assert_same_bits(on[b], alone[b], b)


def test_off_at_load_keeps_the_attention_with_transformers_bits(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama", with_tokenizer=False)
    off = ModelRunner.load(path, prefix_sharing=False)
    assert not off.prefix_sharing and not can_share(off.model)
    assert all(layer.self_attn.attention_fn is ragged_attention for layer in off.model.layers)
    with pytest.raises(ValueError, match="prefix-stable"):
        off.with_numerics(replace(off.numerics, prefix_sharing=True))
    on = ModelRunner.load(path)
    assert on.prefix_sharing
    assert all(layer.self_attn.attention_fn is prefix_stable_attention for layer in on.model.layers)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_models_whose_rows_follow_the_sequence_do_not_share(tmp_path, arch):
    """Soft-capped eager attention (Gemma 2) and LongRoPE (Phi-3's recipe) run unshared on their own attention;
    asking for sharing there explicitly is refused."""
    path = make_checkpoint(tmp_path / arch, arch, with_tokenizer=False)
    runner = ModelRunner.load(path)
    assert not runner.prefix_sharing and not supports_sharing(runner.model)
    with pytest.raises(ValueError, match="prefix sharing is supported"):
        ModelRunner.load(path, prefix_sharing=True)


def _tp_rank(ctx, path: str, seqs: list[list[int]], spec: OutputSpec):
    torch.set_num_threads(1)
    runner = ModelRunner.load(path, parallel=ctx, dtype="float32")
    return on_off_alone(runner, seqs, spec)


def test_tp2_on_off_alone_have_the_same_bits(runner, tmp_path):
    """Each rank shares the same prefixes (the trie follows the tokens, which every rank gets): at tp 2 a sequence's
    outputs are the same bits on, off and alone."""
    path = make_checkpoint(tmp_path / "tp", "llama", with_tokenizer=False, hidden_size=128, num_heads=4,
                           num_kv_heads=2, intermediate_size=256, num_layers=2, vocab_size=300)
    seqs = sharing_batch(seed=11)[:8]
    spec = OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=4, vocab_ids=(3, 1), entropy=True,
                      target_ranks=True, return_hidden_states=ReturnHiddenStates.LAST, layers=(1, -1))
    per_rank = launch_local(_tp_rank, 2, str(path), seqs, spec)
    for on, off, alone, shared in per_rank:
        assert shared == sum(map(len, seqs)) - trie_nodes(seqs) > 0
        for b in range(len(seqs)):
            assert_same_bits(on[b], off[b], (b, "off"))
            assert_same_bits(on[b], alone[b], (b, "alone"))
    for b in range(len(seqs)):
        assert_same_bits(per_rank[0][0][b], per_rank[1][0][b], (b, "ranks"))


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "qwen3_moe", "gemma3", "olmo2", "smollm3"])
def test_families_share_with_the_same_bits(tmp_path, arch):
    """Sliding windows (Mistral, Gemma 3's local layers), q/k norms, per-type rope tables, a mixture of experts,
    whole-projection q/k norms (OLMo 2), layers without rotary (SmolLM3): on, off and alone agree bit for bit."""
    path = make_checkpoint(tmp_path / arch, arch, with_tokenizer=False, hidden_size=128, num_heads=4,
                           num_kv_heads=2, intermediate_size=256, vocab_size=300)
    runner = ModelRunner.load(path, dtype="float32")
    assert runner.prefix_sharing
    seqs = sharing_batch(seed=3)[:8]
    on, off, alone, shared = on_off_alone(runner, seqs, SPECS["logits all + scores"])
    assert shared == sum(map(len, seqs)) - trie_nodes(seqs) > 0
    for b in range(len(seqs)):
        assert_same_bits(on[b], off[b], (arch, b, "off"))
        assert_same_bits(on[b], alone[b], (arch, b, "alone"))
