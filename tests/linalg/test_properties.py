"""Property-based tests of the CurvatureMatrix algebra (hypothesis, float64).

Random structured matrices — Dense SPD, Diagonal, Kron (with and without a folded bias), EigenKron
(random orthogonal bases, random positive S, with or without the factor eigenvalues) and
BlockDiagonals of any mix of them, possibly nested — are checked against a dense reference that is
built here, independently of the library, from the definitions in the docstrings of
``curvlab/linalg/kron.py``:

* parameter order: W row-major, then the folded bias b (the last column of X = [W b]);
* ``Kron(A, G)`` acts as X ↦ G X A, so entry ((o, i), (o', i')) is G[o, o'] A[i, i'];
* ``EigenKron(Q_A, Q_G, S)`` has eigenvector Q_G[:, i] ⊗ Q_A[:, j] (the matrix Q_G[:, i] Q_A[:, j]ᵀ)
  with eigenvalue S[i, j];
* factored damping (λ_A, λ_G): (A + λ_A I) ⊗ (G + λ_G I); a scalar λ gives λ_A = λ_G = √λ; "pi" and
  "trace" split λ by the factors' traces; an EigenKron with factor eigenvalues (e_A, e_G) adds
  λ_G e_A[j] + λ_A e_G[i] + λ_A λ_G to S[i, j].

Every tolerance is relative to the size of what is compared (matrix norms, condition numbers), so
it stays tight whatever the random scale of the matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal, EigenKron, Kron

F64 = torch.float64
EPS = torch.finfo(F64).eps

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------- matrix trees


@dataclass
class DenseLeaf:
    M: torch.Tensor


@dataclass
class DiagLeaf:
    d: torch.Tensor


@dataclass
class KronLeaf:
    A: torch.Tensor
    G: torch.Tensor
    bias: bool


@dataclass
class EigenLeaf:
    QA: torch.Tensor
    QG: torch.Tensor
    S: torch.Tensor
    bias: bool
    fe: tuple[torch.Tensor, torch.Tensor] | None  # factor eigenvalues (e_A, e_G)
    kfac: bool = False  # S = e_G e_Aᵀ: the eigendecomposition of the Kron of the factors


@dataclass
class Block:
    children: list


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psd(n: int, g: torch.Generator, rank: int, shift: float, scale: float) -> torch.Tensor:
    """scale · (B Bᵀ / rank + shift I), exactly symmetric; B is n×rank (rank may be < n)."""
    B = torch.randn(n, rank, generator=g, dtype=F64)
    M = B @ B.T / rank + shift * torch.eye(n, dtype=F64)
    return scale * 0.5 * (M + M.T)


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def positive(shape, g: torch.Generator, shift: float, scale: float) -> torch.Tensor:
    return scale * (torch.rand(*shape, generator=g, dtype=F64) + shift)


seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 6)
shifts = st.floats(0.02, 1.0)
scales = st.floats(-1.5, 1.5).map(lambda e: 10.0**e)

LEAVES = ("dense", "diag", "kron", "eigen", "eigen_fe", "eigen_kfac")
KRON_LEAVES = ("kron", "eigen_fe", "eigen_kfac")  # the ones with factored damping modes


@st.composite
def leaves(draw, kinds=LEAVES):
    kind = draw(st.sampled_from(kinds))
    g = gen(draw(seeds))
    shift, scale = draw(shifts), draw(scales)
    if kind == "dense":
        n = draw(dims)
        return DenseLeaf(psd(n, g, draw(st.integers(1, n + 2)), shift, scale))
    if kind == "diag":
        return DiagLeaf(positive((draw(dims),), g, shift, scale))
    p, q, bias = draw(dims), draw(dims), draw(st.booleans())
    if kind == "kron":
        A = psd(q, g, draw(st.integers(1, q + 2)), shift, scale)
        G = psd(p, g, draw(st.integers(1, p + 2)), draw(shifts), draw(scales))
        return KronLeaf(A, G, bias)
    QA, QG = orthogonal(q, g), orthogonal(p, g)
    if kind == "eigen":
        return EigenLeaf(QA, QG, positive((p, q), g, shift, scale), bias, None)
    eA, eG = positive((q,), g, shift, scale), positive((p,), g, draw(shifts), draw(scales))
    if kind == "eigen_kfac":
        return EigenLeaf(QA, QG, eG[:, None] * eA[None, :], bias, (eA, eG), kfac=True)
    S = positive((p, q), g, draw(shifts), draw(scales))
    return EigenLeaf(QA, QG, S, bias, (eA, eG))


def trees(kinds=LEAVES, depth: int = 2, block_weight: int = 1):
    """A leaf, or (with odds block_weight : 2) a BlockDiagonal of 1–3 trees of depth − 1."""
    if depth == 0:
        return leaves(kinds)

    @st.composite
    def tree(draw):
        if draw(st.integers(0, block_weight + 1)) < block_weight:
            return Block(draw(st.lists(trees(kinds, depth - 1), min_size=1, max_size=3)))
        return draw(leaves(kinds))

    return tree()


def blocks(kinds=LEAVES):
    """A BlockDiagonal (possibly nested)."""
    return st.lists(trees(kinds, 1), min_size=1, max_size=3).map(Block)


def build(node) -> CurvatureMatrix:
    if isinstance(node, DenseLeaf):
        return Dense(node.M)
    if isinstance(node, DiagLeaf):
        return Diagonal(node.d)
    if isinstance(node, KronLeaf):
        return Kron(node.A, node.G, node.bias)
    if isinstance(node, EigenLeaf):
        return EigenKron(node.QA, node.QG, node.S, node.bias, node.fe)
    return BlockDiagonal([build(c) for c in node.children])


# ---------------------------------------------------------------------------------- references


def param_order(p: int, q: int, bias: bool) -> torch.Tensor:
    """pos[o, i]: where entry (o, i) of X = [W b] (p×q) sits in the parameter vector."""
    qw = q - 1 if bias else q
    pos = torch.empty(p, q, dtype=torch.long)
    for o in range(p):
        for i in range(qw):
            pos[o, i] = o * qw + i  # W, row-major
        if bias:
            pos[o, q - 1] = p * qw + o  # then b
    return pos.reshape(-1)


def kron_ref(A: torch.Tensor, G: torch.Tensor, bias: bool) -> torch.Tensor:
    """Entry ((o, i), (o', i')) = G[o, o'] A[i, i'], placed in parameter order."""
    p, q = G.shape[0], A.shape[0]
    pos = param_order(p, q, bias)
    M = torch.zeros(p * q, p * q, dtype=F64)
    M[pos[:, None], pos[None, :]] = torch.kron(G, A)  # torch.kron(G, A)[o q + i, o' q + i'] = G[o,o'] A[i,i']
    return M


def eigen_ref(QA: torch.Tensor, QG: torch.Tensor, S: torch.Tensor, bias: bool) -> torch.Tensor:
    """Σ_ij S[i, j] v_ij v_ijᵀ with v_ij = vec(Q_G[:, i] Q_A[:, j]ᵀ) in parameter order."""
    p, q = QG.shape[0], QA.shape[0]
    V = torch.zeros(p * q, p * q, dtype=F64)
    V[param_order(p, q, bias)] = torch.kron(QG, QA)  # column i q + j is Q_G[:, i] ⊗ Q_A[:, j], rows (o, c)
    return (V * S.reshape(-1)) @ V.T


def dense_ref(node) -> torch.Tensor:
    if isinstance(node, DenseLeaf):
        return node.M
    if isinstance(node, DiagLeaf):
        return torch.diag(node.d)
    if isinstance(node, KronLeaf):
        return kron_ref(node.A, node.G, node.bias)
    if isinstance(node, EigenLeaf):
        return eigen_ref(node.QA, node.QG, node.S, node.bias)
    return torch.block_diag(*[dense_ref(c) for c in node.children])


def factor_dampings(mode: str, damping, trA: float, dimA: int, trG: float, dimG: int) -> tuple[float, float]:
    """(λ_A, λ_G) of a factored mode, from the definitions in kron.py's module docstring."""
    if mode == "factored":
        return tuple(damping) if isinstance(damping, tuple) else (math.sqrt(damping), math.sqrt(damping))
    if mode == "pi":
        pi = math.sqrt((trA / dimA) / (trG / dimG))
        return pi * math.sqrt(damping), math.sqrt(damping) / pi
    assert mode == "trace"
    return math.sqrt(damping * trA / trG), math.sqrt(damping * trG / trA)


