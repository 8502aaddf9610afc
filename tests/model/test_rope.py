"""Rotary embedding in pair order: HF's rotate-half bits and order, and the load-time permutation behind it."""

import pytest
import torch
from safetensors.torch import load_file

from model import ModelRunner, OutputSpec, ReturnLogits
from model.layers.rope import apply_rotary, apply_rotary_pairs, pair_order, to_pair_order
from tests.model.helpers import ragged


def tables(tokens: int, head_dim: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    freqs = torch.rand(tokens, head_dim // 2, generator=g, dtype=torch.float64) * 300
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_pair_order_interleaves_each_dim_with_its_partner():
    assert pair_order(6).tolist() == [0, 3, 1, 4, 2, 5]
    rows = torch.arange(12.0)  # two heads of 6
    assert to_pair_order(rows, 6).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_give_rotate_half_bits_on_strided_views(dtype):
    t, hq, hkv, d = 300, 6, 2, 64
    cos, sin = tables(t, d, dtype)
    qkv = torch.randn(t, hq + 2 * hkv, d, dtype=dtype) * 3  # fused q|k|v output, as the attention slices it
    perm = pair_order(d)
    expected = apply_rotary(qkv[:, : hq + hkv], cos, sin)
    paired = qkv[..., perm]
    got = apply_rotary_pairs(paired[:, : hq + hkv], cos[:, : d // 2], sin[:, : d // 2])
    assert torch.equal(got, expected) and got.is_contiguous()  # back in rotate-half order
    # a k-only view at an odd element offset cannot be viewed as complex: copied, same bits
    odd = torch.randn(t * (hkv * d) + 1, dtype=dtype)[1:].view(t, hkv, d)
    assert odd.storage_offset() % 2
    got = apply_rotary_pairs(odd, cos[:, : d // 2], sin[:, : d // 2])
    assert torch.equal(got, apply_rotary(odd[..., perm.argsort()], cos, sin))


def test_pairs_real_formula_for_half_precision():
    t, d = 50, 32
    cos, sin = tables(t, d)
    x = torch.randn(t, 3, d)
    perm = pair_order(d)
    expected = apply_rotary(x, cos, sin)
    got = apply_rotary_pairs(x[..., perm].bfloat16(), cos[:, : d // 2].bfloat16(), sin[:, : d // 2].bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # plain, q/k/v bias
def test_float32_load_stores_qk_heads_in_pair_order(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    runner = ModelRunner.load(path, dtype="float32")
    cfg, attn = runner.config, runner.model.layers[0].self_attn
    assert runner.model.rotary_pairs and attn.rotary_pairs
    d, q, kv = cfg.head_dim, cfg.q_size, cfg.kv_size
    ckpt = load_file(str(path / "model.safetensors"))
    w = attn.qkv_proj.weight
    p = "model.layers.0.self_attn."
    assert torch.equal(w[:q], to_pair_order(ckpt[p + "q_proj.weight"], d))
    assert torch.equal(w[q : q + kv], to_pair_order(ckpt[p + "k_proj.weight"], d))
    assert torch.equal(w[q + kv :], ckpt[p + "v_proj.weight"])  # v keeps the checkpoint's order
    if attn.qkv_proj.bias is not None:
        assert torch.equal(attn.qkv_proj.bias[:q], to_pair_order(ckpt[p + "q_proj.bias"], d))

    # The same bits as the checkpoint's order with rotate-half: q and k leave the rotary in that order.
    plain = ModelRunner.load(path, dtype="float32", rotary_pairs=False)
    assert not plain.model.layers[0].self_attn.rotary_pairs
    _, ids, offsets = ragged([7, 300, 1], cfg.vocab_size)
    spec = [OutputSpec(return_logits=ReturnLogits.ALL)] * 3
    for a, b in zip(runner.run(ids, offsets, spec), plain.run(ids, offsets, spec)):
        assert torch.equal(a.logits, b.logits)


def test_qk_norm_models_keep_checkpoint_order(checkpoint_factory):
    """q/k norm sums each head's squares: in pair order that sum would run in another order than transformers'."""
    runner = ModelRunner.load(checkpoint_factory("qwen3"), dtype="float32")
    assert not runner.model.rotary_pairs and not runner.model.layers[0].self_attn.rotary_pairs


def test_half_precision_load_keeps_checkpoint_order(checkpoint_factory):
    runner = ModelRunner.load(checkpoint_factory("llama"), dtype="bfloat16")
    assert not runner.model.rotary_pairs and not runner.model.layers[0].self_attn.rotary_pairs
