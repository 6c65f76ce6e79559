"""Kron and EigenKron against their dense counterparts, every operation and damping mode (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab.linalg import BlockDiagonal, Dense, EigenKron, Kron
from tests.matrices import orth, spd

TOL = 1e-11




def param_perm(p: int, q: int, bias: bool) -> torch.Tensor:
    """Permutation matrix P with v_param = P v_folded, written out index by index."""
    P = torch.zeros(p * q, p * q, dtype=torch.float64)
    r = 0
    qw = q - 1 if bias else q
    for o in range(p):  # weights, row-major
        for i in range(qw):
            P[r, o * q + i] = 1.0
            r += 1
    if bias:
        for o in range(p):
            P[r, o * q + q - 1] = 1.0
            r += 1
    return P


def dense_kron(A: torch.Tensor, G: torch.Tensor, bias: bool) -> torch.Tensor:
    """The matrix of X ↦ G X A on [W b], in parameter order (column by column)."""
    p, q = G.shape[0], A.shape[0]
    P = param_perm(p, q, bias)
    cols = []
    for j in range(p * q):
        e = torch.zeros(p * q, dtype=torch.float64)
        e[j] = 1.0
        X = (P.T @ e).reshape(p, q)  # folded row-major matrix [W b]
        cols.append(P @ (G @ X @ A).reshape(-1))
    return torch.stack(cols, dim=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


SHAPES = [(3, 4, False), (3, 4, True), (1, 5, True), (4, 1, False), (2, 1, True)]


@pytest.fixture(params=SHAPES, ids=lambda s: f"p{s[0]}q{s[1]}{'b' if s[2] else ''}")
def kron(request):
    p, q, bias = request.param
    A, G = spd(q, 1), spd(p, 2)
    return Kron(A, G, bias), dense_kron(A, G, bias)


def test_layout_and_matvec(kron):
    K, D = kron
    assert rel(K.to_dense(), D) < TOL
    v = torch.randn(K.size, dtype=torch.float64)
    V = torch.randn(K.size, 3, dtype=torch.float64)
    assert rel(K @ v, D @ v) < TOL
    assert rel(K @ V, D @ V) < TOL
    assert rel(K.diagonal(), D.diagonal()) < TOL
    assert abs(float(K.trace() - D.trace())) < TOL * float(D.trace())
    assert abs(float(K.frobenius_norm() - torch.linalg.matrix_norm(D))) < TOL * float(D.norm())
    lo = K.as_linear_operator()
    assert rel(torch.as_tensor(lo @ v.numpy()), D @ v) < TOL


def test_bias_order_matches_weight_then_bias():
    # the folded bias column lands after all of W, row-major: check one entry by hand
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # input 2 is the bias
    G = torch.diag(torch.tensor([10.0, 20.0], dtype=torch.float64))
    D = Kron(A, G, bias=True).to_dense()
    # parameter order: W00 W01 W10 W11 b0 b1 -> diag = G_oo * A_ii
    assert torch.equal(D.diagonal(), torch.tensor([10.0, 20.0, 20.0, 40.0, 30.0, 60.0], dtype=torch.float64))


def test_eigen_and_spectrum(kron):
    K, D = kron
    E = K.eigen()
    assert isinstance(E, EigenKron)
    assert rel(E.to_dense(), D) < TOL
    w, V = K.eigh()
    assert torch.all(w[1:] >= w[:-1])
    assert rel(V @ torch.diag(w) @ V.T, D) < TOL
    assert rel(V.T @ V, torch.eye(K.size, dtype=torch.float64)) < TOL
    assert rel(K.eigvalsh(), torch.linalg.eigvalsh(D)) < 1e-10
    assert abs(float(K.logdet(0.1)) - float(torch.logdet(D + 0.1 * torch.eye(K.size, dtype=torch.float64)))) < 1e-10


def damped_dense(A, G, bias, dA, dG):
    Iq, Ip = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    return dense_kron(A + dA * Iq, G + dG * Ip, bias)


def mode_dense(K: Kron, mode: str, lam):
    A, G = K.A, K.G
    p, q = G.shape[0], A.shape[0]
    if mode == "exact":
        return dense_kron(A, G, K.bias) + lam * torch.eye(p * q, dtype=torch.float64)
    if mode == "factored":
        dA, dG = lam if isinstance(lam, tuple) else (math.sqrt(lam), math.sqrt(lam))
    elif mode == "pi":
        pi = math.sqrt((float(A.trace()) / q) / (float(G.trace()) / p))
        dA, dG = pi * math.sqrt(lam), math.sqrt(lam) / pi
    elif mode == "trace":
        dA = math.sqrt(lam * float(A.trace()) / float(G.trace()))
        dG = math.sqrt(lam * float(G.trace()) / float(A.trace()))
    return damped_dense(A, G, K.bias, dA, dG)


MODES = [("exact", 0.3), ("factored", 0.3), ("factored", (0.2, 0.05)), ("pi", 0.3), ("trace", 0.3), ("exact", 0.0)]


@pytest.mark.parametrize("mode,lam", MODES, ids=[f"{m}-{lam}" for m, lam in MODES])
def test_damped_operations(kron, mode, lam):
    K, _ = kron
    M = mode_dense(K, mode, lam)
    v = torch.randn(K.size, dtype=torch.float64)
    V = torch.randn(K.size, 2, dtype=torch.float64)
    assert rel(K.solve(v, lam, mode), torch.linalg.solve(M, v)) < 1e-10
    assert rel(K.solve(V, lam, mode), torch.linalg.solve(M, V)) < 1e-10
    assert rel(K.direction(v, lam, mode), -torch.linalg.solve(M, v)) < 1e-10
    inv = K.inverse(lam, mode)
    assert rel(inv.to_dense(), torch.linalg.inv(M)) < 1e-10
    assert abs(float(K.logdet(lam, mode) - torch.logdet(M))) < 1e-9
    E = K.eigen()  # the same rules through the shared eigenbasis
    assert rel(E.solve(v, lam, mode), torch.linalg.solve(M, v)) < 1e-10


def test_protocol_solve_is_exact(kron):
    K, D = kron
    v = torch.randn(K.size, dtype=torch.float64)
    M = D + 0.5 * torch.eye(K.size, dtype=torch.float64)
    assert rel(K.solve(v, 0.5), torch.linalg.solve(M, v)) < 1e-10
    assert rel(BlockDiagonal([K, K]).solve(torch.cat([v, v]), 0.5), torch.linalg.solve(M, v).repeat(2)) < 1e-10
    assert rel(BlockDiagonal([K]).direction(v, 0.5, "pi"), K.direction(v, 0.5, "pi")) < TOL


def test_expansion_identity(kron):
    """(A + λ_A I) ⊗ (G + λ_G I) = A⊗G + λ_G (A⊗I) + λ_A (I⊗G) + λ_A λ_G I  (papers.md §0)."""
    K, D = kron
    A, G = K.A, K.G
    lA, lG = 0.37, 0.11
    Ip, Iq = torch.eye(G.shape[0], dtype=torch.float64), torch.eye(A.shape[0], dtype=torch.float64)
    lhs = Kron(A + lA * Iq, G + lG * Ip, K.bias).to_dense()
    rhs = (D + lG * Kron(A, Ip, K.bias).to_dense() + lA * Kron(Iq, G, K.bias).to_dense()
           + lA * lG * torch.eye(K.size, dtype=torch.float64))
    assert rel(lhs, rhs) < TOL
    # the factored solve is the inverse of exactly this matrix
    v = torch.randn(K.size, dtype=torch.float64)
    assert rel(K.solve(v, (lA, lG), "factored"), torch.linalg.solve(rhs, v)) < 1e-10


@pytest.mark.parametrize("bias", [False, True])
def test_eigenkron_arbitrary_diagonal(bias):
    p, q = 3, 4
    QA, QG = orth(q, 3), orth(p, 4)
    g = torch.Generator().manual_seed(5)
    S = torch.rand(p, q, generator=g, dtype=torch.float64) + 0.1
    eA, eG = torch.rand(q, generator=g, dtype=torch.float64), torch.rand(p, generator=g, dtype=torch.float64)
    E = EigenKron(QA, QG, S, bias, (eA, eG))
    P = param_perm(p, q, bias)
    Q = P @ torch.kron(QG, QA)
    D = Q @ torch.diag(S.reshape(-1)) @ Q.T
    assert rel(E.to_dense(), D) < TOL
    v = torch.randn(p * q, dtype=torch.float64)
    assert rel(E @ v, D @ v) < TOL
    assert rel(E.diagonal(), D.diagonal()) < TOL
    assert abs(float(E.trace() - D.trace())) < TOL
    assert abs(float(E.frobenius_norm() - D.norm())) < TOL
    assert rel(E.eigvalsh(), torch.linalg.eigvalsh(D)) < TOL
    w, V = E.eigh()
    assert rel(V @ torch.diag(w) @ V.T, D) < TOL
    I = torch.eye(p * q, dtype=torch.float64)
    assert rel(E.solve(v, 0.2), torch.linalg.solve(D + 0.2 * I, v)) < 1e-10
    assert rel(E.inverse(0.2).to_dense(), torch.linalg.inv(D + 0.2 * I)) < 1e-10
    assert abs(float(E.logdet(0.2) - torch.logdet(D + 0.2 * I))) < 1e-10
    # factored modes on an arbitrary S: S + λ_G (A⊗I) + λ_A (I⊗G) + λ_A λ_G I with A, G from (Q, e)
    A, G = QA @ torch.diag(eA) @ QA.T, QG @ torch.diag(eG) @ QG.T
    lA, lG = 0.3, 0.07
    Ip, Iq = torch.eye(p, dtype=torch.float64), torch.eye(q, dtype=torch.float64)
    M = D + lG * dense_kron(A, Ip, bias) + lA * dense_kron(Iq, G, bias) + lA * lG * I
    assert rel(E.solve(v, (lA, lG), "factored"), torch.linalg.solve(M, v)) < 1e-10
    assert rel(E.inverse((lA, lG), "factored").to_dense(), torch.linalg.inv(M)) < 1e-10


def test_arithmetic(kron):
    K, D = kron
    assert rel((2.5 * K).to_dense(), 2.5 * D) < TOL
    assert isinstance(2.5 * K, Kron)
    assert rel((-K.eigen()).to_dense(), -D) < TOL
    # same A: stays a Kron; same eigenbasis: stays an EigenKron
    K2 = Kron(K.A, 2 * K.G + torch.eye(K.p, dtype=torch.float64), K.bias)
    s = K + K2
    assert isinstance(s, Kron) and rel(s.to_dense(), D + K2.to_dense()) < TOL
    E = K.eigen()
    E2 = EigenKron(E.Q_A, E.Q_G, E.S + 1.0, K.bias)
    d = E2 - K
    assert isinstance(d, EigenKron) and rel(d.to_dense(), torch.eye(K.size, dtype=torch.float64)) < 1e-10
    # different structures add densely
    other = Dense(torch.eye(K.size, dtype=torch.float64))
    assert rel((K + other).to_dense(), D + torch.eye(K.size, dtype=torch.float64)) < TOL


def test_sums_that_stay_kronecker_keep_factored_damping(kron):
    """EigenKron sums sharing a factor are one Kronecker product: their factored modes agree with the
    Kron of the summed factor; sums sharing neither factor have no factored damping and say so."""
    K, _ = kron
    E = K.eigen()
    g = torch.randn(K.size, dtype=torch.float64)
    double = E + E  # = A ⊗ 2G
    ref = Kron(K.A, 2 * K.G, K.bias)
    for mode in ("factored", "pi", "trace"):
        assert rel(double.solve(g, 0.3, mode=mode), ref.solve(g, 0.3, mode=mode)) < 1e-10
    diff = (3 * E) - E  # = A ⊗ 2G again
    assert rel(diff.solve(g, 0.3, mode="factored"), ref.solve(g, 0.3, mode="factored")) < 1e-10
    shifted = EigenKron(E.Q_A, E.Q_G, E.S, K.bias, (E.factor_eigenvalues[0] + 1, E.factor_eigenvalues[1] + 1))
    mixed = E + shifted  # shares neither factor: not a Kronecker product
    assert rel(mixed.to_dense(), E.to_dense() + shifted.to_dense()) < TOL
    with pytest.raises(ValueError):
        mixed.solve(g, 0.3, mode="factored")


def test_float32():
    A, G = spd(4, 1).float(), spd(3, 2).float()
    K = Kron(A, G, bias=True)
    D = dense_kron(A.double(), G.double(), True)
    v = torch.randn(K.size)
    assert K.dtype == torch.float32
    assert rel((K @ v).double(), D @ v.double()) < 1e-5
    M = mode_dense(Kron(A.double(), G.double(), True), "pi", 0.1)
    assert rel(K.solve(v, 0.1, "pi").double(), torch.linalg.solve(M, v.double())) < 1e-4


def test_errors():
    K = Kron(spd(3, 1), spd(2, 2), bias=True)
    v = torch.randn(K.size, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown damping mode"):
        K.solve(v, 0.1, "heuristic")
    with pytest.raises(ValueError, match="pair"):
        K.solve(v, (0.1, 0.2), "exact")
    with pytest.raises(ValueError, match="pair"):
        K.solve(v, (0.1, 0.2), "pi")
    with pytest.raises(ValueError, match="does not keep"):
        K.inverse(0.1).solve(v, 0.1, "pi")
    with pytest.raises(ValueError, match="square"):
        Kron(torch.zeros(2, 3, dtype=torch.float64), spd(2, 1))
    with pytest.raises(ValueError, match="shape"):
        EigenKron(orth(3, 1), orth(2, 1), torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        Kron(spd(3, 1, rank=1), spd(2, 2)).solve(v, 0.0)


# ---------------------------------------------------------------------------------------------- singularity
def _factor(n: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    Q = orth(n, seed)
    return (Q * eigenvalues) @ Q.T


_SINGULAR_CASES = [  # (eigenvalues of A, of G, damping, mode, singular?)
    (torch.tensor([0.0, 0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]), 0.0, "exact", True),  # rank-deficient A
    (torch.tensor([0.0, 0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]), (0.0, 0.0), "factored", True),
    (torch.tensor([0.0, 0.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 4.0]), (0.1, 0.0), "factored", True),  # G still
    (torch.tensor([0.0, 0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]), (0.1, 0.0), "factored", False),
    (torch.tensor([0.0, 0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 4.0]), 1e-3, "exact", False),
    (torch.tensor([-1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0]), 1.0, "exact", True),  # −1·1 + 1 = 0
    (torch.tensor([-1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0]), 0.5, "exact", False),
    # two negative definite factors: a positive definite product whose inverse needs no Cholesky
    (torch.tensor([-3.0, -2.0, -1.0, -0.5]), torch.tensor([-1.0, -2.0, -4.0]), (0.0, 0.0), "factored", False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eA,eG,damping,mode,singular", _SINGULAR_CASES)
def test_a_kronecker_product_refuses_where_its_damped_eigenvalues_are_numerically_zero(eA, eG, damping, mode,
                                                                                        singular, dtype):
    """Solve, direction and inverse of A ⊗ G refuse alike: exactly where a damped factor is singular or
    the product cancels the damping; otherwise they agree with the dense solve."""
    A, G = _factor(4, eA.double(), 1).to(dtype), _factor(3, eG.double(), 2).to(dtype)
    K = Kron(A, G, bias=True)
    v = torch.linspace(-1, 1, 12, dtype=dtype)
    ops = (lambda: K.solve(v, damping, mode), lambda: K.direction(v, damping, mode),
           lambda: K.inverse(damping, mode) @ v)
    if singular:
        for op in ops:
            with pytest.raises(ValueError, match="singular.*increase the damping"):
                op()
        return
    dA, dG = (0.0, 0.0) if mode == "exact" else damping
    lam = damping if mode == "exact" else 0.0
    dense = K.layout.to_param_order(torch.kron(G.double() + dG * torch.eye(3, dtype=torch.float64),
                                               A.double() + dA * torch.eye(4, dtype=torch.float64)))
    ref = torch.linalg.solve(dense + lam * torch.eye(12, dtype=torch.float64), v.double())
    d = (eG.double() + dG)[:, None] * (eA.double() + dA)[None, :] + lam  # the damped eigenvalues
    tol = 10 * float(d.abs().max() / d.abs().min()) * torch.finfo(dtype).eps  # κ·ε, the solve's accuracy
    for x in (ops[0](), -ops[1](), ops[2]()):
        assert float((x.double() - ref).norm() / ref.norm()) < tol


def test_a_float32_kronecker_block_with_small_factor_damping_is_accepted_and_accurate():
    """Regression (two-level KFAC on digits-cnn refused at λ = (0.01, 0.01) in float32): the smallest damped
    eigenvalue λ_A·λ_G = 1e-4 lies below √n·ε·max|S| = 1.6e-4 of the 150·32 block, yet each factor is damped
    far above its own rounding error; the solve is accurate to float32's κ·ε."""
    eA = torch.cat([torch.zeros(20), torch.linspace(0.01, 20.0, 130)]).double()
    eG = torch.cat([torch.zeros(4), torch.linspace(0.001, 1.0, 28)]).double()
    A64, G64 = _factor(150, eA, 3), _factor(32, eG, 4)
    K = Kron(A64.float(), G64.float(), bias=True)
    S_max = float(eA.max() * eG.max())
    assert 1e-4 < math.sqrt(150 * 32) * torch.finfo(torch.float32).eps * S_max  # what the old rule refused
    v = torch.randn(150 * 32, generator=torch.Generator().manual_seed(5))
    x = K.solve(v, (0.01, 0.01), "factored")
    ref = Kron(A64, G64, bias=True).solve(v.double(), (0.01, 0.01), "factored")
    kappa = float((eA.max() + 0.01) * (eG.max() + 0.01) / 1e-4)
    assert float((x.double() - ref).norm() / ref.norm()) < kappa * torch.finfo(torch.float32).eps
    y = K.inverse((0.01, 0.01), "factored") @ v  # the optimizer's path: Cholesky of each damped factor
    assert float((y.double() - ref).norm() / ref.norm()) < kappa * torch.finfo(torch.float32).eps
    with pytest.raises(ValueError, match="singular"):  # undamped it is singular, and refused
        K.solve(v, (0.0, 0.0), "factored")


