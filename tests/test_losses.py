"""curvlab.losses on its own: every closed form against torch's loss and torch.func derivatives.

References: ``loss_fn(reduction="none")`` for ℓ_n, ``torch.func.grad`` / ``torch.func.hessian`` of
torch's own per-sample loss for ∇_f ℓ_n and ∇²_f ℓ_n, and the likelihood's known moments for the
sampled labels (checked in expectation to 6 standard errors of the draws).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, vmap

from curvlab.losses import BinaryCrossEntropy, CrossEntropy, SquaredError, likelihood_for

LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
KLASS = {"ce": CrossEntropy, "mse": SquaredError, "bce": BinaryCrossEntropy}
#: output shapes per sample: CE needs (C,), MSE/BCE also take extra output dimensions
SHAPES = [("ce", (4,)), ("mse", (3,)), ("mse", (2, 3)), ("bce", (3,)), ("bce", (2, 3))]
SE = 6.0  # Monte-Carlo tolerance: 6 standard errors of the draws


def _data(loss: str, shape: tuple[int, ...], n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, shape[0], (n,), generator=g)
    elif loss == "mse":
        y = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    return f, y


def _torch_single(loss: str):
    """f_n, y_n ↦ torch's summed loss of one sample (the reference ℓ_n)."""
    fn = LOSSES[loss](reduction="sum")
    return lambda fn_, yn: fn(fn_[None], yn[None])


def _hessians(loss: str, f, y):
    """∇²_f ℓ_n per sample from torch.func.hessian of torch's loss, flattened to (N, D, D)."""
    H = vmap(hessian(_torch_single(loss)))(f, y)
    d = math.prod(f.shape[1:])
    return H.reshape(f.shape[0], d, d)


