"""Parity with transformers (float32, 1e-4 absolute) for every supported architecture and rope type."""

import pytest
import torch

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits
from model.families.architectures import ARCHITECTURES
from tests.checkpoints import RECIPES, load_reference, make_checkpoint
from tests.model.helpers import ragged, reference

ATOL = 1e-4
LENGTHS = [1, 7, 37, 64]


def check_parity(path, lengths=LENGTHS):
    runner = ModelRunner.load(path, dtype="float32")
    hf = load_reference(path)
    n_layers = runner.config.num_layers
    seqs, ids, offsets = ragged(lengths, runner.config.vocab_size)
    specs = [
        OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=5,
                   return_hidden_states=ReturnHiddenStates.ALL, layers=tuple(range(n_layers))),
    ] * len(seqs)
    outs = runner.run(ids, offsets, specs)
    normalized = runner.run(ids, offsets, [OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED)] * len(seqs))
    for seq, out, norm_out in zip(seqs, outs, normalized):
        logits, hidden = reference(hf, seq)
        torch.testing.assert_close(out.logits, logits, atol=ATOL, rtol=0)
        # Layers 0..n-1 un-normalized match transformers' hidden_states[0..n-1]; the normalized last layer matches
        # its final entry (transformers applies the final norm there).
        for i in range(n_layers):
            torch.testing.assert_close(out.hidden_states[i], hidden[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(norm_out.hidden_states[0], hidden[n_layers], atol=ATOL, rtol=0)
        logprobs = torch.log_softmax(logits, -1)
        if len(seq) > 1:
            expected = logprobs[:-1].gather(1, seq[1:, None]).squeeze(1)
            torch.testing.assert_close(out.target_logprobs[:-1], expected, atol=ATOL, rtol=0)
        assert torch.isnan(out.target_logprobs[-1])
        top = logprobs.topk(5, dim=-1)
        torch.testing.assert_close(out.top_k_logprobs, top.values, atol=ATOL, rtol=0)
        assert torch.equal(out.positions, torch.arange(len(seq)))


# Classifiers' parity (pooled rows, num_labels columns) is tests/model/test_families.py's.
# (headless base models have no lm_head of their own to compare: tests/service/test_sentence_transformers.py)
CAUSAL_RECIPES = sorted(n for n, r in RECIPES.items()
                        if ARCHITECTURES[r.architecture].task == "causal-lm" and not n.endswith("-headless"))


@pytest.mark.parametrize("arch", CAUSAL_RECIPES)
def test_architecture_parity(arch, checkpoint_factory):
    check_parity(checkpoint_factory(arch))


ROPE_SCALINGS = {
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_rope_type_parity(rope, checkpoint_factory):
    # dynamic: sequences longer than max_position_embeddings (32) change the frequencies per sequence
    path = checkpoint_factory("llama", with_tokenizer=False, **{k: v for k, v in ROPE_SCALINGS[rope].items()})
    check_parity(path, lengths=[5, 31, 50, 70])


def test_transformers5_rope_parameters_checkpoint(tmp_path):
    """A checkpoint whose config.json uses transformers-5 `rope_parameters` (as the GGUF conversion writes)."""
    import json

    path = make_checkpoint(tmp_path, "llama", with_tokenizer=False, rope_theta=20000.0)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    runner = ModelRunner.load(path)
    assert runner.config.rope.theta == 20000.0
    check_parity(path, lengths=[9, 20])


def test_sharded_safetensors_index(tmp_path):
    path = make_checkpoint(tmp_path / "one", "qwen2", with_tokenizer=False)
    hf = load_reference(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    check_parity(tmp_path / "sharded", lengths=[3, 12])


def test_bfloat16_load_is_close(checkpoint_factory):
    path = checkpoint_factory("llama")
    fp32 = ModelRunner.load(path, dtype="float32")
    bf16 = ModelRunner.load(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    _, ids, offsets = ragged([20, 5], fp32.config.vocab_size)
    spec = [OutputSpec(return_logits=ReturnLogits.ALL)] * 2
    for a, b in zip(fp32.run(ids, offsets, spec), bf16.run(ids, offsets, spec)):
        assert b.logits.dtype == torch.float32  # logits are always float32
        rel = (a.logits - b.logits).norm() / a.logits.norm()
        assert rel < 3e-2


# Phi-3 at head_dim 64 (the shape below): LongRoPE factors for its 48 rotary dims, long ones past 32 tokens.
PHI3_HEAD64 = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                    "short_factor": [1.0 + 0.05 * i for i in range(24)],
                                    "long_factor": [1.0 + 0.4 * i for i in range(24)]})


# plain, q/k/v bias, q/k norm; the families: (1 + w) norms and gelu-tanh, soft-capped eager attention and sandwich
# norms, per-type rope and q/k norms, LongRoPE with partial rotary, whole-projection q/k norms, NoPE layers
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"])
def test_float32_decoder_has_transformers_bits(arch, checkpoint_factory):
    """On CPU in float32 a sequence's hidden states are transformers' bit for bit (a 300-token one too, where half
    precision cuts attention into query blocks). A real model amplifies any other summation order through its
    layers: SmolLM2-135M's logits then drift past 1e-4 (tests/service/test_default_model). Only the lm_head runs
    another kernel (model.layers.base.head_linear).

    One sequence per call, of more than one token: a packed batch runs a short sequence's rows through the
    matmuls of the whole batch, and one row takes a matrix-vector kernel whose rounding follows the weight's address
    (transformers' weights lie at the file's offsets); the parity tests bound both. The widths are a real model's
    multiples (head_dim 64, intermediate 256): torch's elementwise kernels take a scalar tail, with other bits, on
    rows of odd widths, so silu of the fused gate|up output's gate half would differ from silu of transformers'
    separate gate output for a width of 112.

    Batch invariance (the CPU default) runs every matmul on whole groups of 4 rows (model/runtime/invariance.py), which are
    transformers' bits where transformers' own call is whole groups too (300 tokens; MKL gives a short call's last
    n % 4 rows other bits, see tests/model/test_batch_invariance.py): the plain path is held to transformers' bits
    on every length, the invariant one on 300 tokens."""
    extra = PHI3_HEAD64 if arch == "phi3" else {}
    path = checkpoint_factory(arch, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256, **extra)
    # the attention with its bits (prefix-stable attention is another summation order)
    plain = ModelRunner.load(path, dtype="float32", batch_invariant=False, prefix_sharing=False)
    invariant = ModelRunner.load(path, dtype="float32", prefix_sharing=False)
    assert invariant.batch_invariant
    hf = load_reference(path, attention=None)  # transformers' default: SDPA, eager for Gemma 2
    n_layers = plain.config.num_layers
    spec = OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL, layers=tuple(range(n_layers + 1)))
    seqs, _, _ = ragged([300, 37, 7], plain.config.vocab_size, seed=3)
    for seq in seqs:
        _, hidden = reference(hf, seq)
        for runner in (plain, invariant) if len(seq) % 4 == 0 else (plain,):
            (out,) = runner.run(seq, torch.tensor([0, len(seq)]), [spec])
            for i in range(n_layers):
                assert torch.equal(out.hidden_states[i], hidden[i]), (arch, len(seq), i, runner.batch_invariant)
