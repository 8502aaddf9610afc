"""The CPU fast paths of the building blocks give what the plain torch ops give."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from model.layers.base import _ONEDNN_LINEAR, RMSNorm, head_linear


@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (300, 96), (2, 5, 48)])
def test_cpu_rms_norm_gives_the_bits_of_torch_rms_norm(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = torch.randn(shape[-1])
    x = torch.randn(*shape) * 3
    with torch.inference_mode():
        got = norm(x)
    assert torch.equal(got, F.rms_norm(x, (shape[-1],), norm.weight.detach(), 1e-5))


@pytest.mark.skipif(not _ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_head_linear_runs_on_onednn_and_matches_f_linear():
    torch.manual_seed(0)
    w = torch.randn(1000, 64) * 0.1
    for rows in (0, 1, 37, 513):
        x = torch.randn(rows, 64)
        with torch.inference_mode(), profile() as prof:
            got = head_linear(x, w)
        assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
        torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=0)
    # A strided view of the hidden rows, as the runner passes them.
    x = torch.randn(64, 40).t()
    torch.testing.assert_close(head_linear(x, w), F.linear(x, w), atol=1e-5, rtol=0)


def test_head_linear_keeps_f_linear_where_gradients_or_other_dtypes_are_wanted():
    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    x = torch.randn(4, 16)
    y = head_linear(x, w)
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()  # the oneDNN op has no autograd kernel; this path must keep one
    torch.testing.assert_close(w.grad, x.sum(0).expand(50, 16))
    xb, wb = x.bfloat16(), w.detach().bfloat16()
    assert torch.equal(head_linear(xb, wb), F.linear(xb, wb))
