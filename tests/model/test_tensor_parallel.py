"""Tensor parallelism on CPU with gloo: tp=2 and tp=4 equal tp=1 and transformers."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, launch_local
from model.families.architectures import ARCHITECTURES
from model.families.tp import HeadLayout
from model.families.config import ModelConfig
from tests.checkpoints import RECIPES, make_checkpoint
from tests.model.helpers import ragged

SPEC = OutputSpec(return_logits=ReturnLogits.ALL, target_logprobs=True, top_k=6, vocab_ids=(0, 299, 150, 0),
                  target_ranks=True, entropy=True, return_hidden_states=ReturnHiddenStates.ALL, layers=(0, 1, -1))
NORMALIZED = OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED, layers=(-1, 2))
LEAN = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, top_k=6, vocab_ids=(299, 1, 2),
                  target_ranks=True, entropy=True)
SPARSE = OutputSpec(return_logits=ReturnLogits.VARIABLE, return_n_logits=3, target_logprobs=True, top_k=6)
LAST_HIDDEN = OutputSpec(logits=False, return_hidden_states=ReturnHiddenStates.LAST_NORMALIZED, layers=(-1, 1))


def run_cases(ctx, cases):
    """On each rank: load every checkpoint sharded and run its batch. Returns outputs and parameter bytes."""
    torch.set_num_threads(1)
    results = []
    for path, ids, offsets, specs in cases:
        runner = ModelRunner.load(path, parallel=ctx, dtype="float32")
        nbytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        results.append((runner.run(ids, offsets, specs), nbytes))
    return results


def assert_same(outs, expected, atol=1e-4):
    for got, want in zip(outs, expected):
        assert torch.equal(got.positions, want.positions)
        for field in ("logits", "target_logprobs", "top_k_logprobs", "vocab_logprobs", "entropy", "hidden_states"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True)
        assert (got.target_ranks is None) == (want.target_ranks is None)
        if want.target_ranks is not None:
            assert torch.equal(got.target_ranks, want.target_ranks)
        if want.top_k_ids is not None:
            # ids may only differ where log-probs tie
            differ = got.top_k_ids != want.top_k_ids
            assert not differ.any() or torch.allclose(got.top_k_logprobs[differ], want.top_k_logprobs[differ], atol=1e-5)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every architecture, plus the hard shapes: kv heads fewer than ranks, odd vocab/intermediate, tied head."""
    root = tmp_path_factory.mktemp("tp")
    causal = sorted(n for n, r in RECIPES.items() if ARCHITECTURES[r.architecture].task == "causal-lm")
    paths = [make_checkpoint(root / arch, arch, with_tokenizer=False, num_heads=4, num_kv_heads=2, vocab_size=300)
             for arch in causal]  # classifiers: tests/model/test_families.py
    paths.append(make_checkpoint(root / "odd", "qwen2", with_tokenizer=False, num_heads=8, num_kv_heads=2,
                                 vocab_size=301, intermediate_size=101, tie_word_embeddings=True))
    # 6 heads over 3 kv heads at tp=2: kv head 1 is on both ranks and the groups are irregular ([0,0,1], [0,1,1])
    paths.append(make_checkpoint(root / "gqa6", "llama", with_tokenizer=False, hidden_size=96, num_heads=6,
                                 num_kv_heads=3, vocab_size=303))
    out = []
    for i, path in enumerate(paths):
        _, ids, offsets = ragged([1, 9, 40, 23], 300, seed=i)
        # The last case needs only a few rows of the last block (it runs on those rows alone, sharded too).
        specs = [SPEC, NORMALIZED, LEAN, SPEC] if i < len(paths) - 1 else [SPARSE, OutputSpec(), SPARSE, LAST_HIDDEN]
        out.append((str(path), ids, offsets, specs))
    return out


@pytest.fixture(scope="module")
def single(cases):
    return [(ModelRunner.load(p).run(ids, off, specs)) for p, ids, off, specs in cases]


def test_tp2_matches_tp1_for_every_architecture(cases, single):
    per_rank = launch_local(run_cases, 2, cases)
    for rank_results in per_rank:
        for (outs, _), expected in zip(rank_results, single):
            assert_same(outs, expected)


def test_tp4_matches_tp1_with_replicated_kv_heads(cases, single):
    """tp=4 over 2 kv heads (each kv head on two ranks), odd vocab/intermediate sizes, a tied head."""
    chosen = [0, len(cases) - 2]
    per_rank = launch_local(run_cases, 4, [cases[i] for i in chosen])
    for rank_results in per_rank:
        for (outs, _), i in zip(rank_results, chosen):
            assert_same(outs, single[i])


def test_rank_parameter_bytes_are_about_one_over_tp(cases, single):
    path, ids, off, specs = cases[-2]  # the odd-shaped tied checkpoint
    full = sum(p.numel() * p.element_size() for p in ModelRunner.load(path).model.parameters())
    config = ModelConfig.from_pretrained(path)
    norms = (2 * config.num_layers + 1) * config.hidden_size * 4  # replicated RMSNorm weights
    per_rank = launch_local(run_cases, 2, [cases[-2]])
    for (_, nbytes), in per_rank:
        # 1/tp of the sharded weights + the replicated norms + one extra row/column per uneven split
        slack = (config.hidden_size * 4) * (2 + 3 * config.num_layers)
        assert nbytes <= (full - norms) / 2 + norms + slack, (nbytes, full)
        assert nbytes >= (full - norms) / 2 - slack


def test_head_layout_replicates_kv_heads():
    cfg = ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                                      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 8,
                                      "num_key_value_heads": 2})
    layouts = [HeadLayout(cfg, r, 4) for r in range(4)]
    assert [(l.q_start, l.q_per_rank, l.kv_start, l.kv_count) for l in layouts] == [
        (0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    assert all(l.kv_head_index is None for l in layouts)  # uniform groups: SDPA's GQA does it
    cfg6 = ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 96,
                                       "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 6,
                                       "num_key_value_heads": 3})
    rank0, rank1 = HeadLayout(cfg6, 0, 2), HeadLayout(cfg6, 1, 2)  # q 0,1,2 -> kv 0,0,1 ; q 3,4,5 -> kv 1,2,2
    assert (rank0.kv_start, rank0.kv_count, rank0.kv_head_index.tolist()) == (0, 2, [0, 0, 1])
    assert (rank1.kv_start, rank1.kv_count, rank1.kv_head_index.tolist()) == (1, 2, [0, 1, 1])
    with pytest.raises(ValueError, match="must divide"):
        HeadLayout(cfg, 0, 3)


def test_fused_checkpoint_is_split_by_layout(tmp_path, cases, single):
    """q/k/v and gate/up stored fused load to the same model, at tp=1 and tp=2."""
    path, ids, off, specs = cases[0]
    tensors = load_file(f"{path}/model.safetensors")
    fused = {}
    for name, t in tensors.items():
        if ".q_proj." in name:
            stem = name.replace(".q_proj.", ".{}.")
            fused[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat([tensors[stem.format(p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_proj." in name:
            stem = name.replace(".gate_proj.", ".{}.")
            fused[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([tensors[stem.format(p)] for p in ("gate_proj", "up_proj")])
        elif not any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            fused[name] = t
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(open(f"{path}/config.json").read())
    assert_same(ModelRunner.load(out).run(ids, off, specs), single[0], atol=1e-6)
    (rank0, _), = launch_local(run_cases, 2, [(str(out), ids, off, specs)])[0]
    assert_same(rank0, single[0])
