"""MAX's postprocessing semantics, the per-request serving path, and ragged batching."""

import pytest
import torch

from model import (
    ModelRunner,
    OutputSpec,
    ReturnHiddenStates,
    ReturnLogits,
    distributed_logits_postprocess,
    forward_sharded_layers,
    take,
)
from model.runtime import invariance
from tests.checkpoints import load_reference
from tests.model.helpers import ragged, reference


def test_take_and_forward_sharded_layers_behave_as_max():
    it = iter(range(10))
    assert take(it, 3) == [0, 1, 2]
    assert take(it, 2) == [3, 4]  # consumes the iterator
    assert take(iter([1]), 5) == [1]
    outs = forward_sharded_layers([lambda x: x + 1, lambda x: x * 2], [torch.tensor(1), torch.tensor(3)])
    assert [int(o) for o in outs] == [2, 6]
    with pytest.raises(AssertionError, match="must match"):
        forward_sharded_layers([lambda x: x], [torch.tensor(1), torch.tensor(2)])


@pytest.fixture(scope="module")
def llama(checkpoint_factory):
    path = checkpoint_factory("llama")
    return path, ModelRunner.load(path), load_reference(path)


def max_model(runner, return_logits, return_hidden_states=ReturnHiddenStates.NONE):
    model = runner.model
    model.return_logits, model.return_hidden_states = return_logits, return_hidden_states
    return model


def test_last_token_returns_only_last_logits(llama):
    path, runner, hf = llama
    seqs, ids, offsets = ragged([4, 9, 1], runner.config.vocab_size)
    out = max_model(runner, ReturnLogits.LAST_TOKEN)(ids, offsets)
    assert len(out) == 1 and out[0].shape == (3, runner.config.vocab_size) and out[0].dtype == torch.float32
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(out[0][i], reference(hf, seq)[0][-1], atol=1e-4, rtol=0)


def test_all_returns_every_row_with_input_offsets(llama):
    _, runner, hf = llama
    seqs, ids, offsets = ragged([4, 9, 1], runner.config.vocab_size)
    last, logits, logit_offsets = max_model(runner, ReturnLogits.ALL)(ids, offsets)
    assert logits.shape == (14, runner.config.vocab_size)
    assert torch.equal(logit_offsets, offsets)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(logits[offsets[i]:offsets[i + 1]], reference(hf, seq)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(last[i], logits[offsets[i + 1] - 1])


def test_variable_returns_last_n_rows_per_sequence(llama):
    _, runner, hf = llama
    seqs, ids, offsets = ragged([4, 9, 6], runner.config.vocab_size)
    last, logits, logit_offsets = max_model(runner, ReturnLogits.VARIABLE)(ids, offsets, torch.tensor([3]))
    assert logits.shape == (9, runner.config.vocab_size)
    assert logit_offsets.tolist() == [0, 3, 6, 9]  # MAX: [0, n, 2n, ...]
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(logits[3 * i:3 * i + 3], reference(hf, seq)[0][-3:], atol=1e-4, rtol=0)


def test_variable_never_reads_a_neighbours_rows(llama):
    """MAX's flaw fixed: a sequence shorter than n returns only its own rows; offsets follow real counts."""
    _, runner, hf = llama
    seqs, ids, offsets = ragged([5, 2, 1, 8], runner.config.vocab_size)
    _, logits, logit_offsets = max_model(runner, ReturnLogits.VARIABLE)(ids, offsets, 4)
    assert logit_offsets.tolist() == [0, 4, 6, 7, 11]
    for i, seq in enumerate(seqs):
        rows = logits[logit_offsets[i]:logit_offsets[i + 1]]
        torch.testing.assert_close(rows, reference(hf, seq)[0][-4:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", list(ReturnHiddenStates)[1:])
def test_hidden_states_follow_max(llama, mode):
    _, runner, hf = llama
    seqs, ids, offsets = ragged([3, 6], runner.config.vocab_size)
    out = max_model(runner, ReturnLogits.ALL, mode)(ids, offsets)
    assert len(out) == 4  # last_logits, logits, offsets, hidden
    hidden = out[3]
    n = runner.config.num_layers
    refs = [reference(hf, s)[1] for s in seqs]
    if mode == ReturnHiddenStates.ALL:
        # un-normalized final hidden states: the final norm applied to them gives transformers' last entry
        torch.testing.assert_close(runner.model.norm(hidden), torch.cat([r[n] for r in refs]), atol=1e-4, rtol=0)
        assert not torch.allclose(hidden, torch.cat([r[n] for r in refs]), atol=1e-3)
    elif mode == ReturnHiddenStates.ALL_NORMALIZED:
        torch.testing.assert_close(hidden, torch.cat([r[n] for r in refs]), atol=1e-4, rtol=0)
    elif mode == ReturnHiddenStates.LAST_NORMALIZED:
        torch.testing.assert_close(hidden, torch.stack([r[n][-1] for r in refs]), atol=1e-4, rtol=0)
    else:  # LAST, un-normalized
        torch.testing.assert_close(runner.model.norm(hidden), torch.stack([r[n][-1] for r in refs]), atol=1e-4, rtol=0)


def test_logits_scaling_and_softcap_apply_in_float32():
    h = [torch.randn(5, 8)]
    offsets = [torch.tensor([0, 2, 5])]
    head = torch.randn(11, 8)

    def lm_head(xs):
        return [x @ head.T for x in xs]

    plain = distributed_logits_postprocess(h, offsets, 1, [lambda x: x], lm_head, ReturnLogits.ALL)
    scaled = distributed_logits_postprocess(h, offsets, 1, [lambda x: x], lm_head, ReturnLogits.ALL, logits_scaling=4.0)
    capped = distributed_logits_postprocess(h, offsets, 1, [lambda x: x], lm_head, ReturnLogits.ALL, logits_softcap=2.0)
    torch.testing.assert_close(scaled[1], plain[1] / 4.0)
    torch.testing.assert_close(scaled[0], plain[0] / 4.0)
    torch.testing.assert_close(capped[1], torch.tanh(plain[1] / 2.0) * 2.0)
    assert capped[1].abs().max() < 2.0


def test_ragged_batch_equals_each_sequence_alone(llama):
    _, runner, _ = llama
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 100, 17, 1, 64]
    seqs, ids, offsets = ragged(lengths, runner.config.vocab_size, seed=3)
    spec = OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=3,
                      return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, -1))
    together = runner.run(ids, offsets, [spec] * len(seqs))
    for seq, joint in zip(seqs, together):
        alone = runner.run(seq, torch.tensor([0, len(seq)]), [spec])[0]
        # Same math per token; only the matmul blocking of a different token count can differ in the last bits.
        torch.testing.assert_close(joint.logits, alone.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.hidden_states, alone.hidden_states, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=0, equal_nan=True)
        assert torch.equal(joint.top_k_ids, alone.top_k_ids)