def mode_ref(node, mode: str, damping) -> torch.Tensor:
    """The dense damped matrix that ``direction(g, damping, mode)`` inverts."""
    if mode == "exact":
        M = dense_ref(node)
        return M + damping * torch.eye(M.shape[0], dtype=F64)
    if isinstance(node, Block):
        return torch.block_diag(*[mode_ref(c, mode, damping) for c in node.children])
    if isinstance(node, KronLeaf):
        A, G = node.A, node.G
        dA, dG = factor_dampings(mode, damping, float(A.trace()), A.shape[0], float(G.trace()), G.shape[0])
        return kron_ref(A + dA * torch.eye(A.shape[0], dtype=F64), G + dG * torch.eye(G.shape[0], dtype=F64),
                        node.bias)
    assert isinstance(node, EigenLeaf) and node.fe is not None
    eA, eG = node.fe
    dA, dG = factor_dampings(mode, damping, float(eA.sum()), eA.numel(), float(eG.sum()), eG.numel())
    if node.kfac:  # KFAC's eigendecomposition: the factored damping of the factors themselves
        A = node.QA @ torch.diag(eA + dA) @ node.QA.T
        G = node.QG @ torch.diag(eG + dG) @ node.QG.T
        return kron_ref(A, G, node.bias)
    return eigen_ref(node.QA, node.QG, node.S + dG * eA[None, :] + dA * eG[:, None] + dA * dG, node.bias)


