"""curvlab.exact.products on its own: matrix-free products against the naive reference matrices.

References (``curvlab.reference``): double-backward Hessian, R Σ J_nᵀ Λ_n J_n with torch.func
Jacobians, R Σ ∇ℓ_n∇ℓ_nᵀ from vmapped per-sample gradients, and the Monte-Carlo Fisher for the
labels drawn by the same seeded generator.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.exact.products import ef_vp, fisher_mc_vp, ggn_vp, hvp, operator
from curvlab.linalg import MatrixFree

ARCHS = {
    "mlp-ce": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)), (4,), "ce"),
    "layernorm-mse": (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2)), (4,),
                      "mse"),
    "cnn-bce": (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2)), (1, 3, 3),
                "bce"),
}
N, SAMPLES, SEED = 4, 3, 5


def make(arch: str) -> cl.Problem:
    builder, shape, loss = ARCHS[arch]
    torch.manual_seed(0)
    model = builder().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=g))
    if loss == "mse":
        return cl.Problem(model, nn.MSELoss(reduction="sum"), X, torch.randn(N, 2, generator=g, dtype=torch.float64))
    return cl.Problem(model, nn.BCEWithLogitsLoss(), X, torch.rand(N, 2, generator=g, dtype=torch.float64))


def mc_labels(prob: cl.Problem, samples: int = SAMPLES, seed: int = SEED) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return prob.likelihood.sample(prob.output().detach(), samples, gen)


def references(prob: cl.Problem) -> dict[str, torch.Tensor]:
    return {"hessian": reference.hessian(prob), "ggn": reference.ggn(prob),
            "empirical_fisher": reference.empirical_fisher(prob),
            "fisher_mc": reference.fisher_mc_from(prob, mc_labels(prob))}


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request):
    prob = make(request.param)
    return prob, references(prob)


PRODUCTS = {"hessian": hvp, "ggn": ggn_vp, "empirical_fisher": ef_vp,
            "fisher_mc": lambda prob, V, theta=None: fisher_mc_vp(prob, V, SAMPLES, SEED, theta)}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-11) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) / max(1e-300, float(b.abs().max()))
    assert err <= tol, err


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_products_with_vectors_and_matrices(case, kind):
    prob, refs = case
    g = torch.Generator().manual_seed(2)
    v = torch.randn(prob.num_params, generator=g, dtype=torch.float64)
    V = torch.randn(prob.num_params, 3, generator=g, dtype=torch.float64)
    out = PRODUCTS[kind](prob, v)
    assert out.shape == (prob.num_params,)
    close(out, refs[kind] @ v)
    close(PRODUCTS[kind](prob, V), refs[kind] @ V)
    close(PRODUCTS[kind](prob, V[:, :1]), refs[kind] @ V[:, :1])


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_operator_is_the_reference_matrix(case, kind):
    prob, refs = case
    C = operator(prob, kind, samples=SAMPLES, seed=SEED, chunk=5)
    assert isinstance(C, MatrixFree) and C.size == prob.num_params
    close(C.to_dense(), refs[kind])
    V = torch.randn(prob.num_params, 7, dtype=torch.float64)
    close(C @ V, refs[kind] @ V)


@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_products_at_other_parameters(kind):
    prob = make("mlp-ce")
    theta = prob.theta + 0.4 * torch.randn(prob.num_params, dtype=torch.float64)
    ref = references(prob.at(theta))[kind]
    V = torch.randn(prob.num_params, 2, dtype=torch.float64)
    close(PRODUCTS[kind](prob, V, theta=theta), ref @ V)
    close(operator(prob, kind, theta, samples=SAMPLES, seed=SEED).to_dense(), ref)


def test_fisher_mc_seeding():
    prob = make("mlp-ce")
    V = torch.randn(prob.num_params, 2, dtype=torch.float64)
    a, b = fisher_mc_vp(prob, V, 2, 0), fisher_mc_vp(prob, V, 2, 0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, fisher_mc_vp(prob, V, 2, 1))
    close(a, reference.fisher_mc_from(prob, mc_labels(prob, 2, 0)) @ V)


def test_bad_inputs():
    prob = make("mlp-ce")
    P = prob.num_params
    v = torch.ones(P, dtype=torch.float64)
    for fn in (hvp, ggn_vp, ef_vp, fisher_mc_vp):
        with pytest.raises(TypeError, match="Problem"):
            fn("not a problem", v)
        with pytest.raises(ValueError, match=rf"\({P + 1},\)"):
            fn(prob, torch.ones(P + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"\({P}, 2, 2\)"):
            fn(prob, torch.ones(P, 2, 2, dtype=torch.float64))
        with pytest.raises(ValueError, match="NaN"):
            fn(prob, torch.full((P,), float("nan"), dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"\({P - 1},\)"):
            fn(prob, v, theta=torch.ones(P - 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="NaN"):
            fn(prob, v, theta=torch.full((P,), float("inf"), dtype=torch.float64))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            fisher_mc_vp(prob, v, samples=bad)
    with pytest.raises(ValueError, match="'gauss'"):
        operator(prob, "gauss")
    with pytest.raises(TypeError, match="Problem"):
        operator(None, "ggn")
