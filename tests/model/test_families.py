"""The families of docs/families.md and the sequence classifiers against transformers (float32): every layer's
hidden states and every logit row within 1e-4, classifiers pooled on the last token that is not padding; tensor
parallelism at tp 2 and 4 against tp 1; refusals that name what is supported.

The causal families' parity at tp 1 runs in test_parity.py (every recipe) and at tp 2 in test_tensor_parallel.py;
here: the classifiers, the reward model, tp 4 for the new families, tp 2 and 4 for classifiers."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, UnsupportedModelError, launch_local
from model.families.architectures import ARCHITECTURES
from model.families.config import SUPPORTED_ROPE_TYPES, ModelConfig
from model.runtime.outputs import VOCABULARY_FIELDS
from model.task import Task
from tests.checkpoints import CLASSIFIER_PAD, RECIPES, load_reference
from tests.model.helpers import ragged
from tests.model.test_tensor_parallel import SPEC, assert_same, run_cases

ATOL = 1e-4
FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"]
CLASSIFIERS = sorted(name for name, r in RECIPES.items() if ARCHITECTURES[r.architecture].task == Task.CLASSIFICATION)


def classifier_batch(vocab: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sequences whose pooled row is the last token, an inner one (padding at the end), the first (all padding):
    lengths 37, 9 (3 pads at the end, one inside), 1, 4 (all pads), 12 (no pad)."""
    seqs, _, _ = ragged([37, 9, 1, 4, 12], vocab, seed=seed)
    seqs = [torch.where(s == CLASSIFIER_PAD, CLASSIFIER_PAD + 1, s) for s in seqs]  # pads only where placed
    seqs[1][[3, 6, 7, 8]] = CLASSIFIER_PAD
    seqs[3][:] = CLASSIFIER_PAD
    offsets = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()])
    return seqs, torch.cat(seqs), offsets


@torch.no_grad()
def check_classifier(path) -> float:
    """Our pooled logits, all-rows logits and hidden states against transformers' classifier, per sequence. Returns
    the largest |difference| of a logit."""
    runner = ModelRunner.load(path, dtype="float32")
    hf = load_reference(path)
    config = runner.config
    assert config.task == Task.CLASSIFICATION and config.num_labels == hf.config.num_labels
    assert config.id2label == hf.config.id2label
    seqs, ids, offsets = classifier_batch(config.vocab_size)
    layers = tuple(range(config.num_layers))
    pooled = runner.run(ids, offsets, [OutputSpec(return_hidden_states=ReturnHiddenStates.ALL, layers=layers)] * 5)
    every = runner.run(ids, offsets, [OutputSpec(return_logits=ReturnLogits.ALL)] * 5)
    worst = 0.0
    expected_positions = [36, 5, 0, 0, 11]
    for seq, out, all_rows, position in zip(seqs, pooled, every, expected_positions):
        ref = hf(seq[None], output_hidden_states=True)
        assert out.positions.tolist() == [position]
        assert out.logits.shape == (1, config.num_labels)
        torch.testing.assert_close(out.logits, ref.logits.float(), atol=ATOL, rtol=0)
        for i in range(config.num_layers):
            torch.testing.assert_close(out.hidden_states[i], ref.hidden_states[i][0], atol=ATOL, rtol=0)
        rows = hf.score(ref.hidden_states[-1][0]).float()  # the head at every position, on the final-normed rows
        torch.testing.assert_close(all_rows.logits, rows, atol=ATOL, rtol=0)
        worst = max(worst, (out.logits - ref.logits).abs().max().item(), (all_rows.logits - rows).abs().max().item())
    return worst


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_parity(name, checkpoint_factory):
    check_classifier(checkpoint_factory(name, with_tokenizer=False))


def test_reward_model_last_token_equals_transformers_logits(checkpoint_factory):
    """A one-label LlamaForSequenceClassification (a reward model): the runner's last_token row is transformers'
    `model(input_ids).logits`, within 1e-5."""
    path = checkpoint_factory("llama-classifier", with_tokenizer=False)
    runner = ModelRunner.load(path, dtype="float32")
    config = runner.config
    assert (config.task, config.num_labels, config.id2label) == (Task.CLASSIFICATION, 1, {0: "LABEL_0"})
    hf = load_reference(path, attention=None)
    seqs, ids, offsets = classifier_batch(runner.config.vocab_size, seed=4)
    for seq, out in zip(seqs, runner.run(ids, offsets, [OutputSpec()] * len(seqs))):
        with torch.no_grad():
            expected = hf(seq[None]).logits.float()
        assert expected.shape == (1, 1)
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


def test_classifier_refuses_vocabulary_scores(checkpoint_factory):
    """Every output the table marks as reading a next-token vocabulary (before: target_logprobs and top_k only;
    vocab_ids, target_ranks and entropy were computed over the labels)."""
    runner = ModelRunner.load(checkpoint_factory("qwen3-classifier", with_tokenizer=False))
    _, ids, offsets = ragged([5], runner.config.vocab_size)
    asks = {"target_logprobs": True, "top_k": 2, "vocab_ids": (0, 1), "target_ranks": True, "entropy": True}
    assert set(asks) == set(VOCABULARY_FIELDS)
    for name, value in asks.items():
        with pytest.raises(ValueError, match=f"{name} need.*classifier .*3 labels.*ask for logits"):
            runner.run(ids, offsets, [OutputSpec(logits=False, **{name: value})])
    assert runner.run(ids, offsets, [OutputSpec()])[0].logits.shape == (1, 3)


