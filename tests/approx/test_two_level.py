"""Two-level KFAC against dense computations: coarse matrices, updates, the deflation identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.approx import COARSE_SPACES

TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    return prob, cl.exact.ggn(prob).to_dense(), prob.gradient()


def _dense_fine(prob, lam, rule="koroko"):
    """M_λ densely: the KFAC blocks with λ on each factor, (A + λI) ⊗ (G + λI)."""
    K = cl.approx.kfac(prob)
    blocks = []
    for b in K.blocks:
        eye_a, eye_g = torch.eye(b.A.shape[0], dtype=b.A.dtype), torch.eye(b.G.shape[0], dtype=b.A.dtype)
        blocks.append(cl.linalg.Kron(b.A + lam * eye_a, b.G + lam * eye_g, bias=b.bias).to_dense())
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("coarse", COARSE_SPACES)
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_the_coarse_matrix_is_exact(mlp, coarse, fisher):
    prob, _, g = mlp
    F = (cl.exact.ggn(prob) if fisher == "type2" else cl.exact.empirical_fisher(prob)).to_dense()
    T = cl.approx.two_level_kfac(prob, coarse=coarse, fisher=fisher, damping=1e-2)
    Z = T.basis
    assert T.structure == "two_level" and Z.shape == (prob.num_params, 6 if coarse.startswith("krylov") else 3)
    assert torch.allclose(Z.abs().amax(0), torch.ones(Z.shape[1], dtype=Z.dtype))  # max-abs 1 columns
    if coarse != "tselepidis":
        assert rel(T.coarse_matrix, Z.T @ F @ Z) < TOL


def test_tselepidis_uses_cross_layer_kronecker_factors(mlp):
    prob, _, _ = mlp
    T = cl.approx.two_level_kfac(prob, coarse="tselepidis")
    K = cl.approx.kfac(prob)
    Z, Kd = T.basis, K.to_dense()
    for i in range(3):  # the diagonal: KFAC's own quadratic form z_iᵀ (A ⊗ G) z_i
        scale = float(Z[:, i] @ Z[:, i]) * float(Kd.abs().max())  # (the softmax layer's 1ᵀG1 is 0)
        assert abs(float(T.coarse_matrix[i, i] - Z[:, i] @ Kd @ Z[:, i])) < TOL * scale
    # off the diagonal: ⟨Z_i, G_ij Z_j A_ijᵀ⟩ = 1ᵀG_ij1 · 1ᵀA_ij1 for all-ones columns
    col = cl.approx.factors.collect(prob, "type2")
    p = [pc for plan in col.plans for pc in plan.pieces]
    a = [pc.inputs()[:, 0] for pc in p]
    gg = [pc.grads[:, :, 0].reshape(-1, pc.d_out) for pc in p]
    ref01 = float((gg[0].T @ gg[1]).sum() * (a[0].T @ a[1]).sum() / a[0].shape[0])
    assert abs(float(T.coarse_matrix[0, 1]) - ref01) < TOL * abs(ref01) and ref01 != 0


@pytest.mark.parametrize("coarse", ["nicolaides", "spectral", "residual", "krylov-residual"])
def test_the_additive_update_against_dense_algebra(mlp, coarse):
    prob, G, g = mlp
    lam = 1e-2
    T = cl.approx.two_level_kfac(prob, coarse=coarse, damping=lam)
    Z, D = T.basis, torch.diag(T.coarse_sizes)
    Mf = _dense_fine(prob, lam)
    ref = torch.linalg.solve(Mf, g) + Z @ torch.linalg.solve(Z.T @ G @ Z + lam * D, Z.T @ g)
    assert rel(-T.direction(g, lam), ref) < 1e-9
    assert rel(-T.direction(g, lam, mode="own"), ref) < 1e-9


@pytest.mark.parametrize("coarse", COARSE_SPACES)
@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0])
def test_the_deflated_correction_never_hurts(mlp, coarse, lam):
    prob, G, g = mlp
    T = cl.approx.two_level_kfac(prob, coarse=coarse, damping=lam)
    gain = T.energy_gain(g, lam)
    assert -1.0 - 1e-12 <= gain <= 1e-12
    Fl = G + lam * torch.eye(prob.num_params, dtype=G.dtype)
    xs = torch.linalg.solve(Fl, g)

    def energy(x):
        e = x - xs
        return float(e @ Fl @ e)

    xk = torch.linalg.solve(_dense_fine(prob, lam), g)
    xd = -T.deflated_direction(g, lam)
    assert energy(xd) <= energy(xk) * (1 + 1e-10)
    assert gain == pytest.approx((energy(xd) - energy(xk)) / energy(xk), abs=1e-9)


def test_a_full_basis_makes_the_deflated_correction_exact(mlp):
    prob, G, g = mlp
    lam = 1e-3
    T = cl.approx.two_level_kfac(prob, coarse=torch.eye(prob.num_params, dtype=torch.float64))
    exact = -torch.linalg.solve(G + lam * torch.eye(prob.num_params, dtype=G.dtype), g)
    assert rel(T.deflated_direction(g, lam), exact) < 1e-8
    assert T.energy_gain(g, lam) == pytest.approx(-1.0, abs=1e-8)


def test_nicolaides_coarse_matrix_is_grouped_newtons_layer_summary():
    """For a model linear in θ (GGN = Hessian), Nicolaides' ZᵀFZ (u = 1 per layer) equals
    GroupedNewton's H̄ over the layer partition with u = 1: the papers probe the same L×L coupling."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x[:, :3]) + self.b(x[:, 3:])

    torch.manual_seed(1)
    prob = cl.Problem(TwoHeads().double(), nn.MSELoss(), torch.randn(9, 7, dtype=torch.float64),
                      torch.randn(9, 2, dtype=torch.float64))
    T = cl.approx.two_level_kfac(prob, coarse="nicolaides")
    S = cl.approx.grouped_newton(prob, torch.ones(prob.num_params, dtype=torch.float64), partition="layer",
                                 order=2)
    assert rel(T.coarse_matrix, S.hessian) < TOL


