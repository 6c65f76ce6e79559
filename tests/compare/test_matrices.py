"""Matrix comparators: structured computations agree with the same quantities on dense forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import curvlab.compare as cc
from curvlab.linalg import Dense
from tests.compare.helpers import KINDS, LAYOUT, NAMES, P, eigen_kron, kron, spd, structured

TOL = 1e-10
BLOCKS = []
_start = 0
for _name, (_p, _q, _b) in zip(NAMES, LAYOUT):
    BLOCKS.append((_name, slice(_start, _start + _p * _q)))
    _start += _p * _q


def dense_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def dense_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_cosine_with_itself_is_one_and_scale_invariant(kind):
    A = structured(kind, 0)
    assert cc.cosine(A, A).total == pytest.approx(1.0, abs=TOL)
    assert cc.cosine(A, 3.5 * A).total == pytest.approx(1.0, abs=TOL)
    assert cc.cosine(0.25 * A, A).total == pytest.approx(1.0, abs=TOL)
    assert cc.relative_error(A, A).total == pytest.approx(0.0, abs=TOL)
    assert cc.relative_error(2.0 * A, A).total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("ka,kb", list(itertools.product(KINDS, KINDS)))
def test_structured_equals_dense(ka, kb):
    A, B = structured(ka, 1), structured(kb, 2)
    Ad, Bd = A.to_dense(), B.to_dense()
    assert float(cc.inner(A, B)) == pytest.approx(float((Ad * Bd).sum()), rel=TOL)
    c = cc.cosine(A, B, blocks=BLOCKS)
    e = cc.relative_error(A, B, blocks=BLOCKS)
    assert c.total == pytest.approx(dense_cos(Ad, Bd), abs=TOL)
    assert e.total == pytest.approx(dense_rel(Ad, Bd), rel=1e-8)
    for name, s in BLOCKS:
        assert c.blocks[name] == pytest.approx(dense_cos(Ad[s, s], Bd[s, s]), abs=TOL)
        assert e.blocks[name] == pytest.approx(dense_rel(Ad[s, s], Bd[s, s]), rel=1e-8)


@pytest.mark.parametrize("bias", [False, True])
def test_kronecker_identities(bias):
    K1, K2 = kron(3, 4, bias, 0), kron(3, 4, bias, 5)
    E1, E2 = eigen_kron(3, 4, bias, 0), eigen_kron(3, 4, bias, 7)
    D = Dense(spd(12, 9))
    for X, Y in [(K1, K2), (K1, D), (D, K1), (E1, E2), (E1, D), (K1, E1), (E2, K2), (E1, E1.inverse(0.3))]:
        assert float(cc.inner(X, Y)) == pytest.approx(float((X.to_dense() * Y.to_dense()).sum()), rel=TOL)


def test_kron_against_its_own_dense_form_is_exact():
    """A Kronecker block compared with the same matrix stored densely: error at rounding level."""
    K = kron(4, 6, True, 3)
    assert cc.relative_error(K, Dense(K.to_dense())).total < 1e-13
    assert cc.cosine(K, Dense(K.to_dense())).total == pytest.approx(1.0, abs=1e-14)


def test_block_diagonal_against_dense_counts_the_cross_block_mass():
    B = structured("dense", 4)
    Bd = B.to_dense()
    A = structured("block", 4)
    A_exact_blocks = type(A)([Dense(Bd[s, s].clone()) for _, s in BLOCKS], NAMES)
    e = cc.relative_error(A_exact_blocks, B)
    off = Bd.clone()
    for _, s in BLOCKS:
        off[s, s] = 0
    assert e.total == pytest.approx(float(off.norm() / Bd.norm()), rel=1e-12)
    assert all(v == pytest.approx(0.0, abs=1e-14) for v in e.blocks.values())


@pytest.mark.parametrize("kind", ["dense", "block", "kron", "mixed"])
def test_trace_ratio_and_logdet_difference(kind):
    A, B = structured(kind, 5), structured("dense", 6)
    Ad, Bd = A.to_dense(), B.to_dense()
    lam = 0.1
    I = torch.eye(P, dtype=torch.float64)
    t = cc.trace_ratio(A, B, lam, blocks=BLOCKS)
    assert t.total == pytest.approx(float(torch.trace(Ad + lam * I) / torch.trace(Bd + lam * I)), rel=TOL)
    ld = cc.logdet_difference(A, B, lam, blocks=BLOCKS)
    assert ld.total == pytest.approx(float(torch.logdet(Ad + lam * I) - torch.logdet(Bd + lam * I)), rel=1e-9)
    for name, s in BLOCKS:
        n = s.stop - s.start
        Ib = torch.eye(n, dtype=torch.float64)
        want = float(torch.logdet(Ad[s, s] + lam * Ib) - torch.logdet(Bd[s, s] + lam * Ib))
        assert ld.blocks[name] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_logdet_of_indefinite_raises():
    A = Dense(torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="positive definite"):
        cc.logdet_difference(A, Dense(torch.eye(3, dtype=torch.float64)), 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_restrict_is_the_principal_submatrix(kind):
    C = structured(kind, 8)
    D = C.to_dense()
    for s in [slice(0, 12), slice(3, 17), slice(12, 22), slice(20, P)]:
        R = cc.restrict(C, s)
        torch.testing.assert_close(R.to_dense(), D[s, s], rtol=1e-12, atol=1e-12)
        assert cc.restrict(C, s) is R  # memoised


def test_errors_are_clear():
    with pytest.raises(ValueError, match="sizes"):
        cc.cosine(structured("dense", 0), Dense(torch.eye(3, dtype=torch.float64)))
    with pytest.raises(TypeError, match="CurvatureMatrix"):
        cc.cosine(torch.eye(3), Dense(torch.eye(3, dtype=torch.float64)))
    Z = Dense(torch.zeros(P, P, dtype=torch.float64))
    assert math.isnan(cc.cosine(Z, structured("dense", 0)).total)
    assert math.isnan(cc.relative_error(structured("dense", 0), Z).total)
