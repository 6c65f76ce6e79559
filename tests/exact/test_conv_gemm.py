"""conv2d as im2col + GEMM equals F.conv2d (values and derivatives), and only replaces what it can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from curvlab.exact.conv_gemm import ConvAsGemm, conv2d_as_gemm

SETTINGS = [  # (in_channels, out_channels, kernel, stride, padding, dilation, bias, image)
    (1, 2, 3, 1, 1, 1, True, (5, 5)),
    (2, 3, (2, 3), 2, 0, 1, False, (6, 7)),
    (3, 2, 3, (1, 2), (2, 1), 2, True, (7, 6)),
    (2, 2, 1, 1, 0, 1, True, (4, 4)),
]


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,dilation,bias,hw", SETTINGS)
def test_equals_conv2d_with_derivatives(c_in, c_out, k, stride, padding, dilation, bias, hw):
    g = torch.Generator().manual_seed(0)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, c_in, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    out = conv2d_as_gemm(x, w, b, stride, padding, dilation)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)

    def loss(w_):  # a curved function of the weights, through the mode
        with ConvAsGemm():
            return torch.tanh(F.conv2d(x, w_, b, stride=stride, padding=padding, dilation=dilation)).pow(3).sum()

    def loss_ref(w_):
        return torch.tanh(F.conv2d(x, w_, b, stride=stride, padding=padding, dilation=dilation)).pow(3).sum()

    v = torch.randn(w.shape, generator=g, dtype=torch.float64)
    hv = jvp(grad(loss), (w,), (v,))[1]
    hv_ref = jvp(grad(loss_ref), (w,), (v,))[1]
    assert torch.allclose(hv, hv_ref, rtol=1e-10, atol=1e-12)


def test_passes_through_what_it_cannot_replace():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with ConvAsGemm():
        grouped = F.conv2d(x, w, groups=2)
        same = F.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), padding="same")
    assert torch.allclose(grouped, F.conv2d(x, w, groups=2))
    assert torch.allclose(same, F.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), padding="same"))