def test_classifier_labels_read_as_transformers_reads_them(checkpoint_factory):
    config = json.loads((checkpoint_factory("gemma2-classifier", with_tokenizer=False) / "config.json").read_text())
    assert ModelConfig.from_hf_config(config).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    named = {**config, "id2label": {"0": "bad", "1": "good"}}
    named.pop("num_labels", None)
    parsed = ModelConfig.from_hf_config(named)
    assert (parsed.num_labels, parsed.id2label) == (2, {0: "bad", 1: "good"})
    # a causal LM has neither
    assert ModelConfig.from_hf_config({**config, "architectures": ["Gemma2ForCausalLM"]}).num_labels == 0


# --- tensor parallelism ---


# tp 4: the new families and three classifiers (the reward model, OLMo 2's sharded q/k norm, Gemma 3's per-type
# rope); tp 2: classifiers of the other traits (soft-caps, fused LongRoPE, q/k norm, NoPE) and the reward model.
TP4_CASES = (*FAMILIES, "llama-classifier", "olmo2-classifier", "gemma3-classifier")
TP2_CASES = ("llama-classifier", "gemma2-classifier", "phi3-classifier", "qwen3-classifier", "smollm3-classifier")


@pytest.fixture(scope="module")
def tp_cases(tmp_path_factory):
    """By recipe name: (path, ids, offsets, specs) and its tp-1 outputs; 4 query heads over 2 kv heads (kv heads
    replicated at tp 4)."""
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("families-tp")
    cases = {}
    for i, name in enumerate(dict.fromkeys(TP4_CASES + TP2_CASES)):
        path = make_checkpoint(root / name, name, with_tokenizer=False, num_heads=4, num_kv_heads=2, vocab_size=300)
        if name in CLASSIFIERS:
            _, ids, offsets = classifier_batch(300, seed=i)
            specs = [OutputSpec(return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, -1)),
                     OutputSpec(return_logits=ReturnLogits.ALL)] * 2 + [OutputSpec()]
        else:
            _, ids, offsets = ragged([1, 9, 40, 23], 300, seed=i)
            specs = [SPEC] * 4
        case = (str(path), ids, offsets, specs)
        cases[name] = (case, ModelRunner.load(path).run(ids, offsets, specs))
    return cases


@pytest.mark.parametrize("tp, names", [(4, TP4_CASES), (2, TP2_CASES)])
def test_families_and_classifiers_match_tp1(tp, names, tp_cases):
    for rank_results in launch_local(run_cases, tp, [tp_cases[n][0] for n in names]):
        for (outs, _), name in zip(rank_results, names):
            assert_same(outs, tp_cases[name][1])


# --- refusals ---


def test_refusals_name_what_is_supported(checkpoint_factory):
    config = json.loads((checkpoint_factory("gemma3", with_tokenizer=False) / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=r"Gemma3ForConditionalGeneration is a multimodal .*Gemma3ForCausalLM"):
        ModelConfig.from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": config})
    with pytest.raises(UnsupportedModelError, match=r"multimodal .*Gemma3TextForSequenceClassification"):
        ModelConfig.from_hf_config({**config, "architectures": ["Gemma3ForSequenceClassification"]})
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'MambaForCausalLM'; supported: .*"
                                                    "Gemma2ForCausalLM.*SmolLM3ForSequenceClassification"):
        ModelConfig.from_hf_config({**config, "architectures": ["MambaForCausalLM"]})
    llama = json.loads((checkpoint_factory("llama", with_tokenizer=False) / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="unsupported rope type 'mrope'; supported: " +
                       ", ".join(SUPPORTED_ROPE_TYPES)):
        ModelConfig.from_hf_config({**llama, "rope_scaling": None, "rope_parameters": {"rope_type": "mrope"}})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_config({**config, "use_bidirectional_attention": True})


def test_classifier_max_forward_reads_the_pooled_rows(checkpoint_factory):
    """MAX's call (`forward`) on a classifier: its last_logits are the runner's last_token rows (pooled rows); not
    bit for bit (the runner's last block computes only the needed rows, other matmul shapes)."""
    runner = ModelRunner.load(checkpoint_factory("gemma2-classifier", with_tokenizer=False))
    _, ids, offsets = classifier_batch(runner.config.vocab_size)
    with torch.inference_mode():
        last_logits = runner.model(ids, offsets)[0]
    expected = torch.cat([out.logits for out in runner.run(ids, offsets, [OutputSpec()] * 5)])
    torch.testing.assert_close(last_logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_hidden_states_have_transformers_bits(name, checkpoint_factory):
    """In bfloat16 each family's blocks round where transformers' do (Gemma's float32 (1 + w) norms, OLMo 2's
    float32 rotary, Gemma 2's eager softmax in float32...): a lone sequence's hidden states bit for bit."""
    path = checkpoint_factory(name, with_tokenizer=False)
    runner = ModelRunner.load(path, dtype="bfloat16", prefix_sharing=False)  # the attention with its bits
    hf = load_reference(path, dtype=torch.bfloat16, attention=None)
    layers = tuple(range(runner.config.num_layers))
    seqs, _, _ = ragged([20], runner.config.vocab_size, seed=2)
    (out,) = runner.run(seqs[0], torch.tensor([0, 20]), [OutputSpec(logits=False, layers=layers,
                                                                     return_hidden_states=ReturnHiddenStates.ALL)])
    with torch.no_grad():
        hidden = hf(seqs[0][None], output_hidden_states=True).hidden_states
    for i in layers:
        assert torch.equal(out.hidden_states[i], hidden[i][0]), (name, i)