def test_mixed_requests_in_one_batch_each_get_what_they_asked(llama):
    _, runner, hf = llama
    seqs, ids, offsets = ragged([6, 10, 4, 7], runner.config.vocab_size, seed=5)
    specs = [
        OutputSpec(),  # last-token full logits
        OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True),
        OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=2, logits=False, top_k=4),
        OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST_NORMALIZED, layers=(-1, 1)),
    ]
    a, b, c, d = runner.run(ids, offsets, specs)
    refs = [reference(hf, s) for s in seqs]
    torch.testing.assert_close(a.logits, refs[0][0][-1:], atol=1e-4, rtol=0)
    assert a.target_logprobs is None and a.top_k_ids is None and a.hidden_states is None
    assert b.logits is None and b.target_logprobs.shape == (10,) and b.positions.tolist() == list(range(10))
    lp = torch.log_softmax(refs[1][0], -1)
    torch.testing.assert_close(b.target_logprobs[:-1], lp[:-1].gather(1, seqs[1][1:, None]).squeeze(1), atol=1e-4, rtol=0)
    assert c.logits is None and c.positions.tolist() == [2, 3] and c.top_k_ids.shape == (2, 4)
    assert torch.equal(c.top_k_ids, torch.log_softmax(refs[2][0], -1)[-2:].topk(4).indices)
    assert d.logits is None and d.layers == (runner.config.num_layers, 1)
    assert d.hidden_states.shape == (2, 1, runner.config.hidden_size) and d.hidden_positions.tolist() == [6]
    torch.testing.assert_close(d.hidden_states[0, 0], refs[3][1][-1][-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(d.hidden_states[1, 0], runner.model.norm(refs[3][1][1][-1]), atol=1e-4, rtol=0)


def test_lm_head_runs_only_on_needed_rows(llama, monkeypatch):
    _, runner, _ = llama
    seen = []
    head = runner.model.lm_head
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: seen.append(x.shape[0]) or original(x))
    _, ids, offsets = ragged([50, 30, 20], runner.config.vocab_size)
    runner.run(ids, offsets, [OutputSpec(), OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL),
                              OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=3, logits=False, target_logprobs=True)])
    assert seen == [4]  # 1 last-token row + 3 variable rows; the hidden-states-only sequence needs none