def close(a, b, tol=1e-12):
    scale = max(1.0, float(torch.as_tensor(b).abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


# ---------------------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("loss,shape", SHAPES)
def test_per_sample_is_torchs_unreduced_loss_summed_per_sample(loss, shape):
    f, y = _data(loss, shape)
    lik = likelihood_for(LOSSES[loss]())
    ref = LOSSES[loss](reduction="none")(f, y).reshape(f.shape[0], -1).sum(1)
    close(lik.per_sample(f, y), ref)


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_grad_output_is_autograd_gradient(loss, shape):
    f, y = _data(loss, shape)
    lik = likelihood_for(LOSSES[loss]())
    ref = vmap(grad(_torch_single(loss)))(f, y)
    close(lik.grad_output(f, y), ref)


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_hvp_output_is_loss_hessian_times_u(loss, shape):
    f, y = _data(loss, shape)
    lik = likelihood_for(LOSSES[loss]())
    u = torch.randn_like(f)
    H = _hessians(loss, f, y)
    ref = torch.einsum("nij,nj->ni", H, u.reshape(f.shape[0], -1)).reshape(f.shape)
    close(lik.hvp_output(f, u), ref)


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_hessian_sqrt_is_a_symmetric_factor_of_the_loss_hessian(loss, shape):
    f, y = _data(loss, shape)
    lik = likelihood_for(LOSSES[loss]())
    S = lik.hessian_sqrt(f)
    d = math.prod(shape)
    assert S.shape == (d, *f.shape)
    Sf = S.reshape(d, f.shape[0], d)
    close(torch.einsum("kni,knj->nij", Sf, Sf), _hessians(loss, f, y))


# ---------------------------------------------------------------------------------------- scale
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,shape", SHAPES)
def test_loss_and_scale_reproduce_torchs_reduction(loss, shape, reduction):
    f, y = _data(loss, shape)
    loss_fn = LOSSES[loss](reduction=reduction)
    lik = likelihood_for(loss_fn)
    assert type(lik) is KLASS[loss] and lik.reduction == reduction
    close(lik.loss(f, y), loss_fn(f, y))
    # R = user's loss / Σ_n ℓ_n, read off torch itself
    R = float(loss_fn(f, y) / LOSSES[loss](reduction="sum")(f, y))
    assert lik.scale(f) == pytest.approx(R, rel=1e-12)
    terms = LOSSES[loss](reduction="none")(f, y).numel() // f.shape[0]
    assert lik.terms_per_sample(f) == terms
    expected = 1.0 if reduction == "sum" else 1.0 / (f.shape[0] * terms)
    assert lik.scale(f) == pytest.approx(expected, rel=1e-15)


# ---------------------------------------------------------------------------------------- sampling
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(draws: torch.Tensor, expected: torch.Tensor) -> None:
    """The mean of the draws (axis 0) is within SE standard errors of ``expected``."""
    m = draws.shape[0]
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(m)
    excess = (mean - expected).abs() - SE * se - 1e-12
    assert float(excess.max()) <= 0, float(((mean - expected).abs() / se.clamp_min(1e-300)).max())


M_DRAWS = 20000


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_sample_moments_match_the_likelihood(loss, shape):
    f, _ = _data(loss, shape, n=3)
    lik = likelihood_for(LOSSES[loss]())
    ys = lik.sample(f, M_DRAWS, _gen(1))
    if loss == "ce":
        assert ys.shape == (M_DRAWS, 3) and ys.dtype == torch.long
        onehot = nn.functional.one_hot(ys, shape[0]).double()
        _within(onehot, torch.softmax(f, 1))
    elif loss == "mse":  # N(f, ½ I)
        assert ys.shape == (M_DRAWS, *f.shape)
        _within(ys, f)
        r = (ys - f).reshape(M_DRAWS, -1)
        _within(torch.einsum("mi,mj->mij", r, r), 0.5 * torch.eye(r.shape[1], dtype=f.dtype))
    else:  # Bernoulli(σ(f))
        assert ys.shape == (M_DRAWS, *f.shape)
        assert bool(((ys == 0) | (ys == 1)).all())
        _within(ys, torch.sigmoid(f))


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_sampled_gradients_have_mean_zero_and_the_loss_hessian_as_covariance(loss, shape):
    """E_ŷ[∇ℓ(ŷ)] = 0 and E_ŷ[∇ℓ(ŷ)∇ℓ(ŷ)ᵀ] = ∇²_f ℓ (Fisher = GGN for these likelihoods)."""
    f, y = _data(loss, shape, n=3)
    lik = likelihood_for(LOSSES[loss]())
    G = lik.sampled_grad_output(f, M_DRAWS, _gen(2))
    assert G.shape == (M_DRAWS, *f.shape)
    _within(G, torch.zeros_like(f))
    Gf = G.reshape(M_DRAWS, 3, -1)
    _within(torch.einsum("mni,mnj->mnij", Gf, Gf), _hessians(loss, f, y))


@pytest.mark.parametrize("loss,shape", SHAPES)
def test_same_seed_same_draws(loss, shape):
    f, _ = _data(loss, shape)
    lik = likelihood_for(LOSSES[loss]())
    a, b, c = (lik.sample(f, 7, _gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = lik.sampled_grad_output(f, 7, _gen(3)), lik.sampled_grad_output(f, 7, _gen(3))
    assert torch.equal(g1, g2)
    # the sampled gradients are the gradients at the labels sample() draws with the same seed
    close(g1, lik.grad_output(f, a), 0)


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("loss", list(LOSSES))
def test_reduction_none_is_refused(loss):
    with pytest.raises(ValueError, match="'none'"):
        likelihood_for(LOSSES[loss](reduction="none"))


def test_unsupported_losses_and_options_are_refused():
    with pytest.raises(TypeError, match="instance"):
        likelihood_for(nn.MSELoss)
    with pytest.raises(TypeError, match="L1Loss"):
        likelihood_for(nn.L1Loss())
    with pytest.raises(ValueError, match="weight"):
        likelihood_for(nn.CrossEntropyLoss(weight=torch.ones(3)))
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        likelihood_for(nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="pos_weight"):
        likelihood_for(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))


def test_cross_entropy_check():
    lik = likelihood_for(nn.CrossEntropyLoss())
    f = torch.zeros(4, 3, dtype=torch.float64)
    lik.check(f, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\(4, 3, 1\)"):
        lik.check(f[..., None], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="float64"):
        lik.check(f, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        lik.check(f, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="target 3 is outside"):
        lik.check(f, torch.tensor([0, 3, 1, 0]))
    with pytest.raises(ValueError, match="target -1 is outside"):
        lik.check(f, torch.tensor([0, -1, 1, 0]))


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_elementwise_losses_check(loss):
    lik = likelihood_for(LOSSES[loss]())
    f = torch.zeros(4, 3, dtype=torch.float64)
    lik.check(f, torch.full((4, 3), 0.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="int64"):
        lik.check(f, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        lik.check(f, torch.zeros(4, 2, dtype=torch.float64))
    if loss == "bce":
        with pytest.raises(ValueError, match="target 1.5 is outside"):
            lik.check(f, torch.tensor([[0.0, 1.5, 0.0]] * 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="target -0.5 is outside"):
            lik.check(f, torch.tensor([[0.0, -0.5, 0.0]] * 4, dtype=torch.float64))


@pytest.mark.parametrize("loss,shape", SHAPES + [("ce", (4, 3))])
def test_sampled_and_data_grad_output_is_the_sampled_rows_then_the_data_row(loss, shape):
    """The same draws as sampled_grad_output (same generator seed), then ∇_f ℓ_n at the data labels."""
    f, y = _data(loss, shape) if shape != (4, 3) else (torch.randn(5, 4, 3, dtype=torch.float64),
                                                       torch.randint(0, 4, (5, 3)))
    lik = likelihood_for(LOSSES[loss]())
    both = lik.sampled_and_data_grad_output(f, 3, torch.Generator().manual_seed(11), y)
    assert both.shape == (4, *f.shape)
    close(both[:3], lik.sampled_grad_output(f, 3, torch.Generator().manual_seed(11)), 0.0)
    close(both[3], lik.grad_output(f, y), 1e-15)


def test_monte_carlo_cotangents_with_the_loss_row_are_the_two_concatenated():
    import curvlab as cl
    from curvlab.capture import loss_cotangent, output_cotangents

    prob = cl.problems.load("digits-mlp", n=16)
    f = prob.model(prob.X).detach()
    cot = output_cotangents(prob, "mc", 2, 5)
    close(cot.with_loss(f), torch.cat([cot(f), loss_cotangent(prob)(f)[None]]), 1e-15)
