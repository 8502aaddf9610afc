"""Batch invariance (model/runtime/invariance.py): with the switch on, every output of a sequence is the same bits whether it
runs alone, in any batch, at any position in the batch; at 1, 2 and 3 threads, and within tp 2 and tp 3.

The checkpoints have odd widths (intermediate 101, vocabulary 301, head_dim 24) so that torch's element-wise
kernels take scalar tails, one a vocabulary over 32768 (one-row reductions split between threads), and the batches
mix 1-token and 300-650-token sequences so that element-wise calls pass 32768 elements and get cut between threads.
Comparisons are of bits (NaN included), never a tolerance."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, launch_local
from model.runtime import invariance
from model.layers.base import gelu_tanh, head_linear
from tests.checkpoints import load_reference, make_checkpoint
from tests.model.helpers import pack, ragged, reference

OUTPUTS = ("logits", "target_logprobs", "top_k_ids", "top_k_logprobs", "vocab_logprobs", "target_ranks", "entropy",
           "hidden_states", "positions", "hidden_positions")

# Every output kind, every hidden-state mode, several layers (0 = embeddings, an inner block, the last).
SPECS = [
    OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=5, entropy=True),
    # scores only: the chunked head with the in-place log-sum-exp
    OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, top_k=3, target_ranks=True,
               vocab_ids=(7, 3, 250)),
    OutputSpec(return_logits=ReturnLogits.ALL, logits=False, entropy=True, vocab_ids=(0,)),
    OutputSpec(),  # last-token logits: the last block runs on a row subset
    OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=4, logits=False, top_k=20),
    OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, -1)),
    OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST, layers=(1,)),
    OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED, layers=(-1, 2)),
    OutputSpec(logits=False, target_logprobs=True, return_hidden_states=ReturnHiddenStates.LAST_NORMALIZED),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integers with a float tensor's bits: torch.equal on them compares bits, NaN included."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def assert_same_bits(got, want, where: str) -> None:
    for name in OUTPUTS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), (where, name)
        if a is not None:
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), (where, name)
    assert got.layers == want.layers


def run_alone(runner, seqs, specs):
    return [runner.run(*pack([s]), [spec])[0] for s, spec in zip(seqs, specs)]


def mixed_batches(n: int, count: int, seed: int):
    """`count` random batches of sequence indices: a random subset of the n sequences in random order."""
    rnd = random.Random(seed)
    return [rnd.sample(range(n), rnd.randint(2, n)) for _ in range(count)]


def tie_logits(path, tokens: range) -> None:
    """Give `tokens` one lm_head row, long enough to lead many positions: equal logits at the top, as untrained
    or duplicated vocabulary entries give, where torch's top-k orders ties in a way that follows k."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight"]
    head[tokens.start : tokens.stop] = head[tokens.start] * 4
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """4 query heads and 1 kv head of 24 dims: rotary's complex products run over 5 heads x 12 pairs per token, so
    that thread cuts fall inside rows whatever the row padding."""
    path = make_checkpoint(tmp_path_factory.mktemp("odd"), "llama", with_tokenizer=False, hidden_size=96,
                           intermediate_size=101, vocab_size=301, num_heads=4, num_kv_heads=1, num_layers=3,
                           max_position_embeddings=1024)
    tie_logits(path, range(40, 60))
    return path


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    """q/k norm (rotary on the checkpoint's order), head_dim 24, tied head; a vocabulary over 32768 entries, where
    torch splits a one-row reduction between threads."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", with_tokenizer=False, hidden_size=64,
                           intermediate_size=101, vocab_size=32771, num_heads=4, num_kv_heads=2, num_layers=2,
                           max_position_embeddings=1024, tie_word_embeddings=True)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# 1-12 tokens (MKL's short calls), 300-650 (element-wise calls cut between threads); equal lengths share SDPA calls
LENGTHS = [1, 1, 2, 3, 5, 7, 12, 37, 37, 301, 650, 523]


@pytest.mark.parametrize(
    ("ckpt", "threads", "dtype"),
    [("odd_checkpoint", 1, "float32"), ("odd_checkpoint", 2, "float32"), ("odd_checkpoint", 3, "float32"),
     ("qwen3_checkpoint", 2, "float32"), ("qwen3_checkpoint", 3, "float32"), ("odd_checkpoint", 2, "bfloat16")],
    indirect=["threads"],
)
def test_every_output_is_the_same_bits_in_any_batch(ckpt, threads, dtype, request):
    runner = ModelRunner.load(request.getfixturevalue(ckpt), dtype=dtype)
    assert runner.batch_invariant  # the default on the CPU
    seqs, _, _ = ragged(LENGTHS, runner.config.vocab_size, seed=threads)
    specs = [SPECS[i % len(SPECS)] for i in range(len(seqs))]
    alone = run_alone(runner, seqs, specs)
    rnd = random.Random(threads)
    for chosen in mixed_batches(len(seqs), count=4, seed=threads):
        # the same sequence may ask for something else in another batch: every spec is checked against its own
        # lone run, and the neighbours' specs change the batch's paths (full logits or not, largest top-k)
        batch_specs = [specs[i] for i in chosen]
        outs = runner.run(*pack([seqs[i] for i in chosen]), batch_specs)
        for pos, (i, out) in enumerate(zip(chosen, outs)):
            where = f"{ckpt} {dtype} threads={threads} seq {i} (n={len(seqs[i])}) at {pos} of {chosen}"
            assert_same_bits(out, alone[i], where)
        # the same batch with every sequence asking for one spec (rows of one kind meet in the lm_head and the
        # last block's subset)
        spec = SPECS[rnd.randrange(len(SPECS))]
        ref = run_alone(runner, [seqs[i] for i in chosen], [spec] * len(chosen))
        for pos, (out, want) in enumerate(zip(runner.run(*pack([seqs[i] for i in chosen]), [spec] * len(chosen)), ref)):
            assert_same_bits(out, want, f"{ckpt} {dtype} threads={threads} one spec, seq at {pos} of {chosen}")


def test_switch_off_is_variant(odd_checkpoint):
    """Negative control: without the switch, a short sequence's hidden states and logits change with its
    neighbours (MKL's last M % 4 rows in a call of under 12 rows at 2 threads): the test above would catch a
    regression. Several sequences, so that the control does not hang on one kernel's choice."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = ModelRunner.load(odd_checkpoint, dtype="float32", batch_invariant=False)
        invariant = ModelRunner.load(odd_checkpoint, dtype="float32", batch_invariant=True)
        spec = OutputSpec(return_logits=ReturnLogits.ALL, return_hidden_states=ReturnHiddenStates.ALL, layers=(1, -1))
        seqs, _, _ = ragged([1, 3, 5, 7, 10], plain.config.vocab_size, seed=11)
        neighbour = ragged([41], plain.config.vocab_size, seed=12)[0][0]
        varied = 0
        for seq in seqs:
            for runner in (plain, invariant):
                alone = runner.run(*pack([seq]), [spec])[0]
                batched = runner.run(*pack([neighbour, seq]), [spec, spec])[1]
                same = torch.equal(bits(alone.hidden_states), bits(batched.hidden_states)) and torch.equal(
                    bits(alone.logits), bits(batched.logits))
                if runner is invariant:
                    assert same, len(seq)
                else:
                    varied += not same
        assert varied >= 3, f"only {varied} of {len(seqs)} sequences changed with a neighbour without the switch"
    finally:
        torch.set_num_threads(before)


def test_lone_sequences_keep_transformers_bits_where_its_matmuls_are_whole_row_groups(checkpoint_factory):
    """transformers' own matmuls over n rows are MKL's row-group bits when n is a multiple of 4 or at least 12 (at
    2 threads); a lone sequence of such a length keeps transformers' hidden states bit for bit under the switch.
    Shorter ones of other lengths get the row-group bits, within float32 rounding of transformers'."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = checkpoint_factory("llama", hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256)
        # the attention with transformers' bits (prefix-stable attention sums in another order: prefix_sharing.md)
        runner = ModelRunner.load(path, dtype="float32", prefix_sharing=False)
        hf = load_reference(path, attention="sdpa")
        n_layers = runner.config.num_layers
        spec = OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL, layers=tuple(range(n_layers + 1)))
        seqs, _, _ = ragged([8, 12, 13, 300, 7, 1], runner.config.vocab_size, seed=3)
        for seq in seqs:
            (out,) = runner.run(*pack([seq]), [spec])
            _, hidden = reference(hf, seq)
            for i in range(n_layers):
                if len(seq) % 4 == 0 or len(seq) >= 12:
                    assert torch.equal(out.hidden_states[i], hidden[i]), (len(seq), i)
                else:
                    torch.testing.assert_close(out.hidden_states[i], hidden[i], atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(before)


# Every family's quirks (gelu-tanh, sandwich norms, soft-capped eager attention, per-layer windows and rope tables,
# LongRoPE, q/k norms over the projection, NoPE layers, MoE experts) and classifier heads, at odd widths.
FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "olmo2", "smollm3", "granite", "mistral", "qwen3_moe",
            "llama-classifier", "gemma-classifier"]
FAMILY_LENGTHS = [1, 2, 3, 5, 7, 12, 40, 40, 150, 230]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_the_same_bits_in_any_batch(family, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3 if family == "gemma" else 2)  # gemma: gelu-tanh over rows cut between 3 threads
    try:
        path = make_checkpoint(tmp_path, family, with_tokenizer=False, intermediate_size=101, vocab_size=301,
                               max_position_embeddings=512)
        runner = ModelRunner.load(path, dtype="float32")
        assert runner.batch_invariant
        seqs, _, _ = ragged(FAMILY_LENGTHS, 301, seed=5)
        if runner.config.task == "classification":
            specs = [OutputSpec(), OutputSpec(return_logits=ReturnLogits.ALL),
                     OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST_NORMALIZED)]
        else:
            specs = SPECS
        specs = [specs[i % len(specs)] for i in range(len(seqs))]
        alone = run_alone(runner, seqs, specs)
        for chosen in mixed_batches(len(seqs), count=3, seed=len(family)):
            outs = runner.run(*pack([seqs[i] for i in chosen]), [specs[i] for i in chosen])
            for pos, (i, out) in enumerate(zip(chosen, outs)):
                assert_same_bits(out, alone[i], f"{family} seq {i} (n={len(seqs[i])}) at {pos} of {chosen}")
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- tensor parallelism


def _tp_lone_and_batched(ctx, path, seqs, specs, batches):
    torch.set_num_threads(1)
    runner = ModelRunner.load(path, parallel=ctx, dtype="float32")
    assert runner.batch_invariant and runner.parallel.sum_in_rank_order
    alone = run_alone(runner, seqs, specs)
    batched = [runner.run(*pack([seqs[i] for i in chosen]), [specs[i] for i in chosen]) for chosen in batches]
    return alone, batched


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory):
    """6 heads over 3 kv heads: tp 2 and tp 3 both divide them; odd intermediate and vocabulary split unevenly."""
    return make_checkpoint(tmp_path_factory.mktemp("tp"), "llama", with_tokenizer=False, hidden_size=96,
                           num_heads=6, num_kv_heads=3, intermediate_size=101, vocab_size=301, num_layers=2,
                           max_position_embeddings=1024)


@pytest.mark.parametrize("tp", [2, 3])
def test_tensor_parallel_outputs_are_the_same_bits_in_any_batch(tp, tp_checkpoint):
    """Within one tp degree (tp 3 sums the all-reduce in rank order; gloo's ring order follows the buffer)."""
    seqs, _, _ = ragged([1, 6, 23, 333], 301, seed=tp)
    specs = [SPECS[i % len(SPECS)] for i in range(len(seqs))]
    batches = [[3, 0, 1, 2], [1, 2], [2, 3, 0]]
    per_rank = launch_local(_tp_lone_and_batched, tp, str(tp_checkpoint), seqs, specs, batches)
    for rank, (alone, batched) in enumerate(per_rank):
        for chosen, outs in zip(batches, batched):
            for pos, (i, out) in enumerate(zip(chosen, outs)):
                assert_same_bits(out, alone[i], f"tp={tp} rank {rank} seq {i} at {pos} of {chosen}")
        for got, want in zip(alone, per_rank[0][0]):
            assert_same_bits(got, want, f"tp={tp} rank {rank} against rank 0")


# ------------------------------------------------------------------------- the kernel properties it rests on


def test_matmul_rows_keep_their_bits_in_calls_of_whole_row_groups():
    """MKL (decoder) and oneDNN (lm_head): a row's bits are the same in every call of a multiple of 4 rows, wherever
    the row sits; the property the row padding rests on. At 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for k, n, head in ((64, 202, False), (101, 64, False), (576, 960, False), (64, 301, True)):
                w = torch.randn(n, k, generator=g)
                x = torch.randn(600, k, generator=g)
                linear = (lambda a: head_linear(a, w)) if head else (lambda a: F.linear(a, w))
                want = torch.cat([linear(x[i : i + 4]) for i in range(0, 600, 4)])
                for m in (4, 8, 12, 16, 20, 64, 132, 400, 600):
                    start = int(torch.randint(0, 600 - m + 1, (1,), generator=g))
                    assert torch.equal(linear(x[start : start + m]), want[start : start + m]), (t, k, n, head, m)
    finally:
        torch.set_num_threads(before)


def test_silu_and_rotary_products_keep_each_rows_bits():
    """invariance.activation (silu) and complex_mul_rows give each row the bits of its lone call at 3 threads, where torch's
    own calls cut rows of odd width between threads (F.silu's scalar tail rounds otherwise)."""
    g = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        base = torch.randn(1200, 2 * 101, generator=g) * 4
        gate = base[:, :101]  # the gate half of a fused gate|up output
        alone = torch.cat([F.silu(gate[i : i + 1]) for i in range(len(gate))])
        a = torch.view_as_complex(torch.randn(1200, 5, 12, 2, generator=g))
        b = torch.view_as_complex(torch.randn(1200, 1, 12, 2, generator=g))
        alone_ab = torch.cat([a[i : i + 1] * b[i : i + 1] for i in range(len(a))])
        plain_varied = 0
        for t in (1100, 1101, 1102, 999, 500, 333, 7):
            assert torch.equal(invariance.activation(F.silu, gate[:t]), alone[:t]), t
            product = invariance.complex_mul_rows(a[:t], b[:t])
            assert torch.equal(torch.view_as_real(product), torch.view_as_real(alone_ab[:t])), t
            plain_varied += not torch.equal(F.silu(gate[:t]), alone[:t])
        assert plain_varied  # the control: torch's own call does move bits here
    finally:
        torch.set_num_threads(before)


def test_gelu_keeps_each_rows_bits_under_its_own_thread_cuts():
    """torch's GELU kernel cuts a call of more than 6144 elements into one range per thread (not at 32768 elements
    as other element-wise kernels): invariance.activation with per_thread_grain follows that rule; with the other
    rule's blocks some rows take other bits (the control)."""
    g = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        gate = (torch.randn(1200, 2 * 101, generator=g) * 4)[:, :101]
        alone = torch.cat([gelu_tanh(gate[i : i + 1]) for i in range(len(gate))])
        other_rule_varied = 0
        for t in (232, 328, 500, 333, 1100, 1101, 999, 7):
            assert torch.equal(invariance.activation(gelu_tanh, gate[:t], per_thread_grain=True), alone[:t]), t
            other_rule_varied += not torch.equal(invariance.activation(gelu_tanh, gate[:t]), alone[:t])
        assert other_rule_varied
    finally:
        torch.set_num_threads(before)


def test_row_blocks_cut_only_where_no_element_changes_path():
    # 2 threads, width a multiple of 64: one block whatever the rows (cuts fall on vector blocks)
    assert invariance.row_blocks(1001, 1536, 1536, 4, threads=2) == [(0, 1001)]
    # odd width, 3 threads: blocks whose thread cuts fall on row starts, and a serial remainder
    blocks = invariance.row_blocks(1001, 101, 101, 4, threads=3)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1001 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    for a, b in blocks:
        assert invariance._cuts_keep_runs((b - a) * 101, 101, 4, 3)


def test_top_k_as_alone_settles_ties_as_each_rows_own_k():
    row = torch.zeros(3, 1000)
    row[:, ::7] = 1.0  # 143 equal maxima: torch's order of equal values follows k
    row[1, 500] = 2.0
    row[2] = torch.arange(1000.0)  # no ties: served from the wider top-k
    ks = torch.tensor([3, 50, 5])
    values, ids = row.topk(51, dim=-1)
    v, i = invariance.top_k_as_alone(values, ids, ks, 50, lambda rows, k: row.index_select(0, rows).topk(k, dim=-1))
    for r, k in enumerate(ks.tolist()):
        want = row[r : r + 1].topk(k, dim=-1)
        assert torch.equal(v[r, :k], want.values[0]) and torch.equal(i[r, :k], want.indices[0]), r


def test_reductions_over_one_long_row_are_split_between_threads():
    """Why the lm_head keeps 4 rows or more: one output over 32768 elements or more is summed in per-thread parts,
    several outputs each in one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 49152, generator=torch.Generator().manual_seed(2)) * 3
        many = x.sum(-1)
        assert all(torch.equal(x[i : i + 4].sum(-1), many[i : i + 4]) for i in range(0, 64, 4))
        assert not all(torch.equal(x[i : i + 1].sum(-1), many[i : i + 1]) for i in range(64))
    finally:
        torch.set_num_threads(before)


def test_padding_helpers():
    ids, offsets = invariance.pad_batch(torch.arange(7), torch.tensor([0, 3, 7]))
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0] and offsets.tolist() == [0, 3, 7, 8]
    ids, offsets = invariance.pad_batch(torch.arange(8), torch.tensor([0, 8]))
    assert len(ids) == 8 and offsets.tolist() == [0, 8]
    assert invariance.pad_rows([4, 9]) == [4, 9, 9, 9] and invariance.pad_rows([1, 2, 3, 4]) == [1, 2, 3, 4]


def test_switch_defaults_and_refusals(odd_checkpoint):
    assert ModelRunner.load(odd_checkpoint, dtype="bfloat16").batch_invariant  # on for the CPU, any dtype
    assert not ModelRunner.load(odd_checkpoint, batch_invariant=False).batch_invariant
    assert invariance.resolve(None, torch.device("cuda")) is False
    with pytest.raises(ValueError, match="CPU only"):
        invariance.resolve(True, torch.device("cuda"))
