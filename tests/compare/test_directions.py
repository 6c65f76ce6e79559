"""Direction comparators: cosines, energy-norm error, quadratic-model vs actual loss change."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
import curvlab.compare as cc
from curvlab.linalg import Dense
from tests.compare.helpers import P, spd, structured


@pytest.fixture(scope="module")
def quadratic_problem() -> cl.Problem:
    """A linear model with squared error: the loss is exactly quadratic in θ (H = GGN)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return cl.Problem(model, nn.MSELoss(), X, y)


def test_energy_error_is_zero_for_the_reference_and_cosines_are_symmetric():
    C = structured("dense", 0)
    K = structured("kron", 1)
    g = torch.randn(P, dtype=torch.float64)
    out = cc.directions({"exact": C, "kron": K, "sgd": lambda g, lam: -g}, g, 0.1, reference="exact")
    assert out.energy_error[0] == pytest.approx(0.0, abs=1e-12)
    assert out.energy_error[1] > 0
    torch.testing.assert_close(out.cosine, out.cosine.T)
    torch.testing.assert_close(out.cosine.diagonal(), torch.ones(3, dtype=torch.float64))
    x_sgd = -g
    assert out.cosine[0, 2] == pytest.approx(float(out.directions["exact"] @ x_sgd / (
        out.directions["exact"].norm() * x_sgd.norm())), abs=1e-12)
    assert out.norm[2] == pytest.approx(float(g.norm()))
    assert "energy err" in out.table()


def test_energy_error_matches_the_formula():
    C, K = structured("dense", 0), structured("block", 2)
    g = torch.randn(P, dtype=torch.float64)
    lam = 0.05
    out = cc.directions({"C": C, "K": K}, g, lam, reference="C")
    M = C.to_dense() + lam * torch.eye(P, dtype=torch.float64)
    xs = -torch.linalg.solve(M, g)
    x = -torch.linalg.solve(K.to_dense() + lam * torch.eye(P, dtype=torch.float64), g)
    want = math.sqrt(float((x - xs) @ M @ (x - xs)) / float(xs @ M @ xs))
    assert out.energy_error[1] == pytest.approx(want, rel=1e-10)
    # the same with x* given as a tensor
    out2 = cc.directions({"K": K}, g, lam, reference=xs, metric=C)
    assert out2.energy_error[0] == pytest.approx(want, rel=1e-10)


def test_damping_rules_are_selectable():
    K = structured("kron", 3)
    g = torch.randn(P, dtype=torch.float64)
    out = cc.directions({"exact": K, "pi": K}, g, 0.1, mode={"pi": "pi"})
    assert out.cosine[0, 1] < 1 - 1e-6  # π-damping gives another direction
    torch.testing.assert_close(out.directions["pi"], K.direction(g, 0.1, mode="pi"))
    with pytest.raises(ValueError, match="mode"):
        cc.directions({"C": structured("dense", 0)}, g, 0.1, mode="pi")


@pytest.mark.parametrize("step", [1.0, 0.3, "model", "armijo"])
def test_predicted_change_equals_actual_on_a_quadratic(quadratic_problem, step):
    prob = quadratic_problem
    H = cl.exact.hessian(prob)
    G = cl.exact.ggn(prob, structure="block")
    g = prob.gradient()

    def loss(d: torch.Tensor) -> float:
        return prob.loss(prob.theta + d)

    out = cc.directions({"newton": H, "block": G, "sgd": lambda g, lam: -g}, g, 1e-3, reference="newton",
                        loss=loss, step=step)
    torch.testing.assert_close(out.predicted, out.actual, rtol=1e-9, atol=1e-12)
    assert bool((out.actual < 0).all())
    if step == "model":  # exact line search on the exact quadratic: the best step along each direction
        for i in range(3):
            x = out.directions[out.names[i]]
            a = float(out.alpha[i])
            assert loss(a * x) <= min(loss(0.9 * a * x), loss(1.1 * a * x))


def test_direction_errors_are_clear():
    C = Dense(spd(4, 0))
    g = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one"):
        cc.directions({}, g)
    with pytest.raises(ValueError, match="not one of the methods"):
        cc.directions({"C": C}, g, reference="D")
    with pytest.raises(ValueError, match="metric"):
        cc.directions({"C": C}, g, reference=g)
    with pytest.raises(ValueError, match="shape"):
        cc.directions({"bad": lambda g, lam: g[:2]}, g)
    with pytest.raises(ValueError, match="armijo"):
        cc.directions({"C": C}, g, step="armijo")
    with pytest.raises(ValueError, match="learning rate must be finite; got inf"):
        cc.directions({"C": C}, g, step=float("inf"))
