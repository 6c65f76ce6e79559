"""curvlab.compare.kron on its own: factor damping shares, leaves, and the Kronecker inner products.

The inner products are checked through the public ``curvlab.compare.inner`` / ``cosine`` against
dense Frobenius products of matrices built here with ``torch.kron`` and an explicit index map
from the folded (o, i) layout to parameter order (W row-major, then b); the damping shares against
eigenvalues of the factors counted directly, with the factor dampings written out from their
formulas (π-rule, √λ each, trace split) and compared with ``curvlab.linalg.kron.factor_damping``.
"""

from __future__ import annotations

import math

import pytest
import torch

import curvlab as cl
from curvlab.compare.kron import factor_fraction_below, kron_leaves
from curvlab.linalg import BlockDiagonal, Dense, Diagonal, EigenKron, Kron
from curvlab.linalg.kron import factor_damping


def spd(n: int, seed: int) -> torch.Tensor:
    B = torch.randn(n, n + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return B @ B.T / (n + 1)


def orth(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def positive(p: int, q: int, seed: int) -> torch.Tensor:
    return torch.rand(p, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


def folded_index(p: int, q: int, bias: bool) -> torch.Tensor:
    """Parameter position of folded entry (o, i), row-major over (o, i); the bias is input q − 1."""
    if not bias:
        return torch.arange(p * q)
    W = torch.arange(p * (q - 1)).reshape(p, q - 1)
    return torch.cat([W, (p * (q - 1) + torch.arange(p))[:, None]], dim=1).reshape(-1)


def to_param_order(Dfold: torch.Tensor, p: int, q: int, bias: bool) -> torch.Tensor:
    idx = folded_index(p, q, bias)
    D = torch.empty_like(Dfold)
    D[idx[:, None], idx[None, :]] = Dfold
    return D


def dense_of(C) -> torch.Tensor:
    """The dense matrix of a Kron / EigenKron built from its factors (not from ``to_dense``)."""
    if isinstance(C, Kron):
        return to_param_order(torch.kron(C.G, C.A), C.p, C.q, C.bias)
    Q = torch.kron(C.Q_G, C.Q_A)  # column (i, j) ↔ S[i, j]
    return to_param_order((Q * C.S.reshape(-1)) @ Q.T, C.p, C.q, C.bias)


def kron(p, q, bias, seed):
    return Kron(spd(q, seed), spd(p, seed + 1), bias=bias)


def eigen_kron(p, q, bias, seed, Q_A=None, Q_G=None):
    Q_A = orth(q, seed) if Q_A is None else Q_A
    Q_G = orth(p, seed + 1) if Q_G is None else Q_G
    return EigenKron(Q_A, Q_G, positive(p, q, seed + 2), bias=bias)


def check_inner(A, B, DA: torch.Tensor, DB: torch.Tensor) -> None:
    ref = float((DA * DB).sum())
    for x, y in ((A, B), (B, A)):
        assert float(cl.compare.inner(x, y)) == pytest.approx(ref, rel=1e-12)
    cos = ref / float(torch.linalg.matrix_norm(DA) * torch.linalg.matrix_norm(DB))
    assert cl.compare.cosine(A, B).total == pytest.approx(cos, rel=1e-12)


# ---------------------------------------------------------------------------------------- inner products
def test_the_dense_reference_is_the_matrix():
    """The index map agrees with the matrices' own products (a guard for the reference itself)."""
    for C in (kron(3, 4, True, 0), kron(2, 5, False, 1), eigen_kron(3, 4, True, 2), eigen_kron(2, 3, False, 3)):
        V = torch.randn(C.size, 3, dtype=torch.float64)
        assert torch.allclose(C @ V, dense_of(C) @ V, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bias", [False, True])
def test_kron_and_eigen_kron_vs_dense(bias):
    D = spd(12, 9)
    for C in (kron(3, 4, bias, 0), eigen_kron(3, 4, bias, 1)):
        check_inner(C, Dense(D), dense_of(C), D)


@pytest.mark.parametrize("bias", [False, True])
def test_kron_vs_kron_same_layout(bias):
    A, B = kron(3, 4, bias, 0), kron(3, 4, bias, 10)
    check_inner(A, B, dense_of(A), dense_of(B))
    # one shared factor, and a scaled copy
    C = Kron(A.A, spd(3, 20), bias)
    check_inner(A, C, dense_of(A), dense_of(C))
    check_inner(A, A * 2.5, dense_of(A), 2.5 * dense_of(A))


@pytest.mark.parametrize("a,b", [((2, 3, False), (3, 2, False)),   # transposed layout, same size
                                 ((2, 3, True), (2, 3, False)),    # folded bias vs none
                                 ((3, 2, True), (2, 3, False)),
                                 ((4, 3, False), (2, 6, True))])   # p·q = 12 with different p, q
def test_kron_vs_kron_different_layouts(a, b):
    A, B = kron(*a, 0), kron(*b, 5)
    assert A.size == B.size
    check_inner(A, B, dense_of(A), dense_of(B))
    E, F = eigen_kron(*a, 1), eigen_kron(*b, 6)
    check_inner(E, F, dense_of(E), dense_of(F))
    check_inner(A, F, dense_of(A), dense_of(F))


@pytest.mark.parametrize("bias", [False, True])
def test_eigen_kron_pairs(bias):
    E = eigen_kron(3, 4, bias, 0)
    same = EigenKron(E.Q_A, E.Q_G, positive(3, 4, 50), bias=bias)  # same basis
    copy = EigenKron(E.Q_A.clone(), E.Q_G.clone(), positive(3, 4, 51), bias=bias)  # equal, not identical
    other = eigen_kron(3, 4, bias, 7)  # another basis
    K = kron(3, 4, bias, 8)
    for B in (same, copy, other, K):
        check_inner(E, B, dense_of(E), dense_of(B))


def test_kron_vs_other_structures():
    K = kron(3, 4, True, 0)
    d = positive(1, 12, 3)[0]
    check_inner(K, Diagonal(d), dense_of(K), torch.diag(d))
    B = BlockDiagonal([Dense(spd(5, 1)), Dense(spd(7, 2))])
    check_inner(K, B, dense_of(K), torch.block_diag(spd(5, 1), spd(7, 2)))


def test_blockwise_cosine_of_kronecker_blocks():
    layout = [(3, 4, True), (2, 5, False), (2, 3, True)]
    K = BlockDiagonal([kron(p, q, b, 3 * i) for i, (p, q, b) in enumerate(layout)], ["l0", "l1", "l2"])
    E = BlockDiagonal([eigen_kron(p, q, b, 3 * i + 1) for i, (p, q, b) in enumerate(layout)], ["l0", "l1", "l2"])
    DK = torch.block_diag(*[dense_of(b) for b in K.blocks])
    DE = torch.block_diag(*[dense_of(b) for b in E.blocks])
    cos = cl.compare.cosine(K, E)
    ref = float((DK * DE).sum() / (torch.linalg.matrix_norm(DK) * torch.linalg.matrix_norm(DE)))
    assert cos.total == pytest.approx(ref, rel=1e-12)
    for name, s in zip(K.block_names, K.block_slices):
        a, b = DK[s, s], DE[s, s]
        assert cos[name] == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), rel=1e-12)
    D = spd(DK.shape[0], 4)
    err = cl.compare.relative_error(K, Dense(D)).total
    assert err == pytest.approx(float(torch.linalg.matrix_norm(DK - D) / torch.linalg.matrix_norm(D)), rel=1e-10)


# ---------------------------------------------------------------------------------------- factor damping shares
def expected_split(mode: str, lam, eA: torch.Tensor, eG: torch.Tensor) -> tuple[float, float]:
    if mode == "factored":
        return (lam[0], lam[1]) if isinstance(lam, tuple) else (math.sqrt(lam), math.sqrt(lam))
    trA, trG = float(eA.sum()), float(eG.sum())
    if trA <= 0 or trG <= 0:
        return math.sqrt(lam), math.sqrt(lam)
    if mode == "pi":
        pi = math.sqrt((trA / len(eA)) / (trG / len(eG)))
        return pi * math.sqrt(lam), math.sqrt(lam) / pi
    return math.sqrt(lam * trA / trG), math.sqrt(lam * trG / trA)  # trace


def nested_matrix():
    eA, eG = torch.linspace(0.05, 2.0, 4, dtype=torch.float64), torch.linspace(0.1, 3.0, 3, dtype=torch.float64)
    ek = EigenKron(orth(4, 1), orth(3, 2), eG[:, None] * eA[None, :], False, (eA, eG))
    inner = BlockDiagonal([kron(2, 5, False, 3), ek, Dense(spd(3, 4))], ["x", "y", "z"])
    zero_G = Kron(spd(2, 6), torch.zeros(2, 2, dtype=torch.float64))
    C = BlockDiagonal([kron(3, 4, True, 0), inner, eigen_kron(2, 3, False, 5),
                       Diagonal(torch.ones(4, dtype=torch.float64)), zero_G], ["l0", "l1", "l2", "l3", "l4"])
    factors = {"l0": C.blocks[0], "l1.x": inner.blocks[0], "l1.y": (eA, eG), "l4": C.blocks[4]}
    return C, factors


def factor_eigenvalues(leaf) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(leaf, tuple):
        return leaf
    return torch.linalg.eigvalsh(leaf.A), torch.linalg.eigvalsh(leaf.G)


@pytest.mark.parametrize("mode,damping", [(m, d) for m in ("pi", "factored", "trace") for d in (0.01, 0.5, 4.0)]
                         + [("factored", (0.3, 1.2))])
def test_factor_fraction_below_counts_factor_eigenvalues(mode, damping):
    C, factors = nested_matrix()
    out = factor_fraction_below(C, damping, mode)
    # Kronecker leaves only, nested ones named block.leaf; a leaf without factor eigenvalues is left out
    assert list(out) == list(factors)
    for name, leaf in factors.items():
        eA, eG = factor_eigenvalues(leaf)
        lam_A, lam_G = expected_split(mode, damping, eA, eG)
        got = factor_damping(mode, damping, eA, eG)
        assert got[0] == pytest.approx(lam_A, rel=1e-12) and got[1] == pytest.approx(lam_G, rel=1e-12)
        share = (float((eA < lam_A).double().mean()), float((eG < lam_G).double().mean()))
        assert out[name] == pytest.approx(share, abs=0)
    if damping == 0.5:  # the shares discriminate: some factor is split by its damping
        assert any(0 < v < 1 for pair in out.values() for v in pair)


def test_factor_fraction_below_extremes_and_bad_arguments():
    C, factors = nested_matrix()
    lo, hi = factor_fraction_below(C, 1e-12), factor_fraction_below(C, 1e12)
    for name in factors:
        assert hi[name] == (1.0, 1.0)
        assert lo[name][0] == 0.0
    assert lo["l4"][1] == 1.0  # G = 0: every eigenvalue is below any positive damping
    with pytest.raises(TypeError, match="CurvatureMatrix"):
        factor_fraction_below(torch.eye(3), 0.1)
    with pytest.raises(ValueError, match="'fancy'"):
        factor_fraction_below(C, 0.1, "fancy")
    with pytest.raises(ValueError, match="-1"):
        factor_fraction_below(C, -1.0)
    with pytest.raises(ValueError, match="pair"):
        factor_fraction_below(C, (0.1, 0.2), "pi")


# ---------------------------------------------------------------------------------------- leaves
def test_kron_leaves():
    C, _ = nested_matrix()
    leaves = list(kron_leaves(C))
    assert [n for n, _ in leaves] == ["l0", "l1.x", "l1.y", "l1.z", "l2", "l3", "l4"]
    inner = C.blocks[1]
    expected = [C.blocks[0], *inner.blocks, *C.blocks[2:]]
    assert all(a is b for (_, a), b in zip(leaves, expected))
    K = kron(2, 3, False, 0)
    assert [(n, m) for n, m in kron_leaves(K)] == [("all", K)]
    assert [n for n, _ in kron_leaves(inner, "top")] == ["top.x", "top.y", "top.z"]
    deep = BlockDiagonal([BlockDiagonal([K], ["b"])], ["a"])
    assert [n for n, _ in kron_leaves(deep)] == ["a.b"]
