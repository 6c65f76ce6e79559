"""Two-level KFAC and GroupedNewton as training methods (curvlab.optim)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import optim


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("method", ["kfac-2l-nicolaides", "kfac-2l-residual", "kfac-2l-krylov-residual",
                                    "kfac-2l-tselepidis", "grouped-newton"])
def test_cross_layer_methods_train_digits_mlp(method):
    prob = cl.problems.load("digits-mlp", n=256, seed=0)
    ds = optim.train(prob, method, steps=50, batch_size=64, seed=0, progress=False)
    loss = ds["loss"].values
    assert bool(torch.isfinite(torch.as_tensor(loss)).all())
    assert loss[-1] < 0.9 * loss[0], (method, loss[0], loss[-1])


def test_two_level_step_is_the_two_level_update_of_the_batch():
    """No averaging, refresh every step: the step is −(M_λ⁻¹g + Z(ZᵀFZ + λD)⁻¹Zᵀg) of cl.approx."""
    prob = cl.problems.load("digits-mlp", n=64, seed=4)
    lam = 1e-2
    opt = optim.make("kfac-2l-residual", cl.problems.load("digits-mlp", n=64, seed=4).model, prob.loss_fn, lr=1.0,
                     damping=lam, momentum=0.0, kl_clip=None, ema_decay=0.0, inverse_period=1, fisher="ggn")
    g = prob.gradient()
    T = cl.approx.two_level_kfac(prob, coarse="residual", damping=lam, gradient=g)
    before = opt.theta()
    opt.step(prob.X, prob.y)
    assert rel(opt.theta() - before, T.direction(g, lam)) < 1e-9
    assert opt.curvature().structure == "two_level"


def test_grouped_newton_records_its_per_subset_learning_rates():
    prob = cl.problems.load("digits-mlp", n=128)
    ds = optim.train(prob, "grouped-newton", steps=12, batch_size=64, progress=False, period=5)
    assert ds["subset_lr"].dims == ("step", "subset") and list(ds["subset"].values) == prob.param_names
    lr = ds["subset_lr"].values
    assert bool((lr[1:] >= 0).all())  # negative rates are clipped
    assert (lr[1] != lr[6]).any() and (lr[1] == lr[5]).all()  # refreshed at steps 0, 5, 10 (rows 1, 6, 11)
    assert ds.attrs["state_refreshes"] == 3 and ds.attrs["state_fallbacks"] == 0


class Rescaled(nn.Module):
    """A linear layer whose weight is stored divided by α: the same function, other coordinates."""

    def __init__(self, lin: nn.Linear, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.weight = nn.Parameter(lin.weight.detach() / alpha)
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.alpha * self.weight, self.bias)


def _trajectories(method: str, steps: int = 15, **options):
    prob = cl.problems.load("digits-mlp", n=128, seed=5)
    base = cl.problems.load("digits-mlp", n=128, seed=5).model
    other = cl.problems.load("digits-mlp", n=128, seed=5).model
    other[0] = Rescaled(other[0], 10.0)
    out = []
    for model in (base, other):
        opt = optim.make(method, model, prob.loss_fn, **options)
        thetas = []
        for ix in optim.batches(prob.num_samples, 64, steps, seed=0):
            opt.step(prob.X[ix], prob.y[ix])
            w = model[0].weight.detach() * getattr(model[0], "alpha", 1.0)
            thetas.append(torch.cat([w.reshape(-1), *[p.detach().reshape(-1) for p in list(model.parameters())[1:]]]))
        out.append(torch.stack(thetas))
    return out


def test_grouped_newton_is_invariant_to_rescaling_a_layer_and_sgd_is_not():
    a, b = _trajectories("grouped-newton", period=5)
    assert rel(b, a) < 1e-8
    a, b = _trajectories("sgd", lr=0.05, momentum=0.9)
    assert rel(b, a) > 1e-3