def test_runner_refuses_mismatched_specs(llama):
    _, runner, _ = llama
    with pytest.raises(ValueError):
        runner.run(torch.tensor([1, 2, 3]), torch.tensor([0, 3]), [OutputSpec(), OutputSpec()])


def test_blocks_past_the_deepest_output_are_skipped_and_the_last_one_runs_on_needed_rows(llama, monkeypatch):
    _, runner, hf = llama
    layers = runner.model.layers
    rows_seen: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        original = layer.mlp.forward
        monkeypatch.setattr(layer.mlp, "forward", lambda x, i=i, f=original: rows_seen.setdefault(i, []).append(x.shape[0]) or f(x))
    seqs, ids, offsets = ragged([9, 5, 12], runner.config.vocab_size, seed=7)
    last = len(layers) - 1
    # batch invariance runs every matmul on whole groups of rows (model/runtime/invariance.py)
    rows = invariance.padded_count if runner.batch_invariant else (lambda n: n)

    outs = runner.run(ids, offsets, [OutputSpec(), OutputSpec(logits=False, top_k=2), OutputSpec()])
    assert rows_seen[last] == [rows(3)] and rows_seen[0] == [rows(26)]  # the last block's MLP: a row per sequence
    refs = [reference(hf, seq)[0][-1:] for seq in seqs]
    torch.testing.assert_close(outs[0].logits, refs[0], atol=1e-4, rtol=0)
    assert torch.equal(outs[1].top_k_ids, refs[1].topk(2).indices)
    torch.testing.assert_close(outs[2].logits, refs[2], atol=1e-4, rtol=0)

    rows_seen.clear()  # hidden states of block 1 only: later blocks never run, block 1 only on the rows asked for
    outs = runner.run(ids, offsets, [OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST, layers=(1,))] * 3)
    assert sorted(rows_seen) == [0] and rows_seen[0] == [rows(3)]
    for seq, out in zip(seqs, outs):
        torch.testing.assert_close(out.hidden_states[0, -1], reference(hf, seq)[1][1][-1], atol=1e-4, rtol=0)


def test_scores_logsumexp_without_shift_falls_back_on_extreme_rows(llama, monkeypatch):
    """The scores path sums exp(logits) unshifted; rows that overflow (a logit above exp's float32 range) or
    underflow (every logit far below zero) are redone with the max shift. Checked against float64 log_softmax."""
    _, runner, _ = llama
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    table = torch.randn(6, vocab, generator=g) * 4
    table[1] += 95.0  # exp overflows
    table[2] -= 200.0  # every exp underflows to 0
    table[3, 7] = 120.0  # one huge logit
    table[4] -= 30.0  # small sums (about 1e-7), well inside the safe range: kept
    redone = []

    def fake_logits(rows_h):  # rows_h holds row numbers: the fallback asks for the rows it redoes
        idx = rows_h[:, 0].long()
        redone.append(idx.tolist())
        return table[idx].clone()

    monkeypatch.setattr(runner.scores, "compute_logits", fake_logits)
    assert runner.scores.in_place  # one process, float32: the unshifted in-place path
    rows_h = torch.arange(6.0)[:, None]
    targets = torch.tensor([3, 5, 9, 7, 11, -1])
    got = runner.scores(rows_h, targets, top_k=3)
    # under batch invariance the redone rows come in whole groups too (model/runtime/invariance.py)
    assert redone == [list(range(6)), invariance.pad_rows([1, 2, 3]) if runner.batch_invariant else [1, 2, 3]]
    logprobs = torch.log_softmax(table.double(), dim=-1)
    expected = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(got.target_logprobs[:5].double(), expected[:5], atol=1e-5, rtol=0)
    assert torch.isnan(got.target_logprobs[5])
    torch.testing.assert_close(got.top_k_logprobs.double(), logprobs.topk(3, dim=-1).values, atol=1e-5, rtol=0)
    assert torch.isfinite(got.top_k_logprobs).all()


