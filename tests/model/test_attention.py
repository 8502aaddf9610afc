"""CPU ragged attention against a direct softmax(QK^T)V per sequence: equal-length groups, query blocks, windows."""

import pytest
import torch
import torch.nn.functional as F

from model.layers.modules import QUERY_BLOCK, RaggedBatch, query_cuts, ragged_attention

HQ, HKV, D = 4, 2, 8


def naive(q, k, v, lengths, scale, window):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n] for t in (q, k, v))
        ks, vs = ks.repeat_interleave(HQ // HKV, dim=1), vs.repeat_interleave(HQ // HKV, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = (j <= i) & ((i - j < window) if window else True)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hij,jhd->ihd", probs, vs))
        start += n
    return torch.cat(out)


LENGTHS = [1, 7, 2 * QUERY_BLOCK + 1, 100, 2 * QUERY_BLOCK + 1, 3 * QUERY_BLOCK + 5]


def packed(lengths, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return q, k, v, RaggedBatch.from_offsets(offsets, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 50, 200])
def test_ragged_attention_matches_direct_softmax(window, dtype):
    # 1 and 7: tiny; two of 2 * QUERY_BLOCK + 1 share one call (in bfloat16 cut into query blocks); 3 * QUERY_BLOCK + 5
    # ends with a partial block; 100 stays one causal call.
    q, k, v, batch = packed(LENGTHS, dtype)
    got = ragged_attention(q, k, v, batch, 0.3, window)
    expected = naive(q.float(), k.float(), v.float(), LENGTHS, 0.3, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_attention_has_the_bits_of_one_causal_call_per_sequence(dtype):
    """What transformers computes per sequence (one causal SDPA call, [1, H, n, D] views), bit for bit, though
    sequences of 384-767 tokens are cut into query blocks (query_cuts): any other grouping would move a 30-layer
    model's logits by ~1e-4. Lengths around every cut rule, two sharing a call."""
    lengths = [1, 7, 191, 192, 383, 384, 385, 448, 500, 500, 575, 576, 700, 767, 768, 900]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lengths), h, 64, generator=g, dtype=dtype) for h in (6, 2, 2))
    batch = RaggedBatch.from_offsets(torch.tensor([0, *lengths]).cumsum(0), torch.device("cpu"))
    got = ragged_attention(q, k, v, batch, 0.125, None)
    start = 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1)[None] for t in (q, k, v))
        one = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.125, enable_gqa=True)
        assert torch.equal(got[start : start + n], one[0].transpose(0, 1)), n
        start += n


def test_query_cuts():
    cpu, f32 = torch.device("cpu"), torch.float32
    assert query_cuts(383, f32, cpu) == [0, 383]  # one call: no two blocks of 192 rows fit
    assert query_cuts(500, f32, cpu) == [0, 192, 500]
    assert query_cuts(767, f32, cpu) == [0, 192, 384, 767]
    assert query_cuts(768, f32, cpu) == [0, 768]  # the kernel walks 256-row blocks there
    assert query_cuts(500, f32, torch.device("meta")) == [0, 500]
    assert query_cuts(500, f32, cpu, windowed=True) == [0, 500]
    assert query_cuts(300, torch.bfloat16, cpu, windowed=True) == [0, 128, 256, 300]
    assert query_cuts(300, torch.bfloat16, cpu) == [0, 128, 256, 300]
    assert query_cuts(256, torch.bfloat16, cpu) == [0, 256]