def test_as_a_matrix_it_is_kfac_minus_a_rank_k_term(mlp):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    prob = cl.Problem(model, nn.MSELoss(), torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 3,
                                                                                                 dtype=torch.float64))
    T = cl.approx.two_level_kfac(prob, coarse="krylov-nicolaides")
    K, Z = cl.approx.kfac(prob).to_dense(), T.basis
    M2 = torch.linalg.inv(torch.linalg.inv(K) + Z @ torch.linalg.solve(T.coarse_matrix, Z.T))
    assert rel(T.to_dense(), M2) < 1e-8
    v = torch.randn(prob.num_params, dtype=torch.float64)
    assert rel(T @ v, M2 @ v) < 1e-8
    assert rel(T.solve(v, 0.1), torch.linalg.solve(M2 + 0.1 * torch.eye(prob.num_params, dtype=M2.dtype), v)) < 1e-8
    assert rel(T.diagonal(), M2.diagonal()) < 1e-8
    assert float(T.frobenius_norm()) == pytest.approx(float(torch.linalg.matrix_norm(M2)), rel=1e-8)
    assert float(cl.compare.cosine(T, cl.Dense(M2))) == pytest.approx(1.0, abs=1e-10)
    ce, *_ = mlp  # cross-entropy: the all-ones column of the softmax layer has no curvature
    with pytest.raises(ValueError, match="M₂ .* is undefined"):
        cl.approx.two_level_kfac(ce, coarse="nicolaides").to_dense()


def test_bad_arguments(mlp):
    prob, _, _ = mlp
    with pytest.raises(ValueError, match="unknown coarse space 'coarse'"):
        cl.approx.two_level_kfac(prob, coarse="coarse")
    with pytest.raises(ValueError, match="unknown fine_rule"):
        cl.approx.two_level_kfac(prob, fine_rule="heuristic")
    with pytest.raises(ValueError, match="damping"):
        cl.approx.two_level_kfac(prob, damping=-1.0)
    with pytest.raises(ValueError, match=r"\(P, k\)"):
        cl.approx.two_level_kfac(prob, coarse=torch.ones(3, 2, dtype=torch.float64))
    T = cl.approx.two_level_kfac(prob)
    with pytest.raises(ValueError, match="damping"):
        T.direction(prob.gradient(), -1.0)