def _squares_block(dtype: torch.dtype, big: float):
    """EKFAC-like: S = Σ_n (Q_Gᵀ V_n Q_A)² of rank-one V_n = g aᵀ, the inputs a in the span of 3 columns of
    Q_A (so the other 147 columns of S are zero up to rounding), one of them scaled by ``big``."""
    gen = torch.Generator().manual_seed(7)
    p, q = 32, 150
    QA, QG = orth(q, 8), orth(p, 9)
    c = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    c[:, 0] *= big
    a = c @ QA[:, :3].T
    g = torch.randn(40, p, generator=gen, dtype=torch.float64)
    S = ((g @ QG) ** 2).T @ ((a @ QA) ** 2)  # S_ij = Σ_n (Q_Gᵀ g_n)_i² (Q_Aᵀ a_n)_j², (p, q)
    return QA.to(dtype), QG.to(dtype), S.to(dtype)


def test_a_sum_of_squared_projections_refuses_zero_moments_undamped_but_not_a_usable_damping():
    """Regression (EKFAC on digits-cnn refused λ = 1e-2 in float32): S* is a sum of squares, known to
    √n·ε·S + 2ε'√(S·ΣS) + ε'²ΣS; λ = 1e-2 far above that solves accurately even where λ < √n·ε·max S."""
    QA, QG, S = _squares_block(torch.float32, 300.0)
    E = EigenKron(QA, QG, S, bias=True, squares=True)
    assert 1e-2 < math.sqrt(S.numel()) * torch.finfo(torch.float32).eps * float(S.max())  # the old rule refused
    v = torch.randn(S.numel(), generator=torch.Generator().manual_seed(1))
    x = E.solve(v, 1e-2)
    E64 = EigenKron(QA.double(), QG.double(), S.double(), bias=True, squares=True)
    ref = E64.solve(v.double(), 1e-2)
    kappa = float((S.max() + 1e-2) / 1e-2)
    assert float((x.double() - ref).norm() / ref.norm()) < kappa * torch.finfo(torch.float32).eps
    for op in (lambda: E.solve(v, 0.0), lambda: E.inverse(0.0)):  # rank ≤ 3·32 of 4,800: singular undamped
        with pytest.raises(ValueError, match="singular.*squared projections"):
            op()
    with pytest.raises(ValueError, match="√n·ε·scale"):  # without the flag: the general rule, as before
        EigenKron(QA, QG, S, bias=True).solve(v, 1e-2)


def test_non_finite_eigenvalues_raise_floating_point_error():
    QA, QG, S = _squares_block(torch.float64, 1.0)
    S[0, 0] = float("inf")
    for flags in ({}, {"squares": True}):
        with pytest.raises(FloatingPointError, match="not finite"):
            EigenKron(QA, QG, S, **flags).solve(torch.ones(S.numel(), dtype=torch.float64), 0.1)
