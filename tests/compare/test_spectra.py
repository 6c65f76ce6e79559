"""Spectral comparators: top-k eigenpairs from structure, subspace overlap, Wasserstein, fractions."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import curvlab.compare as cc
from curvlab.linalg import Dense, Diagonal
from tests.compare.helpers import KINDS, P, kron, orth, spd, structured

sp = importlib.import_module("curvlab.compare.spectra")  # the attribute cl.compare.spectra is the function


def test_overlap_of_a_subspace_with_itself_is_one_and_orthogonal_is_zero():
    Q = orth(10, 0)
    U, V = Q[:, :3], Q[:, 3:6]
    assert cc.subspace_overlap(U, U)[0] == pytest.approx(1.0, abs=1e-12)
    assert cc.subspace_overlap(U, V)[0] == pytest.approx(0.0, abs=1e-12)
    W = torch.cat([Q[:, :1], Q[:, 5:7]], dim=1)  # shares one of three directions
    mean_sq, cos = cc.subspace_overlap(U, W)
    assert mean_sq == pytest.approx(1 / 3, abs=1e-12)
    torch.testing.assert_close(cos, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    R = U @ orth(3, 1)  # another basis of the same subspace
    assert cc.subspace_overlap(U, R)[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5])
def test_top_eigen_matches_dense_eigh(kind, k):
    C = structured(kind, 3)
    w, Q = torch.linalg.eigh(C.to_dense())
    top = cc.top_eigen(C, k)
    torch.testing.assert_close(top.values, torch.flip(w[-k:], (0,)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(top.vectors.T @ top.vectors, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    assert cc.subspace_overlap(top.vectors, torch.flip(Q[:, -k:], (1,)))[0] == pytest.approx(1.0, abs=1e-8)
    assert cc.top_eigen(C, k) is top  # cached


def test_top_eigen_of_a_large_dense_matrix_uses_lanczos_not_eigh(monkeypatch):
    monkeypatch.setattr(importlib.import_module("curvlab.linalg.base"), "DENSE_EIGH_LIMIT", 10)
    M = spd(60, 4)
    C = Dense(M)
    top = cc.top_eigen(C, 4)
    assert "eigh" not in C._cache  # no full decomposition was made
    w = torch.linalg.eigvalsh(M)
    torch.testing.assert_close(top.values, torch.flip(w[-4:], (0,)), rtol=1e-9, atol=1e-12)
    assert cc.top_eigen(C, 2).values.shape == (2,)  # sliced from the cached k = 4


def test_kron_top_eigen_forms_only_k_columns():
    K = kron(6, 7, True, 2)
    top = cc.top_eigen(K, 3)
    assert top.vectors.shape == (42, 3)
    assert "eigh" not in K._cache
    Kd = K.to_dense()
    torch.testing.assert_close(Kd @ top.vectors, top.vectors * top.values, atol=1e-10, rtol=0)


def test_spectra_of_a_matrix_with_itself():
    A = structured("kron", 1)
    s = cc.spectra(A, A, k=4)
    assert s.wasserstein == 0.0 and s.wasserstein_log == 0.0
    assert s.overlap == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(s.top_ratio, torch.ones(4, dtype=torch.float64))
    assert s.eig_a.shape == (P,)


def test_spectra_against_dense_formulas():
    A, B = structured("block", 1), structured("dense", 2)
    s = cc.spectra(A, B, k=3, damping=0.1)
    wa = torch.flip(torch.linalg.eigvalsh(A.to_dense()), (0,))
    wb = torch.flip(torch.linalg.eigvalsh(B.to_dense()), (0,))
    assert s.wasserstein == pytest.approx(float((wa - wb).abs().mean()), rel=1e-10)
    la, lb = torch.log10(wa.clamp(min=0) + 0.1), torch.log10(wb.clamp(min=0) + 0.1)
    assert s.wasserstein_log == pytest.approx(float((la - lb).abs().mean()), rel=1e-10)
    torch.testing.assert_close(s.top_ratio, wa[:3] / wb[:3], rtol=1e-10, atol=0)
    top = cc.spectra(A, B, k=3, full=False)
    assert math.isnan(top.wasserstein) and top.overlap == pytest.approx(s.overlap)


def test_wasserstein_of_unequal_sizes():
    a = torch.tensor([0.0, 1.0])
    b = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert cc.wasserstein(a, b) == pytest.approx(0.0)
    assert cc.wasserstein(torch.tensor([0.0]), torch.tensor([2.0, 4.0])) == pytest.approx(3.0)


def test_fraction_below_and_negative_mass():
    C = Diagonal(torch.tensor([1e-4, 1e-3, 1e-1, 1.0, 10.0], dtype=torch.float64))
    assert cc.fraction_below(C, 1e-2) == pytest.approx(0.4)
    H = Diagonal(torch.tensor([-2.0, -1.0, 3.0, 4.0], dtype=torch.float64))
    G = Diagonal(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert cc.negative_mass(H, G) == pytest.approx(3.0 / 10.0)
    assert cc.negative_mass(H) == pytest.approx(3.0 / 10.0)
    assert cc.negative_mass(G, G) == 0.0


def test_factor_fraction_below_uses_each_factors_damping_share():
    from curvlab.linalg import BlockDiagonal, Kron

    A = torch.diag(torch.tensor([1.0, 1e-2, 1e-4], dtype=torch.float64))
    G = torch.diag(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    C = BlockDiagonal([Kron(A, G)], ["layer"])
    lam = 1e-2  # factored: λ_A = λ_G = 0.1
    assert cc.factor_fraction_below(C, lam, "factored") == {"layer": (2 / 3, 1 / 2)}
    assert cc.factor_fraction_below(structured("dense", 0), lam) == {}


def test_spectral_comparators_refuse_what_is_not_a_curvature_matrix():
    C = Diagonal(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    M = C.to_dense()
    for call in (lambda: cc.spectra(M, C), lambda: cc.spectra(C, M), lambda: cc.fraction_below(M, 1e-3),
                 lambda: cc.negative_mass(M), lambda: cc.negative_mass(C, M), lambda: cc.eigenvalues(M),
                 lambda: cc.factor_fraction_below(M, 1e-3)):
        with pytest.raises(TypeError, match="CurvatureMatrix; got Tensor"):
            call()
    with pytest.raises(ValueError, match="damping must be finite; got nan"):
        cc.fraction_below(C, float("nan"))
    with pytest.raises(ValueError, match="damping must be finite; got inf"):
        cc.spectra(C, C, k=2, damping=float("inf"))