def expected_scores(ref_logits: torch.Tensor, seq: torch.Tensor, vocab_ids: list[int]):
    """transformers' logits [n, V] -> (log-softmax at vocab_ids [n, k], target ranks [n] with -1 last, entropy [n]),
    computed in float64 from the full rows."""
    logprobs = torch.log_softmax(ref_logits.double(), dim=-1)
    targets = torch.cat([seq[1:], seq.new_tensor([0])])
    target_logit = ref_logits.gather(1, targets[:, None])
    ranks = 1 + (ref_logits > target_logit).sum(dim=-1)
    ranks[-1] = -1
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logprobs[:, vocab_ids], ranks, entropy


@pytest.mark.parametrize("full_logits", [False, True], ids=["chunked", "with-logits"])
def test_vocab_logprobs_target_ranks_and_entropy_match_transformers(llama, full_logits, monkeypatch):
    """The new scores, from the chunked scores path (in-place exp, chunks of 5 rows) and beside full logits."""
    _, runner, hf = llama
    monkeypatch.setattr(runner, "SCORE_CHUNK_ROWS", 5)
    vocab = runner.config.vocab_size
    seqs, ids, offsets = ragged([7, 1, 12], vocab, seed=3)
    chosen = [vocab - 1, 0, 17, 17]
    specs = [OutputSpec(return_logits=ReturnLogits.ALL, logits=full_logits, vocab_ids=chosen, target_ranks=True,
                        entropy=True),
             OutputSpec(logits=full_logits, entropy=True),  # no targets, no ids: left out
             OutputSpec(return_logits=ReturnLogits.ALL, logits=full_logits, vocab_ids=[3], target_ranks=True)]
    outs = runner.run(ids, offsets, specs)
    for seq, spec, out in zip(seqs, specs, outs):
        ref = reference(hf, seq)[0]
        rows = list(spec.logit_rows(len(seq)))
        want_vocab, want_ranks, want_entropy = (t[rows] for t in expected_scores(ref, seq, list(spec.vocab_ids or [0])))
        assert (out.vocab_logprobs is None) == (spec.vocab_ids is None)
        if spec.vocab_ids is not None:
            assert out.vocab_logprobs.dtype == torch.float32 and out.vocab_logprobs.shape == (len(rows), len(spec.vocab_ids))
            torch.testing.assert_close(out.vocab_logprobs.double(), want_vocab, atol=1e-4, rtol=0)
        assert (out.target_ranks is None) == (not spec.target_ranks)
        if spec.target_ranks:
            assert out.target_ranks.dtype == torch.int64 and torch.equal(out.target_ranks, want_ranks)
        assert (out.entropy is None) == (not spec.entropy)
        if spec.entropy:
            torch.testing.assert_close(out.entropy.double(), want_entropy, atol=1e-4, rtol=0)
        assert out.target_logprobs is None and out.top_k_ids is None


def test_new_scores_on_extreme_rows_use_the_shifted_fallback(llama, monkeypatch):
    """Entropy, ranks and chosen-id log-probs of rows that overflow or underflow exp: as float64's."""
    _, runner, _ = llama
    g = torch.Generator().manual_seed(1)
    table = torch.randn(4, 1000, generator=g) * 4
    table[1] += 95.0
    table[2] -= 200.0
    monkeypatch.setattr(runner.scores, "compute_logits", lambda rows_h: table[rows_h[:, 0].long()].clone())
    from model.runtime.scores import ScoreAsk

    vocab_ids = torch.tensor([[5, 999, -1]] * 4)
    targets = torch.tensor([3, 5, 9, -1])
    got = runner.scores(torch.arange(4.0)[:, None], targets,
                        ScoreAsk(vocab_ids=vocab_ids, target_ranks=True, entropy=True, target_logprobs=False))
    logprobs = torch.log_softmax(table.double(), dim=-1)
    torch.testing.assert_close(got.vocab_logprobs[:, :2].double(), logprobs[:, [5, 999]], atol=1e-5, rtol=0)
    assert torch.isnan(got.vocab_logprobs[:, 2]).all() and got.target_logprobs is None
    torch.testing.assert_close(got.entropy.double(), -(logprobs.exp() * logprobs).sum(-1), atol=1e-4, rtol=0)
    want_ranks = 1 + (table > table.gather(1, targets.clamp(min=0)[:, None])).sum(-1)
    assert got.target_ranks[:3].tolist() == want_ranks[:3].tolist() and got.target_ranks[3] == -1
