"""CPU ragged attention against a direct softmax(QK^T)V per sequence: equal-length groups, query blocks, windows."""

import pytest
import torch

from model.modules import QUERY_BLOCK, RaggedBatch, ragged_attention

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


@pytest.mark.parametrize("window", [None, 50, 200])
def test_ragged_attention_matches_direct_softmax(window):
    # 1 and 7: tiny; two of 2 * QUERY_BLOCK + 1 share one call and are cut into query blocks; 3 * QUERY_BLOCK + 5 ends
    # with a partial block; 100 stays one causal call.
    lengths = [1, 7, 2 * QUERY_BLOCK + 1, 100, 2 * QUERY_BLOCK + 1, 3 * QUERY_BLOCK + 5]
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = torch.randn(t, HQ, D, generator=g), torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    got = ragged_attention(q, k, v, RaggedBatch.from_offsets(offsets, torch.device("cpu")), 0.3, window)
    torch.testing.assert_close(got, naive(q, k, v, lengths, 0.3, window), atol=1e-5, rtol=0)
