"""Remedies for indefinite curvature: saddle-free Newton |H| and the positive part max(H, 0).

Reference: a dense eigendecomposition of the dense Hessian (torch.linalg.eigh), and dense solves
(torch.linalg.solve) of the damped remedy matrices; the Spectral structure's protocol against its
dense form.
"""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
import curvlab.compare as cc
from curvlab.compare import methods
from curvlab.linalg import BlockDiagonal, Dense
from curvlab.linalg.spectral import Spectral
from tests.matrices import orth


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1e-300, float(b.abs().max()))


def dense_function(H: torch.Tensor, fn) -> torch.Tensor:
    w, Q = torch.linalg.eigh(H)
    return (Q * fn(w)) @ Q.T


# ---------------------------------------------------------------------------------------- the structure
@pytest.fixture(scope="module")
def spectral() -> tuple[Spectral, torch.Tensor]:
    P = 9
    w = torch.tensor([3.0, -2.0, 0.5, 1e-3, -0.7, 2.5, 0.0, 4.0, -1.5], dtype=torch.float64)  # unsorted, indefinite
    Q = orth(P, 3)
    return Spectral(w, Q), (Q * w) @ Q.T


def test_spectral_protocol_matches_its_dense_form(spectral):
    S, M = spectral
    P = S.size
    v = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(P, dtype=torch.float64)
    assert rel(S.to_dense(), M) < 1e-13
    assert rel(S @ v, M @ v) < 1e-13
    assert rel(S._columns(2, 5), M[:, 2:5]) < 1e-13
    for lam in (0.5, 3.0):
        assert rel(S.solve(v, lam), torch.linalg.solve(M + lam * eye, v)) < 1e-11
        assert rel(S.inverse(lam).to_dense(), torch.linalg.inv(M + lam * eye)) < 1e-11
    assert float(S.logdet(2.5)) == pytest.approx(float(torch.linalg.slogdet(M + 2.5 * eye)[1]), rel=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        S.logdet(1.0)  # λ_min = -2: C + I is indefinite
    assert float(S.trace()) == pytest.approx(float(M.trace()), rel=1e-12)
    assert float(S.frobenius_norm()) == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-12)
    assert rel(S.diagonal(), M.diagonal()) < 1e-13
    assert rel(S.eigvalsh(), torch.linalg.eigvalsh(M)) < 1e-13
    top = S.top_eigen(3)
    assert top.values.tolist() == [4.0, 3.0, 2.5]
    assert rel(M @ top.vectors, top.vectors * top.values) < 1e-12
    assert rel(S.restrict(slice(2, 6)).to_dense(), M[2:6, 2:6]) < 1e-13
    D = Dense(M @ M.T)
    assert float(S.inner(D)) == pytest.approx(float((M * D.matrix).sum()), rel=1e-12)
    assert float(S.inner(Spectral(S.values**2, S.vectors))) == pytest.approx(float((M * (M @ M)).sum()), rel=1e-12)
    assert rel((2.0 * S).to_dense(), 2.0 * M) < 1e-13


def test_spectral_refuses_singular_systems_and_bad_input(spectral):
    S, _ = spectral
    with pytest.raises(ValueError, match="singular.*increase the damping"):
        S.solve(torch.ones(S.size, dtype=torch.float64), 0.0)  # an eigenvalue is exactly 0
    with pytest.raises(ValueError, match="singular"):
        S.solve(torch.ones(S.size, dtype=torch.float64), 2.0)  # w = -2 + 2 = 0
    with pytest.raises(ValueError, match="values \\(P,\\) and vectors \\(P, P\\)"):
        Spectral(torch.ones(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        Spectral(torch.tensor([1.0, float("nan")], dtype=torch.float64), torch.eye(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- the registry methods
@pytest.fixture(scope="module")
def hessian(small_prob) -> torch.Tensor:
    return cl.exact.hessian(small_prob).to_dense()


@pytest.mark.parametrize("name, fn", [("saddle-free-newton", torch.abs),
                                      ("hessian-positive", lambda w: w.clamp_min(0.0))])
def test_remedies_against_dense_eigendecompositions(small_prob, hessian, name, fn):
    H = hessian
    assert float(torch.linalg.eigvalsh(H)[0]) < 0  # the Hessian is indefinite: the remedies change it
    cache: dict = {}
    H_built = methods.build("hessian", small_prob, cache)
    M = methods.build(name, small_prob, cache)
    assert isinstance(M, Spectral) and M.vectors is H_built.eigh().vectors  # exact from the cached eigh
    assert rel(M.to_dense(), dense_function(H, fn)) < 1e-10
    blocks = methods.build(f"{name}-block", small_prob, cache)
    assert isinstance(blocks, BlockDiagonal)
    want = torch.zeros_like(H)
    for b in small_prob.partition:
        want[b.slice, b.slice] = dense_function(H[b.slice, b.slice], fn)
    assert rel(blocks.to_dense(), want) < 1e-10
    g = small_prob.gradient()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for lam in (1e-2, 1e-1):
        x = M.direction(g, lam)
        assert rel(x, -torch.linalg.solve(dense_function(H, fn) + lam * eye, g)) < 1e-9
        assert float(g @ x) < 0  # positive (semi-)definite + λI: a descent direction


def test_saddle_free_newton_descends_where_newton_does_not(small_prob, hessian):
    """In a report, |H| + λI is positive definite at every damping and its step descends; H + λI is not."""
    w = torch.linalg.eigvalsh(hessian)
    lam = 0.5 * float(-w[0])  # H + λI indefinite
    ds = cc.report(small_prob, methods=["hessian", "saddle-free-newton", "hessian-positive-block", "sgd"],
                   damping=[lam], k=3)
    pd = ds["positive_definite"].sel({"damping": lam})
    assert float(pd.sel({"method": "hessian"})) == 0.0
    assert float(pd.sel({"method": "saddle-free-newton"})) == 1.0
    assert float(pd.sel({"method": "hessian-positive-block"})) == 1.0
    assert float(ds["min_eigenvalue"].sel({"method": "saddle-free-newton"})) == pytest.approx(
        float(w.abs().min()), rel=1e-8, abs=1e-12)
    assert float(ds["slope"].sel({"method": "saddle-free-newton", "damping": lam})) < 0
    assert str(ds.representation.sel({"method": "saddle-free-newton"}).values) == "spectral"
    assert str(ds.representation.sel({"method": "hessian-positive-block"}).values) == "block_spectral"