def scaled(node, alpha: float):
    """The reference of α·C in the representation the code claims: α scales G (and S, e_G)."""
    if isinstance(node, DenseLeaf):
        return DenseLeaf(alpha * node.M)
    if isinstance(node, DiagLeaf):
        return DiagLeaf(alpha * node.d)
    if isinstance(node, KronLeaf):
        return KronLeaf(node.A, alpha * node.G, node.bias)
    if isinstance(node, EigenLeaf):
        fe = None if node.fe is None else (node.fe[0], alpha * node.fe[1])
        return EigenLeaf(node.QA, node.QG, alpha * node.S, node.bias, fe, node.kfac)
    return Block([scaled(c, alpha) for c in node.children])


def has_modes(node) -> bool:
    if isinstance(node, Block):
        return all(has_modes(c) for c in node.children)
    return isinstance(node, KronLeaf) or (isinstance(node, EigenLeaf) and node.fe is not None)


# ---------------------------------------------------------------------------------- tolerances


def norm2(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, ord=2)) if M.numel() else 0.0


def rtol(n: int) -> float:
    """Rounding allowance for an n×n computation (a few ulps per accumulated term)."""
    return 16 * EPS * (n + 4)


def assert_close(actual, expected, scale: float, tol: float, what: str) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == F64, f"{what}: dtype {actual.dtype}"
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= tol * scale, f"{what}: error {err:.3e} > {tol:.1e} × {scale:.3e}"


