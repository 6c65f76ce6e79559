"""Cross-entropy on outputs with extra dimensions, (N, C, d₁, …) with targets (N, d₁, …), and the
per-position split of output gradients, against torch's own loss and torch.func derivatives.

The positions are loss terms of one sample: ℓ_n sums over them, R = 1/(N·d₁·…) for "mean".
References as in ``tests/test_losses.py``: ``loss_fn(reduction="none")``, ``torch.func.grad`` /
``hessian`` of torch's summed single-sample loss, and moments of the draws (6 standard errors).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from curvlab.losses import likelihood_for
from tests.test_losses import _gen, _hessians, _torch_single, _within, close

SHAPES = [(3, 4), (3, 2, 3), (2, 1)]  # (C, d₁, …) per sample
M_DRAWS = 20000


def _data(shape, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return f, torch.randint(0, shape[0], (n, *shape[1:]), generator=g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_per_sample_and_scale_are_torchs(shape, reduction):
    f, y = _data(shape)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    lik = likelihood_for(loss_fn)
    lik.check(f, y)
    close(lik.loss(f, y), loss_fn(f, y))
    close(lik.per_sample(f, y), nn.CrossEntropyLoss(reduction="none")(f, y).reshape(f.shape[0], -1).sum(1))
    assert lik.terms_per_sample(f) == math.prod(shape[1:])
    expected = 1.0 if reduction == "sum" else 1.0 / (f.shape[0] * math.prod(shape[1:]))
    assert lik.scale(f) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
def test_derivatives_are_autograds(shape):
    f, y = _data(shape)
    lik = likelihood_for(nn.CrossEntropyLoss())
    close(lik.grad_output(f, y), vmap(grad(_torch_single("ce")))(f, y))
    H = _hessians("ce", f, y)
    u = torch.randn_like(f)
    close(lik.hvp_output(f, u), torch.einsum("nij,nj->ni", H, u.reshape(f.shape[0], -1)).reshape(f.shape))
    S = lik.hessian_sqrt(f)
    d = math.prod(shape)
    assert S.shape == (d, *f.shape)
    Sf = S.reshape(d, f.shape[0], d)
    close(torch.einsum("kni,knj->nij", Sf, Sf), H)


@pytest.mark.parametrize("shape", SHAPES)
def test_sampling_per_position(shape):
    f, y = _data(shape, n=2)
    lik = likelihood_for(nn.CrossEntropyLoss())
    ys = lik.sample(f, M_DRAWS, _gen(1))
    assert ys.shape == (M_DRAWS, *y.shape) and ys.dtype == torch.long
    onehot = nn.functional.one_hot(ys, shape[0]).double().movedim(-1, 2)
    _within(onehot, torch.softmax(f, 1))
    G = lik.sampled_grad_output(f, M_DRAWS, _gen(2))
    assert G.shape == (M_DRAWS, *f.shape)
    _within(G, torch.zeros_like(f))
    Gf = G.reshape(M_DRAWS, 2, -1)
    _within(torch.einsum("mni,mnj->mnij", Gf, Gf), _hessians("ce", f, y))
    # the sampled gradients are the gradients at the labels sample() draws with the same seed
    close(lik.sampled_grad_output(f, 7, _gen(3)), lik.grad_output(f, lik.sample(f, 7, _gen(3))), 0)


def test_no_positions_draws_as_before():
    """(N, C) outputs: the same labels as torch.multinomial on the probabilities."""
    f, _ = _data((4,), n=3)
    lik = likelihood_for(nn.CrossEntropyLoss())
    ref = torch.multinomial(torch.softmax(f, 1), 9, replacement=True, generator=_gen(4)).T
    assert torch.equal(lik.sample(f, 9, _gen(4)), ref)


@pytest.mark.parametrize("loss,shape", [("ce", (3, 2, 3)), ("ce", (3,)), ("mse", (2, 3)), ("bce", (2, 2, 3)),
                                        ("mse", (3,))])
def test_split_positions(loss, shape):
    """Slices sum to the input, each is supported on one position; positions are the axes after
    CE's class axis (dim 1), and between the batch and the last axis for MSE / BCE."""
    lik = likelihood_for({"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss]())
    g = torch.randn(2, *shape, dtype=torch.float64)
    parts = lik.split_positions(g)
    T = math.prod(shape[1:]) if loss == "ce" else math.prod(shape[:-1])
    assert parts.shape == (T, *g.shape) and lik.positions(g) == T
    assert torch.equal(parts.sum(0), g)
    # a position is an index of the flattened non-feature axes: class axis / last axis excluded
    moved = parts if loss != "ce" else parts.movedim(2, -1)  # features last
    flat = moved.reshape(T, 2, T, -1).transpose(1, 2)  # (slice, position, sample, feature)
    off = ~torch.eye(T, dtype=torch.bool)
    assert bool((flat[off] == 0).all())
    gm = (g if loss != "ce" else g.movedim(1, -1)).reshape(2, T, -1)
    assert torch.equal(flat[torch.arange(T), torch.arange(T)], gm.transpose(0, 1))


def test_cross_entropy_check_with_positions():
    lik = likelihood_for(nn.CrossEntropyLoss())
    f = torch.zeros(4, 3, 5, dtype=torch.float64)
    lik.check(f, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, d1\) = \(4, 5\).*\(4, 3, 5\).*got \(4,\)"):
        lik.check(f, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        lik.check(f, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"float64.*probability"):
        lik.check(f, torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"target 3 is outside \[0, 3\)"):
        lik.check(f, torch.full((4, 5), 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, d1, \.\.\.\)"):
        lik.check(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