def assert_solves(x: torch.Tensor, Md: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """Backward error: ‖Md x − v‖ ≤ tol (‖Md‖ ‖x‖ + ‖v‖), column by column."""
    X, Vm = (x[:, None], v[:, None]) if x.ndim == 1 else (x, v)
    assert x.shape == v.shape, f"{what}: shape {tuple(x.shape)} != {tuple(v.shape)}"
    res = torch.linalg.vector_norm(Md @ X - Vm, dim=0)
    bound = rtol(Md.shape[0]) * (norm2(Md) * torch.linalg.vector_norm(X, dim=0) + torch.linalg.vector_norm(Vm, dim=0))
    assert bool((res <= bound).all()), f"{what}: residual {res.tolist()} > {bound.tolist()}"


def cond(Md: torch.Tensor) -> float:
    w = torch.linalg.eigvalsh(Md)
    assert float(w[0]) > 0
    return float(w[-1] / w[0])


def assert_inverse(inv: CurvatureMatrix, Md: torch.Tensor, what: str) -> None:
    n = Md.shape[0]
    assert_close(inv.to_dense() @ Md, torch.eye(n, dtype=F64), cond(Md), rtol(n), what)


def assert_logdet(logdet, Md: torch.Tensor, what: str) -> None:
    sign, ref = torch.linalg.slogdet(Md)
    assert float(sign) == 1.0
    n = Md.shape[0]
    assert_close(logdet, ref, n * cond(Md) + abs(float(ref)), rtol(n), what)


def vectors(n: int, seed: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(n, generator=g, dtype=F64), torch.randn(n, m, generator=g, dtype=F64)


dampings = st.floats(-3.0, 1.0).map(lambda e: 10.0**e)
pairs = st.tuples(dampings, dampings)
modes = st.sampled_from(["exact", "factored", "factored_pair", "pi", "trace"])


def mode_damping(draw, mode: str):
    return (draw(pairs), "factored") if mode == "factored_pair" else (draw(dampings), mode)


# ---------------------------------------------------------------------------------- properties


@SETTINGS
@given(tree=trees(), seed=seeds, m=st.integers(1, 4))
def test_dense_form_and_products(tree, seed, m):
    C, M = build(tree), dense_ref(tree)
    n = M.shape[0]
    D = C.to_dense()
    scale, tol = max(norm2(M), 1e-300), rtol(n)
    assert C.shape == (n, n) and C.size == n
    assert_close(D, M, scale, tol, "to_dense")
    assert_close(D, D.T, scale, tol, "to_dense symmetric")
    v, V = vectors(n, seed, m)
    assert_close(C @ v, M @ v, scale * float(v.norm()), tol, "C @ v")
    assert_close(C @ V, M @ V, scale * float(V.norm()), tol, "C @ V")
    assert_close(C.diagonal(), M.diagonal(), scale, tol, "diagonal")
    assert_close(C.trace(), M.trace(), n * scale, tol, "trace")
    assert_close(C.frobenius_norm(), torch.linalg.matrix_norm(M), math.sqrt(n) * scale, tol, "frobenius_norm")


@SETTINGS
@given(tree=trees())
def test_spectrum(tree):
    C, M = build(tree), dense_ref(tree)
    n = M.shape[0]
    scale, tol = norm2(M), rtol(n)
    w = C.eigvalsh()
    assert bool((w[1:] >= w[:-1]).all()), "eigvalsh not ascending"
    assert_close(w, torch.linalg.eigvalsh(C.to_dense()), scale, tol, "eigvalsh vs dense")
    vals, Q = C.eigh()
    assert torch.equal(vals, C.eigvalsh())
    assert bool((vals[1:] >= vals[:-1]).all()), "eigh values not ascending"
    assert_close(vals, torch.linalg.eigvalsh(M), scale, tol, "eigh values")
    assert_close(Q.T @ Q, torch.eye(n, dtype=F64), 1.0, tol, "eigh orthonormal")
    assert_close((Q * vals) @ Q.T, M, scale, tol, "eigh reconstructs")
    assert_close(M @ Q, Q * vals, scale, tol, "eigh eigenpairs")


@SETTINGS
@given(tree=trees(), damping=dampings, seed=seeds, m=st.integers(1, 3), eigh_first=st.booleans())
def test_damped(tree, damping, seed, m, eigh_first):
    C, M = build(tree), dense_ref(tree)
    n = M.shape[0]
    Md = M + damping * torch.eye(n, dtype=F64)
    if eigh_first:  # Dense solves through a cached eigendecomposition
        C.eigh()
    v, V = vectors(n, seed, m)
    x = C.solve(v, damping)
    assert_solves(x, Md, v, "solve(v)")
    assert_solves(C.solve(V, damping), Md, V, "solve(V)")
    assert_close(C.direction(v, damping), -x, float(x.norm()), rtol(n), "direction = -solve")
    inv = C.inverse(damping)
    assert inv.size == n
    assert_inverse(inv, Md, "inverse · (C + λI)")
    assert_logdet(C.logdet(damping), Md, "logdet")


@SETTINGS
@given(leaf=leaves(KRON_LEAVES), mode=modes, data=st.data(), seed=seeds, alpha=st.floats(0.1, 10.0))
def test_kron_damping_modes(leaf, mode, data, seed, alpha):
    damping, mode = mode_damping(data.draw, mode)
    for node, C in ((leaf, build(leaf)), (scaled(leaf, alpha), alpha * build(leaf))):
        Md = mode_ref(node, mode, damping)
        n = Md.shape[0]
        v, V = vectors(n, seed, 2)
        x = C.solve(v, damping, mode)
        assert_solves(x, Md, v, f"{mode} solve(v)")
        assert_solves(C.solve(V, damping, mode), Md, V, f"{mode} solve(V)")
        assert_close(C.direction(v, damping, mode), -x, float(x.norm()), rtol(n), f"{mode} direction = -solve")
        inv = C.inverse(damping, mode)
        assert isinstance(inv, (Kron, EigenKron))
        assert_inverse(inv, Md, f"{mode} inverse")
        assert_logdet(C.logdet(damping, mode), Md, f"{mode} logdet")
        if isinstance(C, Kron):  # the same rules through the shared eigenbasis
            assert_solves(C.eigen().solve(v, damping, mode), Md, v, f"{mode} eigen().solve")


@SETTINGS
@given(tree=blocks(KRON_LEAVES), mode=modes, data=st.data(), seed=seeds, alpha=st.floats(0.1, 10.0))
def test_block_direction_modes(tree, mode, data, seed, alpha):
    damping, mode = mode_damping(data.draw, mode)
    if mode == "exact":
        damping = float(damping)
    for node, C in ((tree, build(tree)), (scaled(tree, alpha), alpha * build(tree))):
        Md = mode_ref(node, mode, damping)
        g, _ = vectors(Md.shape[0], seed, 1)
        assert_solves(-C.direction(g, damping, mode), Md, g, f"block {mode} direction")


@SETTINGS
@given(tree=blocks(), mode=st.sampled_from(["factored", "pi", "trace"]), damping=dampings)
def test_block_direction_modes_need_kron_blocks(tree, mode, damping):
    C = build(tree)
    g = torch.ones(C.size, dtype=F64)
    if has_modes(tree):
        assert_solves(-C.direction(g, damping, mode), mode_ref(tree, mode, damping), g, f"block {mode} direction")
    else:
        with pytest.raises(ValueError, match="mode"):
            C.direction(g, damping, mode)


# ---------------------------------------------------------------------------------- arithmetic


@st.composite
def twins(draw, node):
    """A matrix of the same layout as node, fresh values; Kron twins may share a factor, EigenKron twins a basis."""
    if isinstance(node, Block):
        return Block([draw(twins(c)) for c in node.children])
    g = gen(draw(seeds))
    if isinstance(node, DenseLeaf):
        n = node.M.shape[0]
        return DenseLeaf(psd(n, g, n, draw(shifts), draw(scales)))
    if isinstance(node, DiagLeaf):
        return DiagLeaf(positive(node.d.shape, g, draw(shifts), draw(scales)))
    if isinstance(node, KronLeaf):
        p, q = node.G.shape[0], node.A.shape[0]
        share = draw(st.sampled_from(["A", "G", "none"]))
        A = node.A.clone() if share == "A" else psd(q, g, q, draw(shifts), draw(scales))
        G = node.G.clone() if share == "G" else psd(p, g, p, draw(shifts), draw(scales))
        return KronLeaf(A, G, node.bias)
    p, q = node.QG.shape[0], node.QA.shape[0]
    same = draw(st.booleans())
    QA, QG = (node.QA.clone(), node.QG.clone()) if same else (orthogonal(q, g), orthogonal(p, g))
    return EigenLeaf(QA, QG, positive((p, q), g, draw(shifts), draw(scales)), node.bias, None)


@st.composite
def partners(draw, node):
    """Something to add to node: itself, a twin, a Dense or a Diagonal of the same size."""
    kind = draw(st.sampled_from(["self", "twin", "dense", "diag"]))
    if kind == "self":
        return node
    if kind == "twin":
        return draw(twins(node))
    n = dense_ref(node).shape[0]
    g = gen(draw(seeds))
    if kind == "dense":
        return DenseLeaf(psd(n, g, n, draw(shifts), draw(scales)))
    return DiagLeaf(positive((n,), g, draw(shifts), draw(scales)))


def split_diag(d: DiagLeaf, node: Block) -> Block:
    out, start = [], 0
    for c in node.children:
        k = dense_ref(c).shape[0]
        out.append(DiagLeaf(d.d[start:start + k]))
        start += k
    return Block(out)


def sum_structure(a, b):
    """The structure C ± D takes, as the code's ``_add`` rules state it (dense when none is shared)."""
    if isinstance(a, DenseLeaf) or isinstance(b, DenseLeaf):
        return Dense
    if isinstance(a, DiagLeaf) and isinstance(b, DiagLeaf):
        return Diagonal
    if isinstance(a, Block) and isinstance(b, DiagLeaf):
        b = split_diag(b, a)
    if isinstance(b, Block) and isinstance(a, DiagLeaf):
        a = split_diag(a, b)
    if isinstance(a, Block) and isinstance(b, Block):
        return (BlockDiagonal, [sum_structure(x, y) for x, y in zip(a.children, b.children)])
    if isinstance(a, KronLeaf) and isinstance(b, KronLeaf):
        return Kron if torch.equal(a.A, b.A) or torch.equal(a.G, b.G) else Dense
    if isinstance(a, EigenLeaf) and isinstance(b, EigenLeaf):
        return EigenKron if torch.equal(a.QA, b.QA) and torch.equal(a.QG, b.QG) else Dense
    return Dense


def structure_of(C: CurvatureMatrix):
    if isinstance(C, BlockDiagonal):
        return (BlockDiagonal, [structure_of(b) for b in C.blocks])
    return type(C)


def check_matrix(C: CurvatureMatrix, M: torch.Tensor, what: str, scale: float | None = None) -> None:
    """C against its expected dense M: dense form, products, diagonal, trace, norm, spectrum.

    ``scale``: the size of what M was computed from (‖C‖ + ‖D‖ for a sum), norm2(M) by default.
    """
    n = M.shape[0]
    scale, tol = norm2(M) if scale is None else scale, rtol(n)
    assert C.size == n
    assert_close(C.to_dense(), M, scale, tol, f"{what}: to_dense")
    V = torch.randn(n, 2, generator=gen(n), dtype=F64)
    assert_close(C @ V, M @ V, scale * float(V.norm()), tol, f"{what}: @")
    assert_close(C.diagonal(), M.diagonal(), scale, tol, f"{what}: diagonal")
    assert_close(C.trace(), M.trace(), n * scale, tol, f"{what}: trace")
    assert_close(C.frobenius_norm(), torch.linalg.matrix_norm(M), math.sqrt(n) * scale, tol, f"{what}: norm")
    assert_close(C.eigvalsh(), torch.linalg.eigvalsh(M), scale, tol, f"{what}: eigvalsh")


@SETTINGS
@given(data=st.data(), tree=trees(), alpha=st.floats(-10.0, 10.0).filter(lambda a: abs(a) > 1e-3))
def test_arithmetic(data, tree, alpha):
    other = data.draw(partners(tree))
    C, D = build(tree), build(other)
    M, N = dense_ref(tree), dense_ref(other)
    scale = norm2(M) + norm2(N)
    for what, R, ref in (("C + D", C + D, M + N), ("C - D", C - D, M - N), ("D - C", D - C, N - M)):
        check_matrix(R, ref, what, scale)
        assert structure_of(R) == sum_structure(tree, other), what
    for what, R in (("a * C", alpha * C), ("C * a", C * alpha), ("C / (1/a)", C / (1.0 / alpha))):
        check_matrix(R, alpha * M, what)
        assert structure_of(R) == structure_of(C), what
        check_matrix(R, dense_ref(scaled(tree, alpha)), f"{what} (reference scaled)")
    check_matrix(-C, -M, "-C")
    assert structure_of(-C) == structure_of(C)


@SETTINGS
@given(tree=trees())
def test_sum_with_itself_keeps_structure(tree):
    C, M = build(tree), dense_ref(tree)
    for R, factor in ((C + C, 2.0), (C - C, 0.0), (C + 2.0 * C, 3.0)):
        assert structure_of(R) == structure_of(C)
        check_matrix(R, factor * M, f"C + C × {factor}", 3.0 * norm2(M))
